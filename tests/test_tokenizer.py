"""Tokenizers (moejax/data/tokenizer.py) round-trip text and count its bytes; SentencePiece is
trained once, cached in data_dir, and a resumed run keeps the workdir's."""
import glob
import os

import pytest

from moejax import data
from moejax.errors import ConfigError
from tests.corpora import make_cfg, synthetic_documents, write_lines_corpus

TEXTS = ['héllo wörld ✓ 日本語 🙂', '  leading and trailing  ', 'tabs\tand\nnew\r\nlines\n\n',
         'a literal \u2581 piece marker', '', 'x', 'def f(x):\n    return x + 1\n']


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
