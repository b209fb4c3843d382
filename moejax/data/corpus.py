"""What every document source shares: where caches live, the train/validation split by a stable
hash, the `Documents` a source is opened as, and the progress lines of first-run preparation.

Sources (each in its own module): the embedded python_stdlib corpus (stdlib_corpus.py), local
text files (text_files.py) and any prepared TFDS dataset (sources.py, which opens them all). A
`Documents` is a random-access sequence of texts with a `key` that names its content, so
tokenizers and packed arrays built from it can be cached under data_dir.
"""
import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from typing import Callable, Sequence

VALIDATION_PER_MILLE = 50  # ~5% of documents (by a stable hash) form the validation split
TEXT_SPLITS = ('train', 'validation')
REPORT_SECONDS = 10  # preparation progress: at most one line this often (and the last)


# ---------------------------------------------------------------------------------- caches


def data_dir(cfg) -> str:
    """Where prepared datasets and moejax caches live: data.data_dir, or ~/tensorflow_datasets."""
    return os.path.abspath(os.path.expanduser(cfg.data.get('data_dir') or '~/tensorflow_datasets'))


def cache_dir(cfg, *parts: str) -> str:
    """A directory under data_dir/moejax_cache, created on demand."""
    path = os.path.join(data_dir(cfg), 'moejax_cache', *parts)
    os.makedirs(path, exist_ok=True)
    return path


def atomic_write(path: str, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it (temp file + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; caches are shared
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive lock on path + '.lock', so concurrent processes build a cache only once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.lock', 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_validation(relative_path: str) -> bool:
    """Stable split of a document by the sha256 of its path (and line): ~5% validation."""
    digest = hashlib.sha256(relative_path.encode('utf-8')).digest()
    return int.from_bytes(digest[:4], 'big') % 1000 < VALIDATION_PER_MILLE


def split_of(relative_path: str) -> str:
    return 'validation' if is_validation(relative_path) else 'train'


def validation_flags(keys: Sequence[str]) -> list[bool]:
    """is_validation for each key, made sure to leave neither split empty when there are two
    or more documents: a small corpus whose hashes all fall on one side gives the document with
    the smallest (or, for an empty train split, the largest) sha256 to the other side.
    Depends on the keys alone, so it is stable across runs and machines."""
    flags = [is_validation(k) for k in keys]
    if len(keys) >= 2 and len(set(flags)) == 1:
        digest = lambda i: hashlib.sha256(keys[i].encode('utf-8')).digest()
        pick = max if flags[0] else min
        flags[pick(range(len(keys)), key=digest)] = not flags[0]
    return flags


class Documents:
    """One split of a corpus: `len`, `get(indices) -> list[str]`, and a `key` naming its content.

    `length` may be a function, so that a cache hit (which needs only `key`) reads nothing.
    """

    def __init__(self, key: str, length: int | Callable[[], int],
                 fetch: Callable[[Sequence[int]], list[str]]):
        self.key, self._length, self._fetch = key, length, fetch

    def __len__(self) -> int:
        return self._length if isinstance(self._length, int) else self._length()

    def get(self, indices: Sequence[int]) -> list[str]:
        return self._fetch([int(i) for i in indices])


# -------------------------------------------------------------------------------- progress


def say(text: str) -> None:
    """One line of first-run preparation on the console (stdout, like training's progress)."""
    print(f'data: {text}', flush=True)


class Progress:
    """Progress of one preparation step over a known number of items: a line at most every
    REPORT_SECONDS with the count done and an ETA from the rate so far, and `finish` a line
    with how long it took."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.start = self.last = time.time()

    def update(self, done: int, detail: str = '') -> None:
        now = time.time()
        if now - self.last < REPORT_SECONDS or not 0 < done < self.total:
            return
        self.last = now
        eta = (now - self.start) / done * (self.total - done)
        say(f'{self.what}: {done:,}/{self.total:,} {self.unit}{detail}, ETA {eta:.0f}s')

    def finish(self, summary: str) -> None:
        say(f'{self.what}: {summary} (in {time.time() - self.start:.0f}s)')
