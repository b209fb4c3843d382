"""The embedded corpus python_stdlib (moejax/data/stdlib_corpus.py): the documented files,
named by their digest, rebuilt when the standard library changes, its validation split whole."""
import glob
import hashlib
import json
import os
import sysconfig

import pytest

from moejax import data
from moejax.data import sources, stdlib_corpus
from tests.corpora import all_rows, generated, in_corpus, make_cfg, stdlib_validation_bytes


@pytest.fixture(scope='session')
def stdlib_cfg(tmp_path_factory, data_dir):
    """The real embedded corpus (the session's, in data_dir) with a byte tokenizer."""
    cfg = make_cfg(tmp_path_factory.mktemp('stdlib'), name='python_stdlib', seq_len=256,
                   batch_size=64, data_dir=data_dir)
    data.check_data(cfg)
    return cfg, data.get_tokenizer(cfg)


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
