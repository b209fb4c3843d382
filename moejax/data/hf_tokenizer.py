"""Hugging Face `tokenizer.json` files (the `tokenizers` library) as moejax tokenizers.

An imported model keeps its own tokenizer. The pipeline adds bos/eos around each document
itself, so `encode` adds nothing, and special-token strings inside a document stay plain text.
Which ids serve as bos/eos/pad comes from the HF files beside the tokenizer (`declared_ids`),
gaps are filled by `choose_ids`, and the choice is saved in `tokenizer_ids.json`, so a workdir
reloads the same ids without the HF directory.
"""
import functools
import hashlib
import json
import os
import re
from typing import Callable

import numpy as np
import tokenizers

from moejax.data import corpus
from moejax.errors import ConfigError

FILENAME = 'tokenizer.json'
IDS_FILENAME = 'tokenizer_ids.json'
ID_NAMES = ('pad', 'bos', 'eos')
# Used when no HF config file names a token: the spellings of well-known model families.
KNOWN_NAMES = {
    'bos': ('<s>', '<|begin_of_text|>', '<bos>', '<|startoftext|>',
            '<｜begin▁of▁sentence｜>'),
    'eos': ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '<｜end▁of▁sentence｜>'),
    'pad': ('<pad>', '<|pad|>', '[PAD]'),
}
BYTE_PIECE = re.compile(r'<0x([0-9A-Fa-f]{2})>')


# ------------------------------------------------------------------------- bos / eos / pad


def read_json(path: str, key: str = 'data.tokenizer_path') -> dict:
    """A JSON object from path; {} if the file is absent; ConfigError naming it if unreadable."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, 'rb') as f:
            found = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(key, path, f'is not readable JSON ({str(e).splitlines()[0][:100]})'
                          ) from None
    return found if isinstance(found, dict) else {}


def _token_id(token, token_to_id: Callable) -> int | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}; or null."""
    if isinstance(token, dict):
        token = token.get('content')
    return token_to_id(token) if isinstance(token, str) else None


def _as_id(value) -> int | None:
    """config.json's *_token_id: an int, a list (Llama 3's eos: the first one), or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def declared_ids(hf_dir: str, token_to_id: Callable, size: int) -> dict:
    """{'pad'|'bos'|'eos': id or None} as the HF files name them: tokenizer_config.json's token
    strings first (the tokenizer's own view), then config.json's, then generation_config.json's
    ids. Ids outside the tokenizer's [0, size) count as unnamed."""
    token_config = read_json(os.path.join(hf_dir, 'tokenizer_config.json'))
    model_configs = [read_json(os.path.join(hf_dir, name))
                     for name in ('config.json', 'generation_config.json')]
    found = {}
    for name in ID_NAMES:
        candidates = [_token_id(token_config.get(f'{name}_token'), token_to_id)]
        candidates += [_as_id(c.get(f'{name}_token_id')) for c in model_configs]
        found[name] = next((i for i in candidates if i is not None and 0 <= i < size), None)
    return found


def choose_ids(declared: dict, token_to_id: Callable, special_ids: list[int]) -> dict:
    """Fill in the ids the HF files leave open, never failing; 'derived' lists the filled ones.

    An unnamed id is first looked up by a well-known spelling (KNOWN_NAMES). Then: no bos (Qwen
    has none) -> eos, the document separator HF users pick; no eos -> bos; neither -> the lowest
    special token, else id 0; no pad -> eos (HF users' pad_token = eos_token; padded slots are
    masked by segment ids, so any valid id serves).
    """
    found = dict(declared)
    for name in ID_NAMES:
        if found.get(name) is None:
            spelled = (token_to_id(s) for s in KNOWN_NAMES[name])
            found[name] = next((i for i in spelled if i is not None), None)
    derived = [name for name in ID_NAMES if found[name] is None]
    if found['bos'] is None and found['eos'] is None:
        found['eos'] = min(special_ids, default=0)
    found['bos'] = found['eos'] if found['bos'] is None else found['bos']
    found['eos'] = found['bos'] if found['eos'] is None else found['eos']
    found['pad'] = found['eos'] if found['pad'] is None else found['pad']
    ids = {f'{name}_id': int(found[name]) for name in ID_NAMES}
    ids['derived'] = derived
    return ids


def check_ids(ids: dict, size: int, source: str) -> dict:
    """ids as saved in tokenizer_ids.json: each of pad/bos/eos an int in [0, size)."""
    for name in ID_NAMES:
        value = ids.get(f'{name}_id')
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size):
            raise ConfigError(f'{source} {name}_id', value, f'must be an id in [0, {size})')
    derived = ids.get('derived')
    derived = [d for d in derived if d in ID_NAMES] if isinstance(derived, list) else []
    return {**{f'{n}_id': ids[f'{n}_id'] for n in ID_NAMES}, 'derived': derived}


