"""Tokenize and pack a split once into a cached [rows, 4, seq_len] array; serve batches by index.

Global batch i is a pure function of (dataset, tokenizer, seq_len, batch_size, seed, i): packing
is deterministic and Grain's index shuffle maps a position to a row without state. Process p of P
reads rows [p*B/P, (p+1)*B/P) of it, so the checkpointed data state is just the batch index.
"""
import collections
import concurrent.futures
import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np

from moejax.data import corpus, sources, text_files
from moejax.data import tokenizer as tokenizer_lib
from moejax.errors import ConfigError

FIELDS = ('inputs', 'targets', 'segment_ids', 'positions')
PACK_FORMAT = 'v1'           # bump when the packed layout changes: old caches are ignored
PACK_SEED = 0                # the fixed document order of packing (shuffling rows uses train.seed)
CHUNK_CHARS = 8_000_000      # documents are tokenized and packed this many characters at a time
MIN_SEQ_LEN = 8


# --------------------------------------------------------------------------------- packing


class Packer:
    """Greedy packing in document order: a stream of <= T (input, target) pairs stays whole in one
    row (starting a new row if it does not fit); a longer one fills the open row and runs on into
    the next rows, cut at row ends into pieces of at most T. Padding is only at row ends."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._open_3S = np.zeros((3, 0), np.int32)  # inputs, targets, document number (0 = pad)
        self._num_docs = 0

    def add(self, streams: list[np.ndarray]) -> np.ndarray:
        """Append token streams ([bos] + ids + [eos] each); return the completed rows [R, 4, T]."""
        T = self.seq_len
        pairs_D = np.array([len(s) - 1 for s in streams], np.int64)
        starts_D = np.empty_like(pairs_D)
        offset = self._open_3S.shape[1]
        for k, n in enumerate(pairs_D.tolist()):
            if n <= T and offset % T + n > T:
                offset += T - offset % T
            starts_D[k] = offset
            offset += n
        flat_3S = np.zeros((3, -(-offset // T) * T), np.int32)
        flat_3S[:, :self._open_3S.shape[1]] = self._open_3S
        if streams:
            before_D = np.cumsum(pairs_D) - pairs_D
            dest = np.repeat(starts_D - before_D, pairs_D) + np.arange(pairs_D.sum())
            flat_3S[0, dest] = np.concatenate([s[:-1] for s in streams])
            flat_3S[1, dest] = np.concatenate([s[1:] for s in streams])
            flat_3S[2, dest] = np.repeat(self._num_docs + 1 + np.arange(len(streams)), pairs_D)
        self._num_docs += len(streams)
        full = offset // T
        self._open_3S = flat_3S[:, full * T:offset]
        return _rows(flat_3S[:, :full * T].reshape(3, full, T))

    def finish(self) -> np.ndarray:
        """The open row, zero-padded, as [0 or 1, 4, T]."""
        used = self._open_3S.shape[1]
        flat_3T = np.zeros((3, self.seq_len), np.int32)
        flat_3T[:, :used] = self._open_3S
        self._open_3S = flat_3T[:, :0]
        return _rows(flat_3T[:, None, :])[:1 if used else 0]


def _rows(flat_3RT: np.ndarray) -> np.ndarray:
    """inputs, targets and document numbers -> [R, 4, T] with per-row segment ids and positions."""
    inputs_RT, targets_RT, doc_RT = flat_3RT
    T = doc_RT.shape[1]
    real_RT = doc_RT > 0
    first_RT = real_RT.copy()  # first slot of each piece: the row start or a new document
    first_RT[:, 1:] &= doc_RT[:, 1:] != doc_RT[:, :-1]
    segments_RT = np.cumsum(first_RT, axis=1) * real_RT
    col_T = np.arange(T)
    piece_start_RT = np.maximum.accumulate(np.where(first_RT, col_T, 0), axis=1)
    positions_RT = (col_T - piece_start_RT) * real_RT
    return np.stack([inputs_RT, targets_RT, segments_RT, positions_RT], axis=1)


def _text_chunks(docs: corpus.Documents):
    """(non-empty documents in the fixed PACK_SEED order, in lists of about CHUNK_CHARS; how
    many documents were read so far)."""
    order = np.random.default_rng(PACK_SEED).permutation(len(docs))
    chunk, chars = [], 0
    for start in range(0, len(order), 512):
        for text in docs.get(order[start:start + 512]):
            if text:
                chunk.append(text)
                chars += len(text)
        if chars >= CHUNK_CHARS:
            yield chunk, min(start + 512, len(order))
            chunk, chars = [], 0
    if chunk:
        yield chunk, len(order)


def _write_packed(docs, tokenizer, seq_len: int, directory: str, dtype, what: str) -> None:
    """Pack every document of a split into directory/rows.bin (+ meta.json), atomically,
    reporting progress as `what`."""
    bos, eos = np.int32([tokenizer.bos_id]), np.int32([tokenizer.eos_id])
    parent = os.path.dirname(directory)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-')
    packer, num_rows, num_targets = Packer(seq_len), 0, 0
    progress = corpus.Progress(what, len(docs), 'documents')
    try:
        with open(os.path.join(tmp, 'rows.bin'), 'wb') as f:
            for texts, read in _text_chunks(docs):
                ids = tokenizer_lib.encode_batch(tokenizer, texts)
                rows = packer.add([np.concatenate([bos, x, eos]) for x in ids])
                f.write(rows.astype(dtype).tobytes())
                num_rows += len(rows)
                num_targets += sum(len(x) + 1 for x in ids)
                progress.update(read, f', {num_targets:,} tokens')
            rows = packer.finish()
            f.write(rows.astype(dtype).tobytes())
            num_rows += len(rows)
        meta = {'num_rows': num_rows, 'seq_len': seq_len, 'dtype': np.dtype(dtype).name,
                'num_targets': num_targets, 'num_documents': len(docs), 'fields': FIELDS}
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; caches are shared
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete leftover, if any
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress.finish(f'{len(docs):,} documents, {num_targets:,} tokens in {num_rows:,} rows of '
                    f'{seq_len}')


def _tokenizer_identity(tokenizer) -> str:
    """A short name that changes whenever the ids a tokenizer produces could change."""
    known = getattr(tokenizer, 'fingerprint', None)
    if known:
        return known
    probe = repr([type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.bos_id,
                  tokenizer.eos_id, tokenizer.encode('Probe: héllo wörld ✓ 1234 def f(x):\n')])
    blob = probe.encode() + np.asarray(tokenizer.byte_lengths()).tobytes()
    return 'tok-' + hashlib.sha256(blob).hexdigest()[:16]


def packed_rows(cfg, tokenizer, split: str) -> np.ndarray:
    """The split packed to [num_rows, 4 (FIELDS), seq_len], memory-mapped from its cache."""
    seq_len = cfg.data.seq_len
    docs = sources.open_split(cfg, split)
    split_name = re.sub(r'[^A-Za-z0-9_.-]', '_', split)
    if split_name != split:  # e.g. 'train[:10%]': keep distinct slices apart
        split_name += '-' + hashlib.sha256(split.encode()).hexdigest()[:8]
    name = f'{split_name}-{_tokenizer_identity(tokenizer)}-T{seq_len}-{PACK_FORMAT}'
    directory = os.path.join(corpus.cache_dir(cfg, 'packed', docs.key), name)
    meta_path = os.path.join(directory, 'meta.json')
    if not os.path.exists(meta_path):
        with corpus.file_lock(directory):
            if not os.path.exists(meta_path):
                small = max(tokenizer.vocab_size, seq_len + 1) <= np.iinfo(np.uint16).max + 1
                _write_packed(docs, tokenizer, seq_len, directory, np.uint16 if small else np.int32,
                              f'packing {cfg.data.name} {split}')
    with open(meta_path) as f:
        meta = json.load(f)
    if meta['num_rows'] == 0:
        raise ConfigError('split', split, f'{cfg.data.name} has no non-empty documents in it')
    return np.memmap(os.path.join(directory, 'rows.bin'), dtype=meta['dtype'], mode='r',
                     shape=(meta['num_rows'], len(FIELDS), seq_len))


# --------------------------------------------------------------------------------- batches


def _shuffle_seed(seed: int) -> int:
    """A 32-bit Grain seed from train.seed, hashed: Grain shuffles epoch e with seed + e."""
    digest = hashlib.sha256(f'moejax/train/{seed}'.encode()).digest()
    return int.from_bytes(digest[:4], 'big')


class BatchSource:
    """Host-local batches by index: dicts of int32 [batch_size // process_count, seq_len] arrays.

    With a seed, rows are shuffled (differently each epoch) and repeated forever; without one, the
    first num_batches global batches in stored order, the last padded with empty rows.
    """

    def __init__(self, rows_N4T: np.ndarray, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1, seed: int | None = None, num_batches: int = 0):
        if batch_size % process_count:
            raise ConfigError('data.batch_size', batch_size,
                              f'must divide by the number of processes ({process_count})')
        if not 0 <= process_index < process_count:
            raise ValueError(f'process_index={process_index} not in [0, {process_count})')
        import grain  # 0.2 s (it imports orbax): only where batches are served
        self.rows_N4T = rows_N4T
        self.num_rows = len(rows_N4T)
        if seed is None:
            ds = grain.MapDataset.range(num_batches * batch_size)
        else:
            ds = grain.MapDataset.range(self.num_rows).shuffle(seed=_shuffle_seed(seed)).repeat()
        # Global batch i = positions [i*B, (i+1)*B); host p's share is run i*P + p of B/P rows.
        ds = ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=self._gather)
        self._ds = ds[process_index::process_count]

    def _gather(self, indices) -> dict[str, np.ndarray]:
        index_B = np.asarray(indices, np.int64)
        rows_B4T = np.zeros((len(index_B),) + self.rows_N4T.shape[1:], self.rows_N4T.dtype)
        real_B = index_B < self.num_rows  # beyond the split: an all-padding row
        rows_B4T[real_B] = self.rows_N4T[index_B[real_B]]
        return {name: rows_B4T[:, k].astype(np.int32) for k, name in enumerate(FIELDS)}

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f'batch {i} out of range [0, {len(self)})')
        return self._ds[int(i)]

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start: int = 0, prefetch: int = 2):
        """Yield batches start, start + 1, ..., each computed ahead in a background thread."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stop = len(self)
            pending = collections.deque()
            following = start
            while following < min(start + prefetch, stop):
                pending.append(pool.submit(self.__getitem__, following))
                following += 1
            while pending:
                batch = pending.popleft().result()
                if following < stop:
                    pending.append(pool.submit(self.__getitem__, following))
                    following += 1
                yield batch


def train_batches(cfg, tokenizer, *, process_index: int = 0,
                  process_count: int = 1) -> BatchSource:
    """Endless shuffled training batches (seeded by cfg.train.seed) of the train split."""
    return BatchSource(packed_rows(cfg, tokenizer, 'train'), batch_size=cfg.data.batch_size,
                       process_index=process_index, process_count=process_count,
                       seed=int(cfg.train.seed))


def eval_batches(cfg, tokenizer, split: str, *, process_index: int = 0,
                 process_count: int = 1) -> BatchSource:
    """The first cfg.data.eval_batches batches of a split (fewer if it is smaller), unshuffled."""
    rows_N4T = packed_rows(cfg, tokenizer, split)
    num = min(cfg.data.eval_batches, math.ceil(len(rows_N4T) / cfg.data.batch_size))
    return BatchSource(rows_N4T, batch_size=cfg.data.batch_size, process_index=process_index,
                       process_count=process_count, num_batches=num)


# ------------------------------------------------------------------------------ validation


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_data(cfg) -> None:
    """Fail fast (ConfigError naming key, value and what is allowed) before reading or compiling."""
    d = cfg.data
    name = d.get('name')
    _require(isinstance(name, str) and bool(name), 'data.name', name,
             'use python_stdlib, text_files, or a registered TFDS dataset name')
    if name == 'text_files':
        _require(d.text_format in text_files.TEXT_FORMATS, 'data.text_format', d.text_format,
                 "use 'files' (a document per file) or 'lines'")
        text_files.text_file_paths(cfg)
    elif name != 'python_stdlib':
        sources.tfds_builder(cfg)  # registered and prepared in data_dir
    kind, vocab = d.get('tokenizer'), d.get('vocab_size')
    _require(_is_int(vocab), 'data.vocab_size', vocab, 'must be an integer')
    tokenizer_lib.check_settings(kind, d.get('tokenizer_path'), vocab)
    seq_len, batch, evals = d.get('seq_len'), d.get('batch_size'), d.get('eval_batches')
    _require(_is_int(seq_len) and seq_len >= MIN_SEQ_LEN, 'data.seq_len', seq_len,
             f'must be an integer >= {MIN_SEQ_LEN}')
    _require(_is_int(batch) and batch >= 1, 'data.batch_size', batch, 'must be an integer >= 1')
    _require(_is_int(evals) and evals >= 1, 'data.eval_batches', evals, 'must be an integer >= 1')

