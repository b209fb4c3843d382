"""Hugging Face tokenizers in a workdir: ids agree with the tokenizers library, byte lengths with
UTF-8, saved ids survive a reload, and packed data round-trips the corpus."""
import collections
import hashlib
import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from moejax import data
from moejax.data import hf_tokenizer as hf
from moejax.errors import ConfigError
from moejax.hf import tokenizer as hf_tokenizer_io
from tests.corpora import (
    all_rows,
    make_cfg,
    reconstruct,
    stdlib_validation_bytes,
    synthetic_documents,
    write_lines_corpus,
)

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'mixtral', 'single')
ASCII = ['def f(x):\n    return x + 1\n', 'the thin interpreter', '  two  spaces ', 'x']
ACCENTED = ['héllo wörld, naïve café', 'Größe über Ærø', 'ça et là']
EMOJI = ['🙂 ok 🚀🚀', 'mixed 日本語 and ✓ marks 🧪']
TEXTS = ASCII + ACCENTED + EMOJI


def write_hf_dir(path, tok: Tokenizer, **configs) -> str:
    """A HF model directory: tokenizer.json plus the given JSON files (name -> dict)."""
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, 'tokenizer.json'))
    for name, content in configs.items():
        with open(os.path.join(path, f'{name}.json'), 'w') as f:
            json.dump(content, f)
    return str(path)


def byte_level_tokenizer() -> Tokenizer:
    """Qwen-like: a byte-level BPE over the full byte alphabet, special tokens after it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_documents(200) + ASCII, trainer)
    tok.add_special_tokens(['<|endoftext|>', '<|im_start|>', '<|im_end|>'])
    return tok


def metaspace_tokenizer() -> Tokenizer:
    """Llama-like: '▁' for spaces, `<0xNN>` byte fallback, a post-processor that adds <s>."""
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2} | {f'<0x{b:02X}>': 3 + b for b in range(256)}
    merges = [('▁', 't'), ('h', 'e'), ('▁t', 'he'), ('i', 'n'), ('▁', 'in')]
    for piece in [chr(c) for c in range(33, 127)] + ['▁', '▁t', 'he', '▁the', 'in', '▁in']:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token='<unk>', byte_fallback=True))
    tok.normalizer = normalizers.Replace(' ', '▁')
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    tok.add_special_tokens(['<unk>', '<s>', '</s>'])
    return tok


@pytest.fixture(scope='module')
def qwen_like(tmp_path_factory):
    """A byte-level HF dir that names no bos (as Qwen's), eos <|im_end|>, pad <|endoftext|>."""
    tok = byte_level_tokenizer()
    path = write_hf_dir(tmp_path_factory.mktemp('qwen_like'), tok,
                        tokenizer_config={'bos_token': None, 'eos_token': '<|im_end|>',
                                          'pad_token': '<|endoftext|>', 'chat_template': 'T'},
                        config={'bos_token_id': None, 'eos_token_id': None})
    return path, tok


@pytest.fixture(scope='module')
def llama_like(tmp_path_factory):
    tok = metaspace_tokenizer()
    return write_hf_dir(tmp_path_factory.mktemp('llama_like'), tok), tok


def check_agrees_with_library(ours, theirs: Tokenizer, texts):
    for text in texts:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids
        assert [x.tolist() for x in ours.encode_batch([text, text])] == [ids, ids]
        with_specials = [ours.bos_id] + ids + [ours.eos_id]
        assert ours.decode(with_specials) == theirs.decode(with_specials, skip_special_tokens=True)


def check_round_trip_and_bytes(tokenizer, texts):
    lengths_V = tokenizer.byte_lengths()
    assert lengths_V.shape == (tokenizer.vocab_size,)
    assert lengths_V[[tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]].sum() == 0
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(lengths_V[ids].sum()) == len(text.encode('utf-8')), text


# ------------------------------------------------------------------------- the tokenizer


def test_byte_level_agrees_with_the_library_and_counts_bytes(qwen_like):
    path, tok = qwen_like
    ours = data.HFTokenizer.from_path(path)
    check_agrees_with_library(ours, tok, TEXTS)
    check_round_trip_and_bytes(ours, TEXTS)
    # An emoji spans several byte-level pieces, none of them a whole character by itself.
    ids = ours.encode('🚀')
    assert len(ids) > 1 and all(ours.decode([i]) == '\ufffd' for i in ids)
    # Special-token strings inside a document are text: only the pipeline adds bos/eos.
    text = 'a <|im_end|> b'
    assert ours.eos_id not in ours.encode(text) and ours.decode(ours.encode(text)) == text
    assert tok.token_to_id('<|im_end|>') in tok.encode(text, add_special_tokens=False).ids


def test_metaspace_byte_fallback_agrees_and_counts_bytes(llama_like):
    path, tok = llama_like
    ours = data.HFTokenizer.from_path(path)
    assert tok.encode('the', add_special_tokens=True).ids[0] == 1  # the library would add <s>
    check_agrees_with_library(ours, tok, TEXTS)
    check_round_trip_and_bytes(ours, TEXTS)
    assert ours.encode('é') == [3 + 0xC3, 3 + 0xA9]  # byte-fallback pieces, one byte each


def test_fixture_without_decoder(tmp_path):
    """tests/fixtures' byte-level BPE has no decoder: decoding goes through the byte table."""
    theirs = Tokenizer.from_file(os.path.join(FIXTURE, 'tokenizer.json'))
    ours = data.HFTokenizer.from_path(FIXTURE)
    texts = ['gate experts', 'Idempotent(x): fa|z', 'per expert, rate*(x)/q']
    assert theirs.decode(theirs.encode(texts[0]).ids) != texts[0]  # 'gate Ġe xperts'
    check_round_trip_and_bytes(ours, texts)
    theirs.decoder = decoders.ByteLevel()
    check_agrees_with_library(ours, theirs, texts)


def test_gpt2_byte_table_matches_the_library():
    table = hf.gpt2_byte_decoder()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet()) and len(table) == 256
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    samples = [chr(c) for c in range(128)] + ['\u0080\u07ff\u0800\uffff\U00010000\U0010ffff']
    samples += [bytes([lead, 0x80 | k]).decode() for lead in range(0xC2, 0xE0) for k in (0, 63)]
    for text in samples:
        (mapped, _), = level.pre_tokenize_str(text)
        assert bytes(table[c] for c in mapped) == text.encode('utf-8')


