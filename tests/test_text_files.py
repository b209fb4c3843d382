"""The text_files corpus (moejax/data/text_files.py): a document per file or per line, each
split counted, empty files reported; a small corpus still gets a validation document; binary
files are skipped and undecodable ones counted; and it trains through the command line with
either tokenizer."""
import hashlib
import json
import os

import numpy as np
import pytest

from moejax import data
from moejax.data import corpus, sources
from moejax.errors import ConfigError
from tests.corpora import all_rows, make_cfg, reconstruct, synthetic_documents
from tests.helpers import TINY, run_cli


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
    """The loss falls; a binary file and a Latin-1 one among the texts: the run trains, and says
    once what it skipped and what it decoded with replacements."""
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ['alpha', 'beta', 'gamma', 'delta', 'mixture', 'expert', 'router', 'token']
    for i in range(60):
        text = ' '.join(rng.choice(words, 400)) + '\n'
        (corpus / f'doc{i}.txt').write_text(text)
    (corpus / 'blob.txt').write_bytes(bytes(range(256)) * 4)
    (corpus / 'latin1.txt').write_bytes('naïve café\n'.encode('latin-1'))
    workdir = tmp_path / 'run'
    proc = run_cli('train', TINY, f'--workdir={workdir}',
                   '--config.data.name=text_files', f'--config.data.text_glob={corpus}/*.txt',
                   f'--config.data.tokenizer={tokenizer}', f'--config.data.vocab_size={vocab}',
                   f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.num_steps=12',
                   '--config.train.log_every=1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    warnings = [line for line in proc.stderr.splitlines() if line.startswith('moejax: warning')]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert 'skipped 1 binary' in warnings[0] and '1 file(s) are not valid UTF-8' in warnings[0]


# --------------------------------------------- small corpora, binary and Latin-1 files

def small_corpus(directory, num: int) -> list[str]:
    """num one-line documents that all hash into train as files and as lines (the case that
    was refused)."""
    os.makedirs(directory, exist_ok=True)
    names = [n for n in (f'doc{i}.txt' for i in range(10 * num))
             if not corpus.is_validation(n) and not corpus.is_validation(f'{n}:0')][:num]
    for i, name in enumerate(names):
        (directory / name).write_text(f'document number {i} says hello\n')
    return names


def corpus_cfg(tmp_path, glob, text_format='files'):
    import ml_collections
    return ml_collections.ConfigDict(dict(data=dict(
        name='text_files', text_glob=glob, text_format=text_format,
        data_dir=str(tmp_path / 'tfds'))))


@pytest.mark.parametrize('num', [17, 41])
@pytest.mark.parametrize('text_format', ['files', 'lines'])
def test_small_corpus_gets_a_validation_document(tmp_path, num, text_format):
    names = small_corpus(tmp_path / 'corpus', num)
    cfg = corpus_cfg(tmp_path, str(tmp_path / 'corpus/*.txt'), text_format)
    splits = {s: sources.open_split(cfg, s) for s in corpus.TEXT_SPLITS}
    got = {s: docs.get(range(len(docs))) for s, docs in splits.items()}
    assert len(got['validation']) == 1 and len(got['train']) == num - 1
    every = [f'document number {i} says hello' for i in range(num)]  # as small_corpus wrote
    assert sorted(t.strip() for t in got['train'] + got['validation']) == sorted(every)
    # The moved document is the one of smallest sha256 (of its path, or 'path:line').
    keys = names if text_format == 'files' else [f'{n}:0' for n in names]
    smallest = min(range(num), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
    assert got['validation'][0].strip() == every[smallest]
    again = sources.open_split(cfg, 'validation')  # stable: the same document every time
    assert again.get([0]) == got['validation'] and again.key == splits['validation'].key


def test_binary_files_skipped_and_undecodable_counted(tmp_path, capsys):
    directory = tmp_path / 'corpus'
    small_corpus(directory, 30)
    (directory / 'blob.txt').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' * 10)
    (directory / 'latin1.txt').write_bytes('café crème brûlée\n'.encode('latin-1'))
    cfg = corpus_cfg(tmp_path, str(directory / '*.txt'))
    texts = []
    for split in corpus.TEXT_SPLITS:
        docs = sources.open_split(cfg, split)
        texts += docs.get(range(len(docs)))
    assert len(texts) == 31 and not any('IHDR' in t for t in texts)
    assert 'caf\ufffd cr\ufffdme br\ufffdl\ufffde\n' in texts  # read, with replacements
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('moejax: warning: ')
    assert 'skipped 1 binary file' in err[0] and '1 file(s) are not valid UTF-8' in err[0]
