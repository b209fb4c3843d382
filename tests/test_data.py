"""Data: tokenizers round-trip, packing reconstructs the corpus, batches are deterministic."""
import collections
import glob
import hashlib
import itertools
import json
import os
import sysconfig

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from moejax import data
from moejax.data import pipeline, sources, stdlib_corpus
from moejax.errors import ConfigError

FIELDS = ('inputs', 'targets', 'segment_ids', 'positions')
TEXTS = ['héllo wörld ✓ 日本語 🙂', '  leading and trailing  ', 'tabs\tand\nnew\r\nlines\n\n',
         'a literal \u2581 piece marker', '', 'x', 'def f(x):\n    return x + 1\n']


def make_cfg(tmp_path, **data_fields) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.data = ml_collections.ConfigDict(dict(
        name='text_files', data_dir=str(tmp_path / 'tfds'),
        text_glob=str(tmp_path / 'corpus/*.txt'),
        text_format='lines', text_key='text', tokenizer='byte', tokenizer_path=None, vocab_size=259,
        seq_len=16, batch_size=4, eval_batches=1000))
    cfg.data.update(data_fields)
    cfg.train = ml_collections.ConfigDict(dict(seed=0))
    return cfg


def synthetic_documents(num: int, seed: int = 0) -> list[str]:
    """Documents of 1 to ~60 words from a small vocabulary, with some non-ASCII words."""
    rng = np.random.default_rng(seed)
    words = ['alpha', 'beta', 'gamma', 'delta', 'größe', 'naïve', 'über', '数据', 'x', 'return',
             'self', '(a, b)', '=', '->', '42', 'café', 'zeta', 'moe', 'expert', 'route']
    return [' '.join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(num)]


def write_lines_corpus(tmp_path, docs: list[str], num_files: int = 3) -> None:
    os.makedirs(tmp_path / 'corpus', exist_ok=True)
    for f in range(num_files):
        lines = docs[f::num_files]
        (tmp_path / f'corpus/part{f}.txt').write_text('\n\n'.join(lines) + '\n', encoding='utf-8')


def all_rows(source) -> np.ndarray:
    """Every row of an (eval) BatchSource as [N, 4, T]."""
    return np.concatenate([np.stack([b[k] for k in FIELDS], axis=1) for b in source])


def reconstruct(rows_N4T: np.ndarray, tokenizer) -> list[str]:
    """Rebuild documents from rows in stored order, checking every piece's invariants on the way."""
    docs, stream = [], []
    for inputs, targets, segments, positions in rows_N4T:
        real = segments > 0
        assert np.all(inputs[~real] == 0) and np.all(targets[~real] == 0)
        assert np.all(positions[~real] == 0)
        assert not np.any(np.diff(real.astype(int)) > 0), 'padding only at the end of a row'
        if not real.any():  # an eval split's last batch is filled up with empty rows
            continue
        ids = segments[real]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for s in range(1, ids.max() + 1):
            piece_in, piece_tgt = inputs[segments == s], targets[segments == s]
            np.testing.assert_array_equal(positions[segments == s], np.arange(len(piece_in)))
            np.testing.assert_array_equal(piece_tgt[:-1], piece_in[1:])  # shifted pairs
            if stream:
                assert piece_in[0] == stream[-1][1][-1], 'a continuation resumes where it stopped'
            else:
                assert piece_in[0] == tokenizer.bos_id
            stream.append((piece_in, piece_tgt))
            if piece_tgt[-1] == tokenizer.eos_id:
                ids_doc = np.concatenate([p for p, _ in stream])[1:]
                docs.append(tokenizer.decode(ids_doc))
                stream = []
    assert not stream
    return docs


# ------------------------------------------------------------------------------ tokenizers


def check_round_trip(tokenizer, texts):
    lengths_V = tokenizer.byte_lengths()
    assert lengths_V.shape == (tokenizer.vocab_size,)
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(isinstance(i, int) and 3 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
        specials = [tokenizer.bos_id] + ids + [tokenizer.eos_id, tokenizer.pad_id]
        assert tokenizer.decode(specials) == text
        assert int(lengths_V[ids].sum()) == len(text.encode('utf-8'))
    assert lengths_V[[tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id]].sum() == 0


def test_byte_tokenizer_round_trips(tmp_path):
    tokenizer = data.get_tokenizer(make_cfg(tmp_path, vocab_size=300))
    ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size)
    assert ids == (0, 1, 2, 300)
    assert tokenizer.encode('A') == [ord('A') + 3]
    check_round_trip(tokenizer, TEXTS)