# --------------------------------------------------------------------------- ids and files


def test_ids_come_from_the_hf_files(tmp_path, qwen_like):
    path, tok = qwen_like
    ids = data.HFTokenizer.from_path(path).ids
    im_end, end_of_text = tok.token_to_id('<|im_end|>'), tok.token_to_id('<|endoftext|>')
    assert (ids['bos_id'], ids['eos_id'], ids['pad_id']) == (im_end, im_end, end_of_text)
    fixture = data.HFTokenizer.from_path(FIXTURE)  # config.json: bos 1, eos 2, pad null
    assert (fixture.bos_id, fixture.eos_id, fixture.pad_id) == (1, 2, 2)
    # config.json's ids alone (eos as a list, as Llama 3 writes it); a file path reads beside it.
    lone = write_hf_dir(tmp_path / 'ids', tok, config={'bos_token_id': 5, 'eos_token_id': [7, 9],
                                                       'pad_token_id': None})
    found = data.HFTokenizer.from_path(os.path.join(lone, 'tokenizer.json'))
    assert (found.bos_id, found.eos_id, found.pad_id) == (5, 7, 7)
    # No files and no well-known names: the lowest special token; none at all: id 0.
    odd = Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a'))
    odd.add_special_tokens(['<x>', '<y>'])
    found = data.HFTokenizer(odd.to_str().encode())
    assert found.bos_id == found.eos_id == found.pad_id == odd.token_to_id('<x>')
    bare = data.HFTokenizer(Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a'))
                            .to_str().encode())
    assert bare.bos_id == bare.eos_id == bare.pad_id == 0


def test_save_reload_and_saved_kind(tmp_path, qwen_like):
    path, _ = qwen_like
    ours = data.HFTokenizer.from_path(path, vocab_size=512)
    ours.save(str(tmp_path / 'hf'))
    assert (tmp_path / 'hf/tokenizer.json').read_bytes() == open(
        os.path.join(path, 'tokenizer.json'), 'rb').read()
    again = data.load_tokenizer(str(tmp_path / 'hf'), 512)  # no HF files needed any more
    assert again.ids == ours.ids and again.fingerprint == ours.fingerprint
    assert again.encode(TEXTS[-1]) == ours.encode(TEXTS[-1])
    np.testing.assert_array_equal(again.byte_lengths(), ours.byte_lengths())
    assert ours.byte_lengths()[ours.size:].sum() == 0 and ours.vocab_size == 512
    data.ByteTokenizer().save(str(tmp_path / 'byte'))
    os.makedirs(tmp_path / 'none')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad/tokenizer.json').write_text('{"neither": 1}')
    kinds = [data.saved_kind(str(tmp_path / k)) for k in ('hf', 'byte', 'none')]
    assert kinds == ['hf', 'byte', None]
    with pytest.raises(ConfigError, match='--workdir'):
        data.saved_kind(str(tmp_path / 'bad'))