def read_file(path: str, filename: str, fix: str) -> tuple[str, bytes]:
    """(the directory, the bytes) of a tokenizer file given as its path or as the directory
    holding `filename`; ConfigError naming data.tokenizer_path, with `fix`, when it is missing."""
    full = os.path.expanduser(path)
    hf_dir, file = (full, os.path.join(full, filename)) if os.path.isdir(full) else (
        os.path.dirname(full), full)
    if not os.path.isfile(file):
        raise ConfigError('data.tokenizer_path', path, f'no such file; {fix}')
    with open(file, 'rb') as f:
        return hf_dir, f.read()


def read_ids(directory: str) -> dict | None:
    """The ids saved beside a tokenizer in directory, or None (then they are chosen again)."""
    path = os.path.join(directory, IDS_FILENAME)
    return read_json(path, '--workdir') if os.path.isfile(path) else None


def write_ids(directory: str, ids: dict) -> None:
    corpus.atomic_write(os.path.join(directory, IDS_FILENAME),
                        json.dumps(ids, indent=1, sort_keys=True).encode())


# ------------------------------------------------------------------------------ byte table


@functools.cache
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, ...) for chr(256 + k) in byte order, so ' ' is 'Ġ'."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _components(node):
    """Every {"type": ...} dict nested in a normalizer/pre_tokenizer/decoder spec."""
    if isinstance(node, dict):
        if 'type' in node:
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


def _model_pieces(model: dict) -> dict[int, str]:
    """id -> piece of the model's own vocabulary (BPE/WordPiece/WordLevel dict, Unigram list)."""
    vocab = model.get('vocab') or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        return {i: entry[0] for i, entry in enumerate(vocab)}
    return {i: piece for piece, i in vocab.items()}


def piece_bytes(spec: dict, added: dict, size: int) -> list[bytes]:
    """The UTF-8 bytes each id stands for: byte-level pieces through the GPT-2 table, `<0xNN>`
    byte-fallback pieces as one byte, the metaspace as a space; special tokens as nothing."""
    model = spec.get('model') or {}
    parts = [spec.get(k) for k in ('normalizer', 'pre_tokenizer', 'decoder')]
    kinds = {c['type']: c for c in _components(parts)}
    byte_level = 'ByteLevel' in kinds
    space = kinds.get('Metaspace', {}).get('replacement', '\u2581')
    fallback = bool(model.get('byte_fallback'))
    prefix = model.get('continuing_subword_prefix') if model.get('type') == 'WordPiece' else None
    decoder = gpt2_byte_decoder()
    table = [b''] * size
    for i, piece in _model_pieces(model).items():
        if not 0 <= i < size:
            continue
        if byte_level and all(c in decoder for c in piece):
            table[i] = bytes(decoder[c] for c in piece)
        elif fallback and BYTE_PIECE.fullmatch(piece):
            table[i] = bytes([int(piece[3:5], 16)])
        else:
            if prefix and piece.startswith(prefix):
                piece = piece[len(prefix):]
            table[i] = piece.replace(space, ' ').encode('utf-8')
    unknown = model.get('unk_id')  # Unigram names its unknown piece by id, the others by text
    if isinstance(model.get('unk_token'), str) and isinstance(model.get('vocab'), dict):
        unknown = model['vocab'].get(model['unk_token'])
    if isinstance(unknown, int) and 0 <= unknown < size:
        table[unknown] = b''
    for i, token in added.items():  # added tokens are stored as their text, not as pieces
        table[i] = b'' if token.special else token.content.encode('utf-8')
    return table


# ------------------------------------------------------------------------------- tokenizer


