"""Tokenizers: raw UTF-8 bytes, SentencePiece with byte fallback, or a Hugging Face tokenizer.json.

Those moejax builds share ids 0 pad, 1 bos, 2 eos; a loaded one (SentencePiece or HF, e.g. from
an imported model) keeps its own ids, saved beside it in tokenizer_ids.json. All expose
`byte_lengths()` (UTF-8 bytes per id), which turns a summed cross-entropy into bits per byte, a
number comparable across tokenizers.
"""
import hashlib
import io
import itertools
import json
import os
from typing import Iterable, Iterator, Protocol

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from moejax.data import corpus, sources
from moejax.data import hf_tokenizer as hf
from moejax.data.hf_tokenizer import HFTokenizer
from moejax.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BYTE_OFFSET = 3                  # byte tokenizer: id = byte + 3
BYTE_VOCAB = BYTE_OFFSET + 256   # smallest byte vocabulary
MIN_SENTENCEPIECE_VOCAB = 300    # 4 special ids + 256 byte pieces + the corpus's characters
SAMPLE_CHARS = 4_000_000         # SentencePiece trains on this much of the train split
SAMPLE_SEED = 0                  # which documents form that sample
# Its training time, for the ETA: ~40 s for 4M characters on 2 busy cores (measured); the
# trainer's threads help up to about 4 cores.
SENTENCEPIECE_CORE_SECONDS_PER_MCHAR = 20
MAX_TRAIN_PIECE = 4096           # long documents are fed to the trainer in chunks of lines
SPACE = '\u2581'                 # SentencePiece's visible space
KINDS = ('sentencepiece', 'byte', 'hf', 'none')
NO_TOKENIZER = ('the run has no tokenizer (its model directory had no tokenizer files), so it '
                'cannot read or write text; forward and eval --tokens take token ids. To give it '
                'one, import the model again from a directory holding tokenizer.json or '
                'tokenizer.model, or fine-tune it with --config.data.tokenizer=hf '
                '--config.data.tokenizer_path=DIR')


class Tokenizer(Protocol):
    """What the pipeline and the evaluator need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def byte_lengths(self) -> np.ndarray: ...

    def save(self, directory: str) -> None: ...


class ByteTokenizer:
    """ids 0 pad, 1 bos, 2 eos, 3..258 the UTF-8 bytes; ids above 258 (if any) stay unused."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    filename = 'tokenizer.json'

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        if vocab_size < BYTE_VOCAB:
            raise ConfigError('data.vocab_size', vocab_size,
                              f'the byte tokenizer needs >= {BYTE_VOCAB}')
        self.vocab_size = vocab_size
        self.fingerprint = 'byte'

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + BYTE_OFFSET

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        ids_N = np.asarray(ids, np.int64).reshape(-1)
        keep = (ids_N >= BYTE_OFFSET) & (ids_N < BYTE_VOCAB)
        return (ids_N[keep] - BYTE_OFFSET).astype(np.uint8).tobytes().decode('utf-8', 'replace')

    def byte_lengths(self) -> np.ndarray:
        lengths_V = np.zeros(self.vocab_size, np.int32)
        lengths_V[BYTE_OFFSET:BYTE_VOCAB] = 1
        return lengths_V

    def save(self, directory: str) -> None:
        corpus.atomic_write(os.path.join(directory, self.filename),
                            json.dumps({'type': 'byte', 'vocab_size': self.vocab_size}).encode())


