"""The text_files corpus: local UTF-8 files (data.text_glob), a document per file or per
non-empty line (data.text_format), split into train and validation by a stable hash of the path
(and line number), moved so that neither split is empty.

Binary files (a NUL byte) and empty files are left out; when the corpus is first read, one line
counts the documents per split, and one warning line counts the files left out and those that
are not valid UTF-8 (read with replacement characters).
"""
import functools
import glob
import hashlib
import json
import os
import sys
from typing import Callable

from moejax.data import corpus
from moejax.data.corpus import TEXT_SPLITS, Documents, is_validation, validation_flags
from moejax.errors import ConfigError

TEXT_FORMATS = ('files', 'lines')  # data.text_format: a document per file or per line
BINARY_PROBE_BYTES = 8192  # a NUL byte in this many first bytes marks a binary file
SMALL_CORPUS_BYTES = 1 << 20  # a 'lines' corpus this small is split when opened (it is cheap)


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
def _warn_about_files(pattern: str, left_out: tuple[tuple[str, ...], ...],
                      texts: tuple[str, ...]) -> None:
    """Reads the text files once per process; one warning line counts the binary and the empty
    files left out and the files decoded with replacement characters (not valid UTF-8)."""
    binary, empty = left_out
    undecodable = tuple(p for p in texts if not _is_utf8(p))
    if binary or empty or undecodable:
        examples = ', '.join(os.path.basename(group[0]) for group in (binary, empty, undecodable)
                             if group)
        print(f'moejax: warning: data.text_glob={pattern!r}: skipped {len(binary)} binary '
              f'file(s) (NUL bytes) and {len(empty)} empty file(s); {len(undecodable)} file(s) '
              'are not valid UTF-8 and are read with replacement characters (e.g. '
              f'{examples})', file=sys.stderr, flush=True)


@functools.cache
def _report_counts(pattern: str, num_files: int, unit: str, train: int, validation: int) -> None:
    """Once per process, when the corpus is first read: how many documents each split holds."""
    corpus.say(f'text_files {pattern!r}: {num_files:,} usable file(s), {train:,} train and '
               f'{validation:,} validation documents ({unit})')


def _text_files_key(cfg, paths: list[str], extras: dict) -> str:
    """Names the corpus by its files' paths, sizes and mtimes: edited files invalidate caches.
    `extras` (binary or empty files left out, split moves) enter only when present, so the
    caches of a corpus they do not concern keep their names."""
    stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    blob = json.dumps([cfg.data.text_format, stats] + ([extras] if extras else [])).encode()
    return 'text_files-' + hashlib.sha256(blob).hexdigest()[:16]


def _usable_files(cfg) -> tuple[list, list, dict, Callable]:
    """(every match, the usable (path, relative path) pairs, the cache key's extras, and the
    warning to give when the files are first read); binary and empty files are left out."""
    all_paths = text_file_paths(cfg)
    # Relative to the common directory of every match, so leaving a file out moves no other.
    files = list(zip(all_paths, _relative_paths(all_paths)))
    binary = sorted(p for p in all_paths if is_binary(p))
    empty = sorted(p for p in all_paths if os.path.getsize(p) == 0)
    usable = [(p, r) for p, r in files if p not in binary and p not in empty]
    if not usable:
        raise ConfigError('data.text_glob', cfg.data.text_glob, f'all {len(all_paths)} matched '
                          'file(s) are binary (NUL bytes) or empty; give a glob of UTF-8 text '
                          'files')
    relative = dict(files)
    extras = {name: [relative[p] for p in group]
              for name, group in (('binary', binary), ('empty', empty)) if group}
    warn = lambda: _warn_about_files(cfg.data.text_glob, (tuple(binary), tuple(empty)),
                                     tuple(p for p, _ in usable))
    return all_paths, usable, extras, warn


def open_text_files(cfg, split: str) -> Documents:
    """text_files split: one document per file, or per non-empty line ('lines'), by path hash
    (see the module docstring)."""
    if split not in TEXT_SPLITS:
        raise ConfigError('split', split, f'text_files has the splits {", ".join(TEXT_SPLITS)}')
    all_paths, usable, extras, warn = _usable_files(cfg)

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
            _report_counts(cfg.data.text_glob, len(usable), 'one per file',
                           flags.count(False), flags.count(True))
            return [_read_text(chosen[i]) for i in indices]
        return Documents(_text_files_key(cfg, all_paths, extras), len(chosen), fetch)

    @functools.cache
    def lines() -> dict:  # read only when a cache is built (or the corpus is small)
        warn()
        found = _split_lines(usable)
        _report_counts(cfg.data.text_glob, len(usable), 'one per non-empty line',
                       len(found['train']), len(found['validation']))
        return found

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
