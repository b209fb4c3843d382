"""Document sources: the embedded python_stdlib TFDS dataset, local text files, any prepared TFDS.

Every source is opened as `Documents`, a random-access sequence of texts with a `key` that names
its content, so tokenizers and packed arrays built from it can be cached under data_dir.
"""
import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
import tempfile
from typing import Callable, Sequence

import tensorflow_datasets as tfds
from etils import epath

from moejax.errors import ConfigError

tfds.disable_progress_bar()

VALIDATION_PER_MILLE = 50  # ~5% of documents (by a stable hash) form the validation split
BINARY_PROBE_BYTES = 8192  # text_files: a NUL byte in this many first bytes marks a binary file
SMALL_CORPUS_BYTES = 1 << 20  # a 'lines' corpus this small is split when opened (it is cheap)
TEXT_SPLITS = ('train', 'validation')


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


# --------------------------------------------------------------------------- python_stdlib


def stdlib_sources() -> list[tuple[str, str]]:
    """(path relative to the stdlib root, absolute path) of the interpreter's stdlib .py files."""
    root = sysconfig.get_paths()['stdlib']
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs
                            if d not in ('site-packages', 'dist-packages', '__pycache__'))
        for name in sorted(files):
            if name.endswith('.py'):
                path = os.path.join(directory, name)
                found.append((os.path.relpath(path, root), path))
    return found


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The running interpreter's standard-library sources, one example per .py file.

    A real ~30 MB corpus present on every machine, so the default config needs no download.
    Files that are not valid UTF-8 (a few deliberate test fixtures) are left out.
    """

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    # TFDS derives code_path from the package via importlib_resources, absent here: set it.
    code_path = epath.Path(__file__)

    def _info(self):
        # dataset_info_from_configs() needs a TFDS package dir; this builder lives in moejax.
        return tfds.core.DatasetInfo(
            builder=self,
            description='Python standard library .py sources; validation = ~5% by path hash.',
            features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                                 'path': tfds.features.Text()}),
            homepage='https://docs.python.org/3/library/')

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in TEXT_SPLITS}

    def _generate_examples(self, split):
        for relative, path in stdlib_sources():
            if split_of(relative) != split:
                continue
            with open(path, 'rb') as f:
                raw = f.read()
            try:
                text = raw.decode('utf-8')
            except UnicodeDecodeError:
                continue
            yield relative, {'text': text, 'path': relative}


def prepared_stdlib_builder(cfg) -> tfds.core.DatasetBuilder:
    """The python_stdlib builder, prepared in data_dir (as array_record) on first use."""
    make = lambda: PythonStdlib(data_dir=data_dir(cfg), file_format='array_record')
    with _quiet_absl():
        builder = make()
        if not builder.is_prepared():
            with file_lock(os.path.join(data_dir(cfg), 'python_stdlib')):
                builder = make()
                if not builder.is_prepared():
                    builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _quiet_absl():
    """Hide TFDS's warnings about its own half-written folders while it prepares a dataset."""
    logger = logging.getLogger('absl')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------ text_files


def text_file_paths(cfg) -> list[str]:
    """Files matched by cfg.data.text_glob, sorted (ConfigError if none)."""
    pattern = cfg.data.get('text_glob') or ''
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise ConfigError('data.text_glob', pattern,
                          'matches no files; give a glob of UTF-8 text files, '
                          'e.g. /corpus/**/*.txt')
    return paths