class SentencePieceTokenizer:
    """A SentencePiece model, decoded via a byte table. Trained here (strict): pad 0, bos 1,
    eos 2, unk 3, byte fallback. Loaded (e.g. Mixtral's: unk 0, bos 1, eos 2, no pad): its own
    ids, gaps filled as in hf_tokenizer.choose_ids (no pad -> eos), or the ids given.

    The literal character U+2581 would decode as a space, so `encode` spells it as byte pieces;
    with that, decode(encode(text)) == text for every string (for models trained here; a loaded
    model that normalizes text or lacks byte pieces round-trips only what it can represent).
    """

    filename = 'tokenizer.model'

    def __init__(self, model_proto: bytes, vocab_size: int | None = None, source: str = '', *,
                 ids: dict | None = None, hf_dir: str | None = None, strict: bool = False):
        self.model_proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError, protobuf DecodeError
            raise ConfigError('data.tokenizer_path', source, 'is not a SentencePiece model '
                              f'({str(e).splitlines()[0][:120]})') from None
        size = self._sp.get_piece_size()
        own = [self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()]
        if strict and own != [PAD_ID, BOS_ID, EOS_ID]:
            raise ConfigError('data.tokenizer_path', source, f'the model has pad/bos/eos ids '
                              f'{own}; moejax needs 0/1/2 (pad_id=0 bos_id=1 eos_id=2)')
        if vocab_size is not None and vocab_size < size:
            raise ConfigError('data.vocab_size', vocab_size,
                              f'must be >= {size}, the SentencePiece model\'s vocabulary')
        self.vocab_size = size if vocab_size is None else vocab_size
        self.ids = hf.check_ids(ids or self._choose_ids(own, hf_dir), size, source)
        self.pad_id, self.bos_id, self.eos_id = (self.ids[f'{n}_id'] for n in hf.ID_NAMES)
        digest = hashlib.sha256(model_proto)
        if [self.pad_id, self.bos_id, self.eos_id] != [PAD_ID, BOS_ID, EOS_ID]:
            digest.update(json.dumps(self.ids, sort_keys=True).encode())  # ids shape the rows
        self.fingerprint = 'sp-' + digest.hexdigest()[:16]
        self._piece_bytes = [self._bytes_of(i) for i in range(size)]
        self._space_ids = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in SPACE.encode()]
        spec = sentencepiece_model_pb2.ModelProto.FromString(model_proto).normalizer_spec
        self._drop_leading_space = spec.add_dummy_prefix  # as SentencePiece's own decoder does

    def _token_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk: tell them apart
        return i if self._sp.id_to_piece(i) == piece else None

    def _choose_ids(self, own: list[int], hf_dir: str | None) -> dict:
        """The HF files' ids (if hf_dir), else the model's own, gaps filled by choose_ids."""
        size = self._sp.get_piece_size()
        declared = hf.declared_ids(hf_dir, self._token_to_id, size) if hf_dir else {}
        for name, i in zip(hf.ID_NAMES, own):
            if declared.get(name) is None and i >= 0:
                declared[name] = i
        control = [i for i in range(size) if self._sp.is_control(i)]
        return hf.choose_ids(declared, self._token_to_id, control)

    @classmethod
    def from_path(cls, path: str, vocab_size: int | None = None) -> 'SentencePieceTokenizer':
        """From a .model file or a HF model directory holding tokenizer.model; ids from the HF
        files beside it (or a tokenizer_ids.json there, as saved in a moejax workdir)."""
        hf_dir, proto = hf.read_file(path, cls.filename, 'give an existing SentencePiece '
                                     '.model, or None to train one')
        return cls(proto, vocab_size, path, ids=hf.read_ids(hf_dir), hf_dir=hf_dir)

    def token_text(self, i: int) -> str | None:
        """The piece's spelling in the model (None outside the vocabulary)."""
        return self._sp.id_to_piece(i) if 0 <= i < self._sp.get_piece_size() else None

    def _bytes_of(self, i: int) -> bytes:
        sp = self._sp
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            return b''
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE, ' ').encode('utf-8')

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many texts at once (the SentencePiece library uses several threads)."""
        parts_per_text = [text.split(SPACE) for text in texts]
        encoded = iter(self._sp.encode([p for parts in parts_per_text for p in parts],
                                       num_threads=os.cpu_count() or 1))
        out = []
        for parts in parts_per_text:
            ids = [next(encoded)]
            for _ in parts[1:]:
                ids += [self._space_ids, next(encoded)]
            out.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32))
        return out

    def decode(self, ids) -> str:
        table = self._piece_bytes
        text = b''.join(table[i] for i in np.asarray(ids, np.int64).reshape(-1).tolist()
                        if 0 <= i < len(table)).decode('utf-8', 'replace')
        return text[1:] if self._drop_leading_space and text.startswith(' ') else text

    def byte_lengths(self) -> np.ndarray:
        lengths_V = np.zeros(self.vocab_size, np.int32)
        lengths_V[:len(self._piece_bytes)] = [len(b) for b in self._piece_bytes]
        return lengths_V

    def save(self, directory: str) -> None:
        corpus.atomic_write(os.path.join(directory, self.filename), self.model_proto)
        hf.write_ids(directory, self.ids)


def _training_chunks(texts: Iterable[str]) -> Iterator[str]:
    """Documents cut at line ends into pieces of at most ~MAX_TRAIN_PIECE characters."""
    for text in texts:
        chunk = ''
        for line in text.splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > MAX_TRAIN_PIECE:
                yield chunk
                chunk = ''
            chunk += line
        if chunk:
            yield chunk


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """Train a unigram model that keeps text verbatim (no normalization, byte fallback)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_chunks(texts), model_writer=model,
            vocab_size=vocab_size, model_type='unigram', hard_vocab_limit=False,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, byte_fallback=True,
            normalization_rule_name='identity', remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=0.9995, max_sentence_length=1 << 16, input_sentence_size=0,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise ConfigError('data.vocab_size', vocab_size, 'SentencePiece could not train: '
                          + str(e).splitlines()[0][-160:]) from None
    return model.getvalue()