def test_sentencepiece_trains_caches_and_round_trips(tmp_path, capsys):
    write_lines_corpus(tmp_path, synthetic_documents(3000))
    cfg = make_cfg(tmp_path, tokenizer='sentencepiece', vocab_size=320)
    workdir = tmp_path / 'run'
    tokenizer = data.get_tokenizer(cfg, str(workdir))
    assert tokenizer.vocab_size == 320
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith('data: ')]
    assert said[-2].startswith('data: training a SentencePiece tokenizer (320 pieces) on ~4M '
                               'characters of the text_files train split, once') and 'ETA' in said[-2]
    assert said[-1].startswith('data: tokenizer: trained (in ')
    check_round_trip(tokenizer, TEXTS + synthetic_documents(20, seed=1))
    assert len(tokenizer.encode('alpha beta gamma')) < len('alpha beta gamma')  # learned pieces
    # Cached in data_dir: a second call (no workdir) loads the same model.
    cached = glob.glob(str(tmp_path / 'tfds/moejax_cache/tokenizers/*.model'))
    assert len(cached) == 1
    assert data.get_tokenizer(cfg).encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    # A resumed run uses the workdir's tokenizer even if the config would now build another one.
    assert os.path.exists(workdir / 'tokenizer.model')
    os.remove(cached[0])
    resumed = data.get_tokenizer(make_cfg(tmp_path, tokenizer='sentencepiece', vocab_size=400),
                                 str(workdir))
    assert resumed.encode(TEXTS[0] + TEXTS[6]) == tokenizer.encode(TEXTS[0] + TEXTS[6])
    assert not glob.glob(str(tmp_path / 'tfds/moejax_cache/tokenizers/*.model')), 'no retraining'
    with pytest.raises(ConfigError, match='data.tokenizer'):
        data.get_tokenizer(make_cfg(tmp_path), str(workdir))
    # An existing model can be named by tokenizer_path instead.
    given = make_cfg(tmp_path, tokenizer='sentencepiece', vocab_size=320,
                     tokenizer_path=str(workdir / 'tokenizer.model'))
    data.check_data(given)
    assert data.get_tokenizer(given).encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    (tmp_path / 'junk.model').write_bytes(b'not a model')
    given.data.tokenizer_path = str(tmp_path / 'junk.model')
    with pytest.raises(ConfigError, match='data.tokenizer_path'):
        data.check_data(given)


# --------------------------------------------------------------------------------- packing


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


# ------------------------------------------------------------------------------- corpora


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


