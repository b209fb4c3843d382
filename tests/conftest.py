"""Every test sees 8 CPU-simulated devices, so mesh layouts are tested without accelerators.

What many modules need is built once per session and shared by its xdist workers: the prepared
corpus (`data_dir`), a trained tiny run (`trained_tiny_run`), and a persistent XLA cache that
every process of the session reads and writes (SESSION_CACHE_ENV: the same program compiled by
two tests or two commands is compiled once); the commands that are killed while they train use
a cache of their own per worker (`compile_cache`), so no half-written entry reaches the others.
"""
import fcntl
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Each interpreter the tests start (a fork server per worker, notebook kernels, the startup
# checks) imports JAX, Flax and Orbax. Where bytecode writing is off (PYTHONDONTWRITEBYTECODE,
# set on some machines) and the install wrote none (uv, by default), every one of them compiled
# those packages from source: importing jax, flax and optax took 3.8 s instead of 1.4 s. Now
# the first import writes it; the rest read it.
os.environ.pop('PYTHONDONTWRITEBYTECODE', None)
sys.dont_write_bytecode = False
# The tests compile hundreds of tiny programs whose running takes milliseconds: LLVM's
# optimisation passes are most of their compile time (a layout test: 31 -> 13 CPU seconds at
# level 0). Every program of the session, and of every command it starts (they inherit
# XLA_FLAGS), compiles the same way, so each comparison stays like for like.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)


def pytest_addoption(parser):
    parser.addoption('--router_ulps', type=int, default=0,
                     help='nudge the router logits of every layout compared with a reference '
                     'by this many ulps (tests/decisions.py): verdicts must not change')


# Every program, however small, is kept. No size bound: with one, JAX scans the whole directory
# under a file lock at every write, and the processes queue on it (half the CPU sat idle).
# Without the lock a reader could meet an entry still being written (two processes compiling
# the same program within the same millisecond): JAX warns and compiles it again.
SESSION_CACHE_ENV = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                     'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
SESSION_CACHE = pytest.StashKey[str]()  # the cache's directory, in the process that made it


def pytest_configure(config):
    from tests import decisions
    decisions.LAYOUT_ULPS = config.getoption('router_ulps')
    if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # the first process: xdist workers inherit
        path = tempfile.mkdtemp(prefix='moejax-tests-xla-cache-')
        config.stash[SESSION_CACHE] = path
        os.environ.update(SESSION_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=path)
        jax.config.update('jax_compilation_cache_dir', path)  # jax read the environment already
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
        jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config):
    shutil.rmtree(config.stash.get(SESSION_CACHE, ''), ignore_errors=True)


def shared_path(tmp_path_factory, name: str, build):
    """The session's directory `name`, filled by build(path) once: by the first xdist worker
    that asks, while the others wait on a lock. A failed build leaves no mark, so the next
    worker builds again (and fails the same way)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # the session's temporary directory, above each worker's own
    path = root / name
    with open(root / f'{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (root / f'{name}.built').exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            (root / f'{name}.built').touch()
    return path


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """python_stdlib and its packed rows for the tiny config, prepared once (~10 s) for every
    process of the session to share (the data pipeline locks and renames what it adds)."""
    def prepare(path):
        from moejax import data as data_lib
        from tests.helpers import tiny_config
        cfg = tiny_config()
        cfg.data.data_dir = str(path)
        tokenizer = data_lib.get_tokenizer(cfg)
        data_lib.train_batches(cfg, tokenizer)
        data_lib.eval_batches(cfg, tokenizer, 'validation')
    return str(shared_path(tmp_path_factory, 'moejax_data', prepare))


TINY_RUN_FLAGS = ('--config=configs/default.py:tiny', '--config.train.log_every=1')


@pytest.fixture(scope='session')
def trained_tiny_run(tmp_path_factory, data_dir):
    """configs/default.py:tiny trained its 10 steps through the command line on data_dir (every
    step logged; evaluations and checkpoints at 5 and 10), once per session, through the
    session's XLA cache (train_and_inspect.ipynb runs the same programs). Read-only: a test
    that writes into a run copies this one first (shutil.copytree); the session checks at the
    end that nothing changed it."""
    from moejax.run import metrics
    from moejax.run import workdir as workdir_lib
    from tests.helpers import run_cli, snapshot

    def train(path):
        proc = run_cli('train', *TINY_RUN_FLAGS, f'--workdir={path}',
                       f'--config.data.data_dir={data_dir}')
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert workdir_lib.saved_steps(str(path)) == [5, 10]
        assert [r['step'] for r in metrics.read_jsonl(str(path / 'metrics.jsonl'))
                if 'loss' in r] == list(range(1, 11))
    path = shared_path(tmp_path_factory, 'trained_tiny_run', train)
    before = snapshot(path)
    yield str(path)
    assert snapshot(path) == before, 'a test wrote into trained_tiny_run: copy it first'


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for the training commands of the tests that interrupt, resume or
    refuse a run: each restart skips recompiling (~10 s). One per xdist worker, whose tests run
    one at a time, so no two tests write it at once; trained_tiny_run uses the session's, so
    resumed runs are also compared across compilations."""
    return str(tmp_path_factory.getbasetemp() / 'moejax_compile_cache')


# The modules that take longest on the 2-core CI machine (seconds of test time, measured), run
# first: xdist hands a worker a whole module at a time (--dist loadscope), so a long module
# handed out last leaves the other worker idle until it ends. The rest follow in file order.
LONGEST_FIRST = ('test_expert_parallel', 'test_transformer', 'test_hf_convert', 'test_block',
                 'test_guards', 'test_dry_run', 'test_notebooks', 'test_dispatch', 'test_attention',
                 'test_multihost', 'test_sharding', 'test_ragged', 'test_checkpoint',
                 'test_sampling', 'test_benchmarks', 'test_mla', 'test_routing', 'test_saved_run',
                 'test_text_files', 'test_workdir', 'test_targets', 'test_step')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
