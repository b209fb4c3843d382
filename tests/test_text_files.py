"""The text_files corpus (moejax/data/text_files.py): a document per file or per line, each
split counted, empty files reported."""
import hashlib
import json
import os

import numpy as np
import pytest

from moejax import data
from moejax.errors import ConfigError
from tests.corpora import all_rows, make_cfg, reconstruct, synthetic_documents
from tests.helpers import run_cli


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


@pytest.mark.slow
@pytest.mark.parametrize('tokenizer,vocab', [('byte', 259), ('sentencepiece', 320)])
def test_text_files_train_with_either_tokenizer(tmp_path, tokenizer, vocab):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ['alpha', 'beta', 'gamma', 'delta', 'mixture', 'expert', 'router', 'token']
    for i in range(60):
        text = ' '.join(rng.choice(words, 400)) + '\n'
        (corpus / f'doc{i}.txt').write_text(text)
    workdir = tmp_path / 'run'
    proc = run_cli('train', '--config=configs/default.py:tiny', f'--workdir={workdir}',
                   '--config.data.name=text_files', f'--config.data.text_glob={corpus}/*.txt',
                   f'--config.data.tokenizer={tokenizer}', f'--config.data.vocab_size={vocab}',
                   f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.num_steps=12',
                   '--config.train.log_every=1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