def _relative_paths(paths: list[str]) -> list[str]:
    """Paths relative to their common directory, so moving the corpus keeps its split."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def _read_text(path: str) -> str:
    with open(path, 'rb') as f:
        return f.read().decode('utf-8', errors='replace')


def is_binary(path: str) -> bool:
    """A NUL byte in the first BINARY_PROBE_BYTES marks a binary file (git's rule)."""
    with open(path, 'rb') as f:
        return b'\0' in f.read(BINARY_PROBE_BYTES)


def _is_utf8(path: str) -> bool:
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        raw.decode('utf-8')
        return True
    except UnicodeDecodeError:
        return False


@functools.cache
def _warn_about_files(pattern: str, binary: tuple[str, ...], texts: tuple[str, ...]) -> None:
    """Reads the text files once per process; one warning line counts the binary files left
    out and the files decoded with replacement characters (not valid UTF-8)."""
    undecodable = [p for p in texts if not _is_utf8(p)]
    if binary or undecodable:
        examples = ', '.join(os.path.basename(p) for p in (binary[:1] + tuple(undecodable[:1])))
        print(f'moejax: warning: data.text_glob={pattern!r}: skipped {len(binary)} binary '
              f'file(s) (NUL bytes); {len(undecodable)} file(s) are not valid UTF-8 and are read '
              f'with replacement characters (e.g. {examples})', file=sys.stderr, flush=True)


def _text_files_key(cfg, paths: list[str], extras: dict) -> str:
    """Names the corpus by its files' paths, sizes and mtimes: edited files invalidate caches.
    `extras` (binary files left out, split moves) enter only when present, so the caches of a
    corpus they do not concern keep their names."""
    stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    blob = json.dumps([cfg.data.text_format, stats] + ([extras] if extras else [])).encode()
    return 'text_files-' + hashlib.sha256(blob).hexdigest()[:16]


def open_text_files(cfg, split: str) -> Documents:
    """text_files split: one document per file, or per non-empty line ('lines'), by path hash.

    Binary files are left out; one warning line counts them and the files that are not UTF-8
    (read with replacement characters) when the corpus is first read.
    """
    if split not in TEXT_SPLITS:
        raise ConfigError('split', split, f'text_files has the splits {", ".join(TEXT_SPLITS)}')
    all_paths = text_file_paths(cfg)
    # Relative to the common directory of every match, so leaving a file out moves no other.
    files = list(zip(all_paths, _relative_paths(all_paths)))
    binary = {p for p in all_paths if is_binary(p)}
    usable = [(p, r) for p, r in files if p not in binary]
    if not usable:
        raise ConfigError('data.text_glob', cfg.data.text_glob, f'all {len(all_paths)} matched '
                          'file(s) are binary (NUL bytes); give a glob of UTF-8 text files')
    extras = {'binary': [r for p, r in files if p in binary]} if binary else {}
    warn = lambda: _warn_about_files(cfg.data.text_glob, tuple(sorted(binary)),
                                     tuple(p for p, _ in usable))

    def nonempty(items: list) -> list:
        if not items:
            raise ConfigError('data.text_glob', cfg.data.text_glob,
                              f'the {split} split is empty: documents go to validation by a '
                              f'hash of their path (~5%, at least one of two or more) and '
                              f'{len(usable)} usable file(s) matched; add documents or use '
                              'data.text_format=lines')
        return items

    if cfg.data.text_format == 'files':
        flags = validation_flags([r for _, r in usable])
        moved = [r for (_, r), flag in zip(usable, flags) if flag != is_validation(r)]
        extras.update({'moved': moved} if moved else {})
        chosen = nonempty([p for (p, _), flag in zip(usable, flags)
                           if flag == (split == 'validation')])

        def fetch(indices):
            warn()
            return [_read_text(chosen[i]) for i in indices]
        return Documents(_text_files_key(cfg, all_paths, extras), len(chosen), fetch)

    @functools.cache
    def lines() -> dict:  # read only when a cache is built (or the corpus is small)
        warn()
        return _split_lines(usable)

    if sum(os.path.getsize(p) for p, _ in usable) < SMALL_CORPUS_BYTES and lines()['moved']:
        extras['moved'] = lines()['moved']  # a large corpus always has validation lines
    chosen = lambda: nonempty(lines()[split])
    return Documents(_text_files_key(cfg, all_paths, extras), lambda: len(chosen()),
                     lambda indices: [chosen()[i] for i in indices])


def _split_lines(usable: list[tuple[str, str]]) -> dict:
    """{'train': lines, 'validation': lines, 'moved': keys} of the non-empty lines of the
    files, each split by the hash of 'relative_path:line_number'."""
    keys, texts = [], []
    for path, rel in usable:
        for number, line in enumerate(_read_text(path).split('\n')):
            line = line.removesuffix('\r')
            if line.strip():
                keys.append(f'{rel}:{number}')
                texts.append(line)
    flags = validation_flags(keys)
    return {'validation': [t for t, flag in zip(texts, flags) if flag],
            'train': [t for t, flag in zip(texts, flags) if not flag],
            'moved': [k for k, flag in zip(keys, flags) if flag != is_validation(k)]}


# ------------------------------------------------------------------------------------ TFDS


def check_tfds_name(name: str) -> None:
    """ConfigError unless name is a registered TFDS dataset (config/version suffixes allowed)."""
    base = name.split('/')[0].split(':')[0]
    try:
        tfds.builder_cls(base)
    except Exception:  # DatasetNotFoundError, or a malformed name
        raise ConfigError('data.name', name, 'use python_stdlib, text_files, or a registered '
                          'TFDS dataset name (e.g. lm1b) prepared in data.data_dir') from None


def tfds_builder(cfg) -> tfds.core.DatasetBuilder:
    """The prepared builder for cfg.data.name (python_stdlib is prepared here on first use)."""
    name = cfg.data.name
    if name == 'python_stdlib':
        return prepared_stdlib_builder(cfg)
    check_tfds_name(name)
    try:
        with _quiet_absl():
            builder = tfds.builder(name, data_dir=data_dir(cfg))
            prepared = builder.is_prepared()
    except Exception as e:  # e.g. an unknown config or version in 'name/config:version'
        raise ConfigError('data.name', name, str(e).splitlines()[0][:200]) from None
    if not prepared:
        raise ConfigError('data.name', name, f'is not prepared in {data_dir(cfg)} and nothing is '
                          'downloaded at run time; prepare it first, e.g. `tfds build '
                          f'{name} --data_dir={data_dir(cfg)} --file_format=array_record`')
    return builder


def _record_text(record, text_key: str) -> str:
    for part in text_key.split('/'):  # 'a/b' reaches a nested feature
        record = record[part]
    return record.decode('utf-8') if isinstance(record, bytes) else str(record)


def _check_text_key(builder, text_key: str) -> None:
    features = builder.info.features
    for part in text_key.split('/'):
        if not hasattr(features, 'keys') or part not in features.keys():
            raise ConfigError('data.text_key', text_key, f'{builder.name} has the features '
                              f'{sorted(builder.info.features.keys())}')
        features = features[part]


def open_tfds(cfg, split: str) -> Documents:
    """A TFDS split (e.g. 'validation' or 'train[:10%]') read as an array_record data source."""
    builder = tfds_builder(cfg)
    splits = sorted(builder.info.splits.keys())
    if split.split('[')[0] not in splits:
        raise ConfigError('split', split, f'{builder.name} has the splits {", ".join(splits)}')
    text_key = 'text' if cfg.data.name == 'python_stdlib' else cfg.data.get('text_key', 'text')
    _check_text_key(builder, text_key)
    try:
        source = builder.as_data_source(split)
    except Exception as e:
        raise ConfigError('data.name', cfg.data.name, 'cannot be read as a random-access data '
                          'source; prepare it with file_format=array_record '
                          f'({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
    fetch = lambda indices: [_record_text(r, text_key) for r in source.__getitems__(indices)]
    key = builder.info.full_name.replace('/', '-') + '-' + text_key.replace('/', '.')
    return Documents(key, len(source), fetch)


def open_split(cfg, split: str) -> Documents:
    """The documents of one split of cfg.data.name."""
    if cfg.data.name == 'text_files':
        return open_text_files(cfg, split)
    return open_tfds(cfg, split)