def _training_sample(cfg) -> Iterator[str]:
    """About SAMPLE_CHARS of train-split documents, in a fixed shuffled order."""
    docs = sources.open_split(cfg, 'train')
    order = np.random.default_rng(SAMPLE_SEED).permutation(len(docs))
    total = 0
    for start in range(0, len(order), 256):
        for text in docs.get(order[start:start + 256]):
            yield text
            total += len(text)
            if total >= SAMPLE_CHARS:
                return


def _cached_sentencepiece(cfg) -> SentencePieceTokenizer:
    """Load the model cached for (dataset, vocab_size), or train and cache it atomically."""
    key = sources.open_split(cfg, 'train').key
    path = os.path.join(corpus.cache_dir(cfg, 'tokenizers'), f'{key}-sp{cfg.data.vocab_size}.model')
    with corpus.file_lock(path):
        if not os.path.exists(path):
            cores = os.cpu_count() or 1
            eta = SAMPLE_CHARS / 1e6 * SENTENCEPIECE_CORE_SECONDS_PER_MCHAR / min(cores, 4)
            corpus.say(f'training a SentencePiece tokenizer ({cfg.data.vocab_size:,} pieces) on '
                       f'~{SAMPLE_CHARS / 1e6:.0f}M characters of the {cfg.data.name} train '
                       f'split, once (cached in {os.path.dirname(path)}); ETA ~{eta:.0f}s on '
                       f'{cores} cores')
            progress = corpus.Progress('tokenizer', 1, 'model')
            model = train_sentencepiece(_training_sample(cfg), cfg.data.vocab_size)
            corpus.atomic_write(path, model)
            progress.finish('trained')
        with open(path, 'rb') as f:
            return SentencePieceTokenizer(f.read(), cfg.data.vocab_size, path, strict=True)


def _json_kind(path: str) -> str:
    """'byte' or 'hf': what a saved tokenizer.json holds, told apart by its content."""
    if os.path.getsize(path) > 4096:  # a byte tokenizer's file is one short line; HF's is big
        return 'hf'                  # (and loading it checks that it really is)
    found = hf.read_json(path, '--workdir')
    if found.get('type') == 'byte':
        return 'byte'
    if 'model' in found:
        return 'hf'
    raise ConfigError('--workdir', path, 'is neither a moejax byte tokenizer nor a Hugging Face '
                      'tokenizer.json')


def saved_kind(directory: str) -> str | None:
    """'hf', 'sentencepiece' or 'byte' if directory holds a saved tokenizer, else None.

    tokenizer.json is a byte tokenizer's {"type": "byte", ...} or a HF file: read to tell."""
    json_path = os.path.join(directory, HFTokenizer.filename)
    json_kind = _json_kind(json_path) if os.path.isfile(json_path) else None
    if json_kind == 'hf':
        return 'hf'
    if os.path.isfile(os.path.join(directory, SentencePieceTokenizer.filename)):
        return 'sentencepiece'
    return json_kind