class MoejaxToyCorpus(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS dataset standing in for any prepared one (e.g. lm1b)."""

    VERSION = tfds.core.Version('0.1.0')
    code_path = epath.Path(__file__)
    DOCS = {'train': synthetic_documents(120, seed=3), 'test': synthetic_documents(30, seed=4)}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {'content': tfds.features.Text(), 'id': np.int64}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.DOCS}

    def _generate_examples(self, split):
        for i, text in enumerate(self.DOCS[split]):
            yield f'{split}{i}', {'content': text, 'id': i}


def test_any_prepared_tfds_dataset(tmp_path):
    builder = MoejaxToyCorpus(data_dir=str(tmp_path / 'tfds'), file_format='array_record')
    builder.download_and_prepare()
    cfg = make_cfg(tmp_path, name='moejax_toy_corpus', text_key='content', seq_len=32)
    data.check_data(cfg)
    tokenizer = data.get_tokenizer(cfg)
    for split in ('train', 'test'):
        found = reconstruct(all_rows(data.eval_batches(cfg, tokenizer, split)), tokenizer)
        assert sorted(found) == sorted(MoejaxToyCorpus.DOCS[split])
    with pytest.raises(ConfigError, match='split'):
        data.eval_batches(cfg, tokenizer, 'validation')
    cfg.data.text_key = 'body'
    with pytest.raises(ConfigError, match='data.text_key'):
        data.eval_batches(cfg, tokenizer, 'test')


# -------------------------------------------------------------------------- python_stdlib


@pytest.fixture(scope='session')
def stdlib_cfg(tmp_path_factory):
    """The real embedded corpus, prepared once per session with a byte tokenizer."""
    cfg = make_cfg(tmp_path_factory.mktemp('stdlib'), name='python_stdlib', seq_len=256,
                   batch_size=64)
    data.check_data(cfg)
    return cfg, data.get_tokenizer(cfg)


def in_corpus(relative: str) -> bool:
    """The documented rule (stdlib_corpus's docstring), written out again: no test suites
    (folders test, tests, idle_test), no build-specific files, nothing from site-packages."""
    *folders, name = relative.split(os.sep)
    return not ({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'} & set(folders)
                or name.startswith('_sysconfigdata')
                or any(f.startswith('config-') for f in folders))


def generated(path: str) -> bool:
    """A character-mapping table generated by gencodec.py, as its header says."""
    with open(path, 'rb') as f:
        return b'generated from' in f.read(400)


def stdlib_validation_bytes() -> int:
    """Bytes of the UTF-8 stdlib files in the corpus that the sha256-of-path rule puts in the
    validation split."""
    root = sysconfig.get_paths()['stdlib']
    total = 0
    for path in glob.glob(os.path.join(root, '**/*.py'), recursive=True):
        relative = os.path.relpath(path, root)
        if not in_corpus(relative) or generated(path):
            continue
        digest = hashlib.sha256(relative.encode()).digest()
        if int.from_bytes(digest[:4], 'big') % 1000 < 50:
            raw = open(path, 'rb').read()
            try:
                total += len(raw.decode('utf-8').encode('utf-8'))
            except UnicodeDecodeError:
                pass
    return total


def test_the_stdlib_corpus_leaves_out_test_suites_and_is_named_by_its_digest():
    """The digest over the sorted (path, sha256 of content) list of the files the documented
    rule keeps, computed here anew."""
    root = sysconfig.get_paths()['stdlib']
    lines, kept = [], 0
    for path in glob.glob(os.path.join(root, '**/*.py'), recursive=True):
        relative = os.path.relpath(path, root)
        if in_corpus(relative) and '__pycache__' not in relative.split(os.sep):
            raw = open(path, 'rb').read()
            raw.decode('utf-8')  # every file outside the test suites is valid UTF-8
            if generated(path):
                continue
            lines.append(f'{relative}\t{hashlib.sha256(raw).hexdigest()}\n')
            kept += 1
    manifest = stdlib_corpus.stdlib_manifest()
    assert len(manifest.files) == kept
    assert manifest.digest == hashlib.sha256(''.join(sorted(lines)).encode()).hexdigest()
    assert not any(left := [r for r, _ in manifest.files if not in_corpus(r)]), left
    assert 'encodings/cp1252.py' not in dict(manifest.files) and 'encodings/aliases.py' in dict(
        manifest.files)


def test_a_prepared_stdlib_corpus_of_another_digest_is_rebuilt_with_one_line(tmp_path, capsys):
    cfg = make_cfg(tmp_path, name='python_stdlib')
    builder = stdlib_corpus.prepared_stdlib_builder(cfg)
    out = capsys.readouterr().out
    digest = stdlib_corpus.stdlib_manifest().digest
    assert 'Downloading' not in out
    assert 'data: building the python_stdlib corpus from this interpreter\'s standard library ' \
           f'(nothing is downloaded): {len(stdlib_corpus.stdlib_manifest().files):,} files' in out
    assert f'digest {digest[:16]}' in out
    assert stdlib_corpus.stored_digest(builder) == digest
    # A dataset prepared from another standard library (edited here to say so) is rebuilt.
    metadata = os.path.join(builder.data_dir, 'metadata.json')
    with open(metadata) as f:
        stored = json.load(f)
    with open(metadata, 'w') as f:
        json.dump(dict(stored, digest='0123456789abcdef' * 4), f)
    builder = stdlib_corpus.prepared_stdlib_builder(cfg)
    said = [line for line in capsys.readouterr().out.splitlines() if 'another' in line]
    assert said == [f'data: the python_stdlib in {builder.data_dir} was built from another '
                    'standard library (digest 0123456789abcdef); rebuilding it from this '
                    f"interpreter's (digest {digest[:16]})"]
    assert stdlib_corpus.stored_digest(builder) == digest
    # Caches built from a corpus (tokenizers, packed rows) are named by its digest.
    assert sources.open_split(cfg, 'validation').key == f'python_stdlib-{digest[:16]}-text'


def test_python_stdlib_validation_split_is_complete(stdlib_cfg):
    cfg, tokenizer = stdlib_cfg
    lengths_V = tokenizer.byte_lengths()
    whole = cfg.copy_and_resolve_references()
    whole.data.eval_batches = 10**6
    source = data.eval_batches(whole, tokenizer, 'validation')
    rows_N4T = all_rows(source)
    real = rows_N4T[:, 2] > 0
    assert int(lengths_V[rows_N4T[:, 1]][real].sum()) == stdlib_validation_bytes()
    # A training piece is a verbatim slice of some stdlib file.
    batch = data.train_batches(cfg, tokenizer)[0]
    piece = tokenizer.decode(batch['inputs'][0][batch['segment_ids'][0] == 1])
    root = sysconfig.get_paths()['stdlib']
    assert len(piece) > 20 and any(
        piece in open(path, 'rb').read().decode('utf-8', 'replace')
        for path in glob.glob(os.path.join(root, '**/*.py'), recursive=True))