class HFTokenizer:
    """A Hugging Face tokenizer.json with moejax's tokenizer protocol (see tokenizer.Tokenizer).

    vocab_size may exceed the tokenizer's size (HF models often pad their embeddings); ids
    beyond it decode to nothing. `fingerprint` hashes the file and the chosen ids, which both
    decide the packed rows.
    """

    filename = FILENAME

    def __init__(self, file_bytes: bytes, vocab_size: int | None = None, *,
                 ids: dict | None = None, hf_dir: str | None = None, source: str = FILENAME):
        self.file_bytes = file_bytes
        try:
            self.spec = json.loads(file_bytes)
            self._tok = tokenizers.Tokenizer.from_str(file_bytes.decode('utf-8'))
        except Exception as e:  # ValueError, UnicodeDecodeError, the library's Exception
            raise ConfigError('data.tokenizer_path', source, 'is not a Hugging Face '
                              f'tokenizer.json ({str(e).splitlines()[0][:100]})') from None
        self._tok.encode_special_tokens = True  # a document's literal '<s>' is text
        self._added = self._tok.get_added_tokens_decoder()
        self.size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if vocab_size is not None and vocab_size < self.size:
            raise ConfigError('data.vocab_size', vocab_size,
                              f'must be >= {self.size}, the size of {source}')
        self.vocab_size = self.size if vocab_size is None else vocab_size
        if ids is None:
            declared = declared_ids(hf_dir, self._tok.token_to_id, self.size) if hf_dir else {}
            special = sorted(i for i, t in self._added.items() if t.special)
            ids = choose_ids(declared, self._tok.token_to_id, special)
        self.ids = check_ids(ids, self.size, source)
        self.pad_id, self.bos_id, self.eos_id = (self.ids[f'{n}_id'] for n in ID_NAMES)
        blob = file_bytes + json.dumps(self.ids, sort_keys=True).encode()
        self.fingerprint = 'hf-' + hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_path(cls, path: str, vocab_size: int | None = None) -> 'HFTokenizer':
        """From a tokenizer.json or a HF model directory; ids from the HF files beside it (or a
        tokenizer_ids.json there, as saved in a moejax workdir)."""
        hf_dir, file_bytes = read_file(path, FILENAME, 'give a tokenizer.json or a Hugging '
                                       'Face model directory that holds one')
        return cls(file_bytes, vocab_size, ids=read_ids(hf_dir), hf_dir=hf_dir, source=path)

    def token_text(self, i: int) -> str | None:
        """The token's spelling in the file (None outside the vocabulary)."""
        return self._tok.id_to_token(i)

    @functools.cached_property
    def _piece_bytes(self) -> list[bytes]:
        return piece_bytes(self.spec, self._added, self.size)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many texts at once (the tokenizers library uses several threads)."""
        found = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in found]

    def decode(self, ids) -> str:
        """Text of ids without special tokens: the file's own decoder if it has one, else the
        byte table (a decoder-less byte-level file would otherwise show 'Ġ' for spaces)."""
        kept = [i for i in np.asarray(ids, np.int64).reshape(-1).tolist() if 0 <= i < self.size]
        if self._tok.decoder is not None:
            return self._tok.decode(kept, skip_special_tokens=True)
        return b''.join(self._piece_bytes[i] for i in kept).decode('utf-8', 'replace')

    def byte_lengths(self) -> np.ndarray:
        lengths_V = np.zeros(self.vocab_size, np.int32)
        lengths_V[:self.size] = [len(b) for b in self._piece_bytes]
        return lengths_V

    def save(self, directory: str) -> None:
        corpus.atomic_write(os.path.join(directory, FILENAME), self.file_bytes)
        write_ids(directory, self.ids)


def byte_tokenizer_json() -> bytes:
    """moejax's byte tokenizer (0 pad, 1 bos, 2 eos, 3 + b the byte b) as a HF tokenizer.json:
    a BPE without merges whose every character falls back to its `<0xNN>` byte pieces."""
    vocab = {'<pad>': 0, '<s>': 1, '</s>': 2} | {f'<0x{b:02X}>': 3 + b for b in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.add_special_tokens(['<pad>', '<s>', '</s>'])
    tok.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.ByteFallback(),
                                                tokenizers.decoders.Fuse()])
    return tok.to_str().encode()
