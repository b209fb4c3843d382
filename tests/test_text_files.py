"""The text_files corpus (moejax/data/text_files.py): a document per file or per line, each
split counted, empty files reported."""
import hashlib
import os

import pytest

from moejax import data
from moejax.errors import ConfigError
from tests.corpora import all_rows, make_cfg, reconstruct, synthetic_documents


def test_text_files_one_document_per_file(tmp_path):
    docs = [f'file {i}: ' + text for i, text in enumerate(synthetic_documents(100, seed=2))]
    os.makedirs(tmp_path / 'corpus')
    for i, text in enumerate(docs):
        (tmp_path / f'corpus/doc{i:03d}.txt').write_text(text + '\n\nsecond paragraph\n')
    cfg = make_cfg(tmp_path, text_format='files', seq_len=32)
    data.check_data(cfg)
    tokenizer = data.get_tokenizer(cfg)
    found = [reconstruct(all_rows(data.eval_batches(cfg, tokenizer, s)), tokenizer)
             for s in ('train', 'validation')]
    assert found[0] and found[1]
    expected = [text + '\n\nsecond paragraph\n' for text in docs]
    assert sorted(found[0] + found[1]) == sorted(expected)


@pytest.mark.parametrize('text_format', ['files', 'lines'])
def test_text_corpora_count_documents_per_split_and_warn_about_empty_files(tmp_path, capsys,
                                                                          text_format):
    docs = synthetic_documents(60)
    os.makedirs(tmp_path / 'corpus')
    for i, doc in enumerate(docs):
        (tmp_path / f'corpus/doc{i:02d}.txt').write_text(doc + '\n' + doc)
    for name in ('empty1.txt', 'empty2.txt'):
        (tmp_path / 'corpus' / name).write_text('')
    cfg = make_cfg(tmp_path, text_format=text_format)
    tokenizer = data.get_tokenizer(cfg)
    for split in ('train', 'validation'):
        data.eval_batches(cfg, tokenizer, split)
    # The truth: the split rule on each document's key (file, or file:line), written out again.
    keys = [f'doc{i:02d}.txt' + (f':{n}' if text_format == 'lines' else '')
            for i in range(60) for n in ((0, 1) if text_format == 'lines' else (0,))]
    validation = sum(int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], 'big') % 1000 < 50
                     for k in keys)
    unit = 'one per file' if text_format == 'files' else 'one per non-empty line'
    out, err = capsys.readouterr()
    assert f"data: text_files {cfg.data.text_glob!r}: 60 usable file(s), " \
           f'{len(keys) - validation} train and {validation} validation documents ({unit})' in out
    [warning] = err.splitlines()
    assert 'skipped 0 binary file(s) (NUL bytes) and 2 empty file(s)' in warning
    assert 'empty1.txt' in warning


def test_empty_split_is_reported(tmp_path):
    os.makedirs(tmp_path / 'corpus')
    (tmp_path / 'corpus/only.txt').write_text('a single document')
    cfg = make_cfg(tmp_path, text_format='files')
    tokenizer = data.get_tokenizer(cfg)
    errors = []
    for split in ('train', 'validation'):  # the one document lands in exactly one of them
        try:
            data.eval_batches(cfg, tokenizer, split)
        except ConfigError as error:
            errors.append(error)
    assert len(errors) == 1 and errors[0].key == 'data.text_glob'
    assert 'split is empty' in str(errors[0])