def mixtral_style_sentencepiece() -> bytes:
    """A tiny SentencePiece BPE with Mixtral's ids: unk 0, bos 1, eos 2, no pad."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_documents(200) + ASCII + ACCENTED), model_writer=model,
        vocab_size=320, model_type='bpe', unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True, hard_vocab_limit=False, normalization_rule_name='identity',
        remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)
    return model.getvalue()


def import_tokenizer(hf_dir: str, workdir: str) -> str | None:
    """What an import does with a model directory's tokenizer; the kind it found."""
    kind, tokenizer = hf_tokenizer_io.find_tokenizer(hf_dir, vocab_size=10**6)
    hf_tokenizer_io.import_tokenizer(hf_dir, workdir, tokenizer)
    return kind


def test_sentencepiece_with_mixtral_ids(tmp_path):
    proto = mixtral_style_sentencepiece()
    with pytest.raises(ConfigError, match='0/1/2'):  # moejax's own models keep the check
        data.SentencePieceTokenizer(proto, strict=True)
    hf_dir = tmp_path / 'mixtral'
    hf_dir.mkdir()
    (hf_dir / 'tokenizer.model').write_bytes(proto)
    (hf_dir / 'config.json').write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    assert import_tokenizer(str(hf_dir), str(tmp_path / 'work')) == 'sentencepiece'
    ours = data.load_tokenizer(str(tmp_path / 'work'))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # pad: eos, as documented
    sp = spm.SentencePieceProcessor(model_proto=proto)
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text == sp.decode(ours.encode(text))
        # The dummy prefix '▁' SentencePiece puts before a text counts as one byte.
        assert ours.byte_lengths()[ours.encode(text)].sum() == len(text.encode()) + 1
    out = tmp_path / 'out'
    assert hf_tokenizer_io.export_tokenizer(str(tmp_path / 'work'), str(out)) == 'sentencepiece'
    assert (out / 'tokenizer.model').read_bytes() == proto
    config = json.loads((out / 'tokenizer_config.json').read_text())
    assert (config['bos_token'], config['eos_token'], config['pad_token']) == ('<s>', '</s>', None)


