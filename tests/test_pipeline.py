"""Packing and batches (moejax/data/pipeline.py): packing reconstructs the corpus, batches are
deterministic, shard across hosts and resume from an index; check_data names the bad key."""
import collections
import itertools

import numpy as np
import pytest

from moejax import data
from moejax.data import pipeline
from moejax.errors import ConfigError
from tests.corpora import (
    FIELDS,
    all_rows,
    make_cfg,
    reconstruct,
    synthetic_documents,
    write_lines_corpus,
)


def test_packer_layout_by_hand():
    B, E = 1, 2
    short = np.array([B, 10, E])                      # 2 pairs
    long = np.array([B, 20, 21, 22, 23, 24, 25, 26, E])  # 8 pairs: longer than T=4
    middle = np.array([B, 30, 31, 32, E])             # 4 pairs: does not fit after long's tail
    packer = pipeline.Packer(seq_len=4)
    rows = np.concatenate([packer.add([short, long]), packer.add([middle]), packer.finish()])
    expected = np.array([
        # inputs             targets             segment_ids   positions
        [[B, 10, B, 20], [10, E, 20, 21], [1, 1, 2, 2], [0, 1, 0, 1]],
        [[21, 22, 23, 24], [22, 23, 24, 25], [1, 1, 1, 1], [0, 1, 2, 3]],
        [[25, 26, 0, 0], [26, E, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]],
        [[B, 30, 31, 32], [30, 31, 32, E], [1, 1, 1, 1], [0, 1, 2, 3]]])
    np.testing.assert_array_equal(rows, expected)


def test_packed_batches_reconstruct_the_corpus(tmp_path, capsys):
    docs = synthetic_documents(300)
    write_lines_corpus(tmp_path, docs)
    cfg = make_cfg(tmp_path, seq_len=64)
    tokenizer = data.get_tokenizer(cfg)
    found = []
    for split in ('train', 'validation'):
        source = data.eval_batches(cfg, tokenizer, split)
        batch = source[0]
        assert set(batch) == set(FIELDS)
        assert all(v.shape == (4, 64) and v.dtype == np.int32 for v in batch.values())
        found.append(reconstruct(all_rows(source), tokenizer))
        # The packing's report: documents, and tokens (+ eos each) in rows, counted here anew.
        rows_N4T = all_rows(source)
        rows = len(rows_N4T) - sum(not (r[2] > 0).any() for r in rows_N4T)  # less batch padding
        tokens = sum(len(tokenizer.encode(d)) + 1 for d in found[-1])
        assert f'data: packing text_files {split}: {len(found[-1]):,} documents, {tokens:,} ' \
               f'tokens in {rows:,} rows of 64 (in ' in capsys.readouterr().out
    assert len(found[1]) > 0 and len(found[0]) > len(found[1])
    assert collections.Counter(found[0] + found[1]) == collections.Counter(docs)


def test_eval_batches_limit_and_unknown_split(tmp_path):
    write_lines_corpus(tmp_path, synthetic_documents(300))
    cfg = make_cfg(tmp_path, eval_batches=3)
    tokenizer = data.get_tokenizer(cfg)
    assert len(data.eval_batches(cfg, tokenizer, 'train')) == 3
    with pytest.raises(ConfigError, match='split'):
        data.eval_batches(cfg, tokenizer, 'test')


# --------------------------------------------------------------------- sharding and order


@pytest.fixture
def lines_cfg(tmp_path):
    write_lines_corpus(tmp_path, synthetic_documents(400))
    cfg = make_cfg(tmp_path, batch_size=8)
    return cfg, data.get_tokenizer(cfg)


def test_host_shards_concatenate_to_the_global_batch(lines_cfg):
    cfg, tokenizer = lines_cfg
    train = lambda **kw: data.train_batches(cfg, tokenizer, **kw)
    validation = lambda **kw: data.eval_batches(cfg, tokenizer, 'validation', **kw)
    for make, indices in ((train, (0, 1, 7, 12345)), (validation, None)):
        whole = make()
        hosts = [make(process_index=p, process_count=2) for p in range(2)]
        if indices is None:
            assert len(hosts[0]) == len(hosts[1]) == len(whole)
        for i in indices or range(len(whole)):
            for k in FIELDS:
                assert hosts[0][i][k].shape == (4, cfg.data.seq_len)
                np.testing.assert_array_equal(np.concatenate([h[i][k] for h in hosts]), whole[i][k])
    with pytest.raises(ConfigError, match='data.batch_size'):
        data.train_batches(cfg, tokenizer, process_count=3)


def test_train_order_is_seeded_reshuffled_and_resumable(lines_cfg):
    cfg, tokenizer = lines_cfg
    first = data.train_batches(cfg, tokenizer)
    again = data.train_batches(cfg, tokenizer)
    for i in (0, 5, 10**6):
        for k in FIELDS:
            np.testing.assert_array_equal(first[i][k], again[i][k])
    cfg.train.seed = 1
    other = data.train_batches(cfg, tokenizer)
    assert not np.array_equal(first[0]['inputs'], other[0]['inputs'])
    # Iterating (with prefetch) and resuming from an index give the random-access batches.
    for i, batch in enumerate(itertools.islice(iter(first), 6)):
        np.testing.assert_array_equal(batch['targets'], first[i]['targets'])
    for i, batch in enumerate(itertools.islice(first.iterate(start=40), 3), start=40):
        np.testing.assert_array_equal(batch['segment_ids'], first[i]['segment_ids'])


def test_each_epoch_is_a_new_permutation_of_all_rows(lines_cfg):
    cfg, tokenizer = lines_cfg
    stored = all_rows(data.eval_batches(cfg, tokenizer, 'train'))
    stored = stored[stored[:, 2].any(axis=1)]  # without the eval split's filler rows
    n, batch = len(stored), cfg.data.batch_size
    source = data.train_batches(cfg, tokenizer)
    served = np.concatenate([np.stack([source[i][k] for k in FIELDS], axis=1)
                             for i in range(2 * n // batch + 1)])
    key = lambda rows: sorted(r.tobytes() for r in rows)
    epoch0, epoch1 = served[:n], served[n:2 * n]
    assert key(epoch0) == key(stored) and key(epoch1) == key(stored)
    assert not np.array_equal(epoch0, epoch1)


# ------------------------------------------------------------------------------ check_data


@pytest.mark.parametrize('fields, key', [
    (dict(text_glob='/nonexistent/**/*.txt'), 'data.text_glob'),
    (dict(name='no_such_dataset_anywhere'), 'data.name'),
    (dict(name='mnist'), 'data.name'),  # registered in TFDS but not prepared in data_dir
    (dict(text_format='paragraphs'), 'data.text_format'),
    (dict(tokenizer='wordpiece'), 'data.tokenizer'),
    (dict(vocab_size=258), 'data.vocab_size'),
    (dict(tokenizer='sentencepiece', vocab_size=100), 'data.vocab_size'),
    (dict(tokenizer='sentencepiece', tokenizer_path='/nonexistent.model'), 'data.tokenizer_path'),
    (dict(seq_len=4), 'data.seq_len'),
    (dict(batch_size=0), 'data.batch_size'),
])
def test_check_data_names_the_bad_key(tmp_path, fields, key):
    write_lines_corpus(tmp_path, ['one document'])
    with pytest.raises(ConfigError) as error:
        data.check_data(make_cfg(tmp_path, **fields))
    assert error.value.key == key
    assert str(error.value).startswith(key) and '\n' not in str(error.value)