def load_tokenizer(directory: str, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer saved in directory by `save`, with its saved ids (vocab_size None: the
    tokenizer's own size)."""
    kind = saved_kind(directory)
    if kind == 'byte':
        return ByteTokenizer(BYTE_VOCAB if vocab_size is None else vocab_size)
    if kind is None:
        raise ConfigError('--workdir', directory, 'holds no tokenizer (tokenizer.json or '
                          'tokenizer.model)')
    cls = HFTokenizer if kind == 'hf' else SentencePieceTokenizer
    path = os.path.join(directory, cls.filename)
    with open(path, 'rb') as f:
        content = f.read()
    ids = hf.read_ids(directory)
    if kind == 'hf':
        return HFTokenizer(content, vocab_size, ids=ids, source=path)
    return SentencePieceTokenizer(content, vocab_size, path, ids=ids)


def _given_path(cfg) -> str:
    path = cfg.data.get('tokenizer_path')
    if not path:
        raise ConfigError('data.tokenizer_path', path, "data.tokenizer='hf' needs a "
                          'tokenizer.json or a Hugging Face model directory that holds one')
    return path


def get_tokenizer(cfg, workdir: str | None = None, *, save: bool = True) -> Tokenizer:
    """The run's tokenizer: the one saved in workdir if any (resume), else built and saved
    there (unless save is False: readers write nothing into a run's directory)."""
    kind, vocab_size = cfg.data.tokenizer, cfg.data.vocab_size
    saved = saved_kind(workdir) if workdir else None
    if saved is not None:
        if saved != kind:
            raise ConfigError('data.tokenizer', kind, f'{workdir} holds a {saved} tokenizer '
                              f'that a resumed run must keep; set data.tokenizer={saved} '
                              'or use a new workdir')
        return load_tokenizer(workdir, vocab_size)
    if kind == 'none':
        raise ConfigError('data.tokenizer', kind, NO_TOKENIZER)
    if kind == 'byte':
        tokenizer = ByteTokenizer(vocab_size)
    elif kind == 'hf':
        tokenizer = HFTokenizer.from_path(_given_path(cfg), vocab_size)
    elif kind == 'sentencepiece' and cfg.data.get('tokenizer_path'):
        tokenizer = SentencePieceTokenizer.from_path(cfg.data.tokenizer_path, vocab_size)
    elif kind == 'sentencepiece':
        tokenizer = _cached_sentencepiece(cfg)
    else:
        raise ConfigError('data.tokenizer', kind, 'use one of: ' + ', '.join(KINDS))
    if workdir and save:
        tokenizer.save(workdir)
    return tokenizer


def check_settings(kind, path, vocab_size: int) -> None:
    """Fail fast on data.tokenizer, tokenizer_path and vocab_size, before reading any data.

    'hf' without a path is left to get_tokenizer: the workdir may already hold one."""
    if kind not in KINDS:
        raise ConfigError('data.tokenizer', kind, 'use one of: ' + ', '.join(KINDS))
    if kind == 'none':
        raise ConfigError('data.tokenizer', kind, NO_TOKENIZER)
    if kind == 'byte':
        if vocab_size < BYTE_VOCAB:
            raise ConfigError('data.vocab_size', vocab_size, f'the byte tokenizer needs >= '
                              f'{BYTE_VOCAB} (3 special ids + 256 bytes)')
    elif path:
        (HFTokenizer if kind == 'hf' else SentencePieceTokenizer).from_path(path, vocab_size)
    elif kind == 'sentencepiece' and vocab_size < MIN_SENTENCEPIECE_VOCAB:
        raise ConfigError('data.vocab_size', vocab_size, 'a SentencePiece vocabulary needs >= '
                          f'{MIN_SENTENCEPIECE_VOCAB} (4 special ids + 256 byte pieces + '
                          'characters)')


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Encode texts to int32 arrays, using a tokenizer's fast batch path when it has one."""
    if hasattr(tokenizer, 'encode_batch'):
        return tokenizer.encode_batch(texts)
    if hasattr(tokenizer, 'encode_array'):
        return [tokenizer.encode_array(t) for t in texts]
    return [np.asarray(tokenizer.encode(t), np.int32) for t in texts]