def test_moejax_sentencepiece_keeps_its_cache_name(tmp_path):
    """Models trained here (ids 0/1/2) keep the fingerprint their packed caches are named by."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_documents(100)), model_writer=model, vocab_size=300,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True, hard_vocab_limit=False,
        minloglevel=2)
    proto = model.getvalue()
    ours = data.SentencePieceTokenizer(proto, strict=True)
    assert ours.fingerprint == 'sp-' + hashlib.sha256(proto).hexdigest()[:16]
    assert (ours.pad_id, ours.bos_id, ours.eos_id) == (0, 1, 2)


def test_import_and_export_round_trip(tmp_path, qwen_like):
    path, tok = qwen_like
    work, out = str(tmp_path / 'work'), str(tmp_path / 'out')
    assert import_tokenizer(str(tmp_path), work) is None  # no tokenizer there
    assert import_tokenizer(path, work) == 'hf'
    assert hf_tokenizer_io.export_tokenizer(work, out) == 'hf'
    assert open(os.path.join(out, 'tokenizer.json'), 'rb').read() == open(
        os.path.join(path, 'tokenizer.json'), 'rb').read()
    config = json.load(open(os.path.join(out, 'tokenizer_config.json')))
    assert config['chat_template'] == 'T'  # the model's own config carried back
    assert (config['bos_token'], config['eos_token'], config['pad_token']) == (
        None, '<|im_end|>', '<|endoftext|>')  # bos was derived, not found: left as it was
    reimported = str(tmp_path / 'again')
    import_tokenizer(out, reimported)
    assert data.load_tokenizer(reimported).ids == data.load_tokenizer(work).ids


def test_byte_tokenizer_exports_an_equivalent_hf_file(tmp_path):
    data.ByteTokenizer().save(str(tmp_path / 'work'))
    assert hf_tokenizer_io.export_tokenizer(str(tmp_path / 'work'), str(tmp_path / 'out')) == 'byte'
    theirs = Tokenizer.from_file(str(tmp_path / 'out/tokenizer.json'))
    byte = data.ByteTokenizer()
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False).ids == byte.encode(text)
        assert theirs.decode(byte.encode(text)) == text
    config = json.load(open(tmp_path / 'out/tokenizer_config.json'))
    names = [theirs.token_to_id(config[f'{n}_token']) for n in ('pad', 'bos', 'eos')]
    assert names == [byte.pad_id, byte.bos_id, byte.eos_id]


# ------------------------------------------------------------------------- config and data


def test_get_tokenizer_with_hf_config(tmp_path, qwen_like):
    path, _ = qwen_like
    write_lines_corpus(tmp_path, ['one document'])
    workdir = str(tmp_path / 'work')
    for given in (path, os.path.join(path, 'tokenizer.json')):
        cfg = make_cfg(tmp_path, tokenizer='hf', tokenizer_path=given, vocab_size=448)
        data.check_data(cfg)
        ours = data.get_tokenizer(cfg)
        assert ours.eos_id == data.HFTokenizer.from_path(path).eos_id and ours.vocab_size == 448
    data.get_tokenizer(cfg, workdir)
    cfg.data.tokenizer_path = None  # a resumed run needs only the workdir
    assert data.get_tokenizer(cfg, workdir).fingerprint == ours.fingerprint
    with pytest.raises(ConfigError, match='data.tokenizer='):
        data.get_tokenizer(make_cfg(tmp_path), workdir)
    with pytest.raises(ConfigError, match='data.tokenizer_path'):
        data.get_tokenizer(cfg)  # 'hf' with neither a path nor a saved one


@pytest.mark.parametrize('kind, path, vocab_size, key', [
    ('hf', 'missing/tokenizer.json', 512, 'data.tokenizer_path'),
    ('hf', 'junk.json', 512, 'data.tokenizer_path'),
    ('hf', 'byte/tokenizer.json', 512, 'data.tokenizer_path'),  # moejax's byte file, not HF
    ('hf', 'sp/tokenizer.model', 512, 'data.tokenizer_path'),
    ('hf', FIXTURE, 64, 'data.vocab_size'),  # smaller than the tokenizer's 96 ids
    ('sentencepiece', FIXTURE, 512, 'data.tokenizer_path'),  # holds no tokenizer.model
    ('sentencepiece', os.path.join(FIXTURE, 'tokenizer.json'), 512, 'data.tokenizer_path'),
])
def test_bad_tokenizer_path_is_a_config_error(tmp_path, kind, path, vocab_size, key):
    write_lines_corpus(tmp_path, ['one document'])
    (tmp_path / 'junk.json').write_text('{"model": ')
    data.ByteTokenizer().save(str(tmp_path / 'byte'))
    (tmp_path / 'sp').mkdir()
    (tmp_path / 'sp/tokenizer.model').write_bytes(mixtral_style_sentencepiece())
    full = path if os.path.isabs(path) else str(tmp_path / path)
    cfg = make_cfg(tmp_path, tokenizer=kind, tokenizer_path=full, vocab_size=vocab_size)
    with pytest.raises(ConfigError) as error:
        data.check_data(cfg)
    assert error.value.key == key and '\n' not in str(error.value)
    assert key != 'data.tokenizer_path' or repr(full) in str(error.value)
    with pytest.raises(ConfigError):
        data.get_tokenizer(cfg, str(tmp_path / 'work'))
    assert not os.path.exists(tmp_path / 'work')


def test_packed_pipeline_reconstructs_the_corpus(tmp_path, qwen_like):
    """pad, bos and eos are not 0 here: padding is marked by segment ids, not by a token id."""
    path, _ = qwen_like
    docs = synthetic_documents(120, seed=3) + ['naïve 🙂 <|im_end|> ok']
    write_lines_corpus(tmp_path, docs)
    cfg = make_cfg(tmp_path, tokenizer='hf', tokenizer_path=path, vocab_size=448, seq_len=32)
    tokenizer = data.get_tokenizer(cfg)
    assert 0 not in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    found = []
    for split in ('train', 'validation'):
        rows_N4T = all_rows(data.eval_batches(cfg, tokenizer, split))
        found += reconstruct(rows_N4T, tokenizer)
    assert collections.Counter(found) == collections.Counter(docs)


def test_embedded_corpus_with_an_hf_tokenizer(tmp_path, data_dir, qwen_like):
    """The stdlib validation split through a byte-level BPE: target bytes add up to the files."""
    path, _ = qwen_like
    cfg = make_cfg(tmp_path, name='python_stdlib', data_dir=data_dir,
                   tokenizer='hf', tokenizer_path=path, vocab_size=512, seq_len=128,
                   batch_size=8, eval_batches=10**6)
    data.check_data(cfg)
    tokenizer = data.get_tokenizer(cfg)
    rows_N4T = all_rows(data.eval_batches(cfg, tokenizer, 'validation'))
    real = rows_N4T[:, 2] > 0
    lengths_V = tokenizer.byte_lengths()
    assert int(lengths_V[rows_N4T[:, 1]][real].sum()) == stdlib_validation_bytes()
