"""The embedded corpus `python_stdlib`: the running interpreter's standard-library sources, one
document per .py file, prepared once as a TFDS dataset (array_record) in data_dir.

Made the same wherever the same Python version runs, by a fixed rule for what is left out:
- test suites: any folder named `test`, `tests` or `idle_test` (CPython's Lib/test,
  idlelib/idle_test, ...), which some builds leave out (Docker's python images delete exactly
  these, Debian ships them in a separate package): 989 of 1,740 files in Python 3.12.1;
- build-specific files: `_sysconfigdata_*.py` and `config-*` folders (the build's paths and flags);
- the character-mapping codec tables gencodec.py generated (GENERATED below);
- files that are not valid UTF-8 (none outside the test suites in 3.12).
The corpus is named by a digest over the sorted (relative path, sha256 of content) list, printed
with the counts when it is prepared and stored with the dataset (its metadata.json); a prepared
dataset with another digest (another Python, or an older moejax) is rebuilt, with one line saying
why, and the caches built from it (tokenizers, packed rows) are named by the digest.
"""
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sysconfig

import tensorflow_datasets as tfds
from etils import epath

from moejax import errors
from moejax.data import corpus

tfds.disable_progress_bar()

TEST_DIRS = ('test', 'tests', 'idle_test')
SKIPPED_DIRS = ('site-packages', 'dist-packages', '__pycache__')  # not the standard library
# The character-mapping codecs (encodings/cp*.py, iso8859_*.py, ...: 65 files, 1.2 MB) are
# tables gencodec.py generated, as their headers say: near-identical files a model learns in a
# few steps and that dominated the validation split they fell into, not source code.
GENERATED = 'generated from'


def left_out(relative: str) -> str | None:
    """Why the rule leaves a stdlib file out of the corpus ('tests', 'build'), or None."""
    *folders, name = relative.split(os.sep)
    if any(folder in TEST_DIRS for folder in folders):
        return 'tests'
    if name.startswith('_sysconfigdata') or any(f.startswith('config-') for f in folders):
        return 'build'
    return None


def stdlib_sources() -> list[tuple[str, str]]:
    """(path relative to the stdlib root, absolute path) of every stdlib .py file, sorted."""
    root = sysconfig.get_paths()['stdlib']
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
        for name in sorted(files):
            if name.endswith('.py'):
                path = os.path.join(directory, name)
                found.append((os.path.relpath(path, root), path))
    return found


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The corpus this interpreter builds: its files (relative, absolute path), how many the
    rule left out and why, its size and its digest."""
    files: tuple
    left_out: dict
    num_bytes: int
    digest: str

    def describe(self) -> str:
        out = ', '.join(f'{n} {why}' for why, n in self.left_out.items() if n)
        return (f'{len(self.files):,} files, {self.num_bytes / 1e6:.1f} MB ({out or "none"} left '
                f'out), digest {self.digest[:16]}')


@functools.cache
def stdlib_manifest() -> Manifest:
    """Reads and hashes the interpreter's stdlib once per process (~12 MB, a fraction of a
    second)."""
    files, lines, size = [], [], 0
    counts = {'tests': 0, 'build': 0, 'generated tables': 0, 'not UTF-8': 0}
    for relative, path in stdlib_sources():
        why = left_out(relative)
        if why is None:
            with open(path, 'rb') as f:
                raw = f.read()
            try:
                why = 'generated tables' if GENERATED in raw.decode('utf-8')[:400] else None
            except UnicodeDecodeError:
                why = 'not UTF-8'
        if why:
            counts[why] += 1
            continue
        files.append((relative, path))
        lines.append(f'{relative.replace(os.sep, "/")}\t{hashlib.sha256(raw).hexdigest()}\n')
        size += len(raw)
    digest = hashlib.sha256(''.join(sorted(lines)).encode()).hexdigest()
    return Manifest(tuple(files), counts, size, digest)


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The stdlib corpus (see the module docstring), one example per file."""

    VERSION = tfds.core.Version('2.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.',
                     '2.0.0': 'Test suites, build-specific files and generated codec tables '
                              'left out; digest stored.'}
    # TFDS derives code_path from the package via importlib_resources, absent here: set it.
    code_path = epath.Path(__file__)

    def _info(self):
        # dataset_info_from_configs() needs a TFDS package dir; this builder lives in moejax.
        manifest = stdlib_manifest()
        return tfds.core.DatasetInfo(
            builder=self,
            description='Python standard library .py sources without test suites; validation '
                        '= ~5% by path hash.',
            features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                                 'path': tfds.features.Text()}),
            homepage='https://docs.python.org/3/library/',
            metadata=tfds.core.MetadataDict(digest=manifest.digest, files=len(manifest.files)))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in corpus.TEXT_SPLITS}

    def _generate_examples(self, split):
        files = [(r, p) for r, p in stdlib_manifest().files if corpus.split_of(r) == split]
        progress = corpus.Progress(f'python_stdlib {split}', len(files), 'documents')
        for done, (relative, path) in enumerate(files, 1):
            with open(path, 'rb') as f:
                yield relative, {'text': f.read().decode('utf-8'), 'path': relative}
            progress.update(done)
        progress.finish(f'{len(files):,} documents')

    def _log_download_bytes(self):
        """Replaces TFDS's 'Downloading and preparing dataset Unknown size' (nothing is
        downloaded) with what is built, from what."""
        corpus.say(f'building the python_stdlib corpus from this interpreter\'s standard '
                   f'library (nothing is downloaded): {stdlib_manifest().describe()}')

    def _log_download_done(self):
        corpus.say(f'python_stdlib is ready in {self.data_dir}; later runs reuse it')


def stored_digest(builder) -> str | None:
    """The digest a prepared dataset was built with (None: none stored, an older moejax's)."""
    try:
        with open(os.path.join(builder.data_dir, 'metadata.json')) as f:
            return json.load(f).get('digest')
    except (OSError, ValueError, AttributeError):
        return None


def prepared_stdlib_builder(cfg) -> tfds.core.DatasetBuilder:
    """The python_stdlib builder, prepared in data_dir on first use, and prepared again when
    the one there was built from another standard library (one line says so)."""
    make = lambda: PythonStdlib(data_dir=corpus.data_dir(cfg), file_format='array_record')
    digest = stdlib_manifest().digest
    with errors.quiet():
        builder = make()
        if builder.is_prepared() and stored_digest(builder) == digest:
            return builder
        with corpus.file_lock(os.path.join(corpus.data_dir(cfg), 'python_stdlib')):
            builder = make()
            stored = stored_digest(builder)
            if builder.is_prepared() and stored != digest:
                corpus.say(f'the python_stdlib in {builder.data_dir} was built from another '
                           f'standard library (digest {(stored or "none stored")[:16]}); '
                           f'rebuilding it from this interpreter\'s (digest {digest[:16]})')
                shutil.rmtree(builder.data_dir)
                builder = make()
            if not builder.is_prepared():
                builder.download_and_prepare()
    return builder
