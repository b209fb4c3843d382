"""Open a finished (or live) training run: its config, tokenizer and one step's weights.

The one way eval, generate, analyze, forward and convert read a run. Only the parameters (and
the model's other state, e.g. the balancing bias) of the step are restored, straight into the
mesh shardings, never the optimizer moments; nothing in the run's directory is moved, deleted
or written. A damaged newest checkpoint is reported and the previous one is used.
"""
import dataclasses
import functools
import math
import os
import stat

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import config as config_lib
from moejax import data as data_lib
from moejax import mesh as mesh_lib
from moejax import validate
from moejax.errors import ConfigError
from moejax.model import transformer as model_lib
from moejax.readers import sampling
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import state as state_lib
from moejax.run import workdir as workdir_lib


@dataclasses.dataclass
class SavedRun:
    """A trained model restored from a workdir, with what is needed to use it.

    `model` holds the weights (an nnx Transformer); `params` and `extra` are the same arrays as
    nnx states (nnx.merge(setup.graphdef, params, extra) rebuilds the model), sharded over
    `setup.mesh`."""
    workdir: str
    cfg: object
    model: model_lib.Transformer
    step: int
    setup: state_lib.Setup
    params: nnx.State
    extra: nnx.State

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer the run saved (none saved: the one its config builds, not written
        there); loaded on first use, so code that needs only the weights never reads it."""
        return data_lib.get_tokenizer(self.cfg, self.workdir, save=False)

    @functools.cached_property
    def sampler(self) -> sampling.Sampler:
        """A compiled sampler for these weights (built on first use, then reused)."""
        return sampling.Sampler(self.model)


def check_workdir(workdir: str, *, needs_config: bool = True) -> None:
    """ConfigError (one line) unless workdir looks like a training run's directory."""
    if not workdir or not os.path.isdir(workdir):
        raise ConfigError('--workdir', workdir, 'is not a directory: point it at a training run')
    if needs_config and not os.path.exists(os.path.join(workdir, 'config.json')):
        raise ConfigError('--workdir', workdir, 'holds no config.json: point it at a training run')
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
        raise ConfigError('--workdir', workdir, 'holds no checkpoints/; train first')


def run_config(workdir: str, cfg=None, dtype: str | None = None):
    """The run's config (config.json unless cfg is given), validated for this machine; with
    dtype, a copy that computes in that dtype (parameters are stored in float32 either way)."""
    cfg = config_lib.from_json(os.path.join(workdir, 'config.json')) if cfg is None else cfg
    if dtype is not None:
        if dtype not in model_lib.DTYPES:
            raise ConfigError('dtype', dtype, f'use one of {", ".join(model_lib.DTYPES)}')
        cfg = cfg.copy_and_resolve_references()
        cfg.model.dtype = dtype
    validate.check(cfg, jax.device_count())
    return cfg


def open_run(workdir: str, step: int | None = None, *, cfg=None,
             dtype: str | None = None) -> SavedRun:
    """Step `step` (default: the newest restorable) of the run in workdir, read-only.

    cfg replaces the saved config.json (eval's --config: another mesh, other eval settings; the
    model must be the one saved); dtype ('float32' | 'bfloat16') overrides model.dtype, the
    dtype the model computes in. ConfigError (one line) for a workdir that holds no run, a step
    never saved, or no restorable checkpoint."""
    check_workdir(workdir, needs_config=cfg is None)
    cfg = run_config(workdir, cfg, dtype)
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    abstract = {'params': setup.abstract_state.params, 'extra': setup.abstract_state.extra}
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.train.keep_checkpoints,
                                               read_only=True)
    try:
        parts, saved_step = checkpointer.read_params(abstract, step)
    finally:
        checkpointer.close()
    model = nnx.merge(setup.graphdef, parts['params'], parts['extra'])
    return SavedRun(workdir, cfg, model, saved_step, setup, parts['params'], parts['extra'])


# ---------------------------------------------------------------- forward: token ids -> logits


def read_tokens(path: str, name: str = '--tokens') -> np.ndarray:
    """Token ids [B, T] from a .npy file of integers ([T] is one row); ConfigError naming the
    flag for a file that is missing, unreadable, not integer, empty or of another rank.

    The header is read first and the array's declared size checked against the file's before
    anything is allocated: a header may declare (1, 2**40)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ConfigError(name, path, 'is not a regular file; give a .npy file')
        with open(path, 'rb') as f:
            dtype, shape, fortran = _npy_header(f)
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
            if dtype.kind not in 'iu' or not all(isinstance(d, int) for d in shape):
                raise ConfigError(name, path, f'holds {dtype} values: token ids must be '
                                  'integers (e.g. int32)')
            if len(shape) not in (1, 2) or math.prod(shape) == 0:
                raise ConfigError(name, path, f'has shape {list(shape)}: give ids [T] or '
                                  '[B, T], not empty')
            if math.prod(shape) * dtype.itemsize != data_bytes:
                raise ConfigError(name, path, f'declares {list(shape)} {dtype} values '
                                  f'({math.prod(shape) * dtype.itemsize} bytes) but holds '
                                  f'{data_bytes} bytes: a damaged or truncated file')
            flat = np.fromfile(f, dtype, math.prod(shape))
            ids = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    except (OSError, ValueError, EOFError) as err:  # missing, not .npy, truncated header
        if isinstance(err, ConfigError):
            raise
        reason = getattr(err, 'strerror', None) or ' '.join(str(err).split())[:120]
        raise ConfigError(name, path, f'is not a readable .npy file ({reason}); save int32 '
                          'token ids [B, T] with numpy.save') from None
    return ids.reshape(1, -1) if ids.ndim == 1 else ids


def _npy_header(f) -> tuple[np.dtype, tuple, bool]:
    """(dtype, shape, Fortran order) from a .npy header; the file is left at the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return dtype, shape, fortran


def check_tokens(ids_BT: np.ndarray, cfg, name: str = '--tokens') -> np.ndarray:
    """ids_BT as int32 if the model can read them: ids in [0, vocab_size), T <= max_len, and
    whole routing groups (moe.group_size) in the B*T tokens."""
    V, max_len, S = cfg.data.vocab_size, cfg.model.max_len, cfg.moe.group_size
    B, T = ids_BT.shape
    low, high = int(ids_BT.min()), int(ids_BT.max())
    if low < 0 or high >= V:
        raise ConfigError(name, f'ids in [{low}, {high}]', f'must lie in [0, {V}) '
                          f'(data.vocab_size={V})')
    if T > max_len:
        raise ConfigError(name, f'shape {[B, T]}', f'rows of T={T} tokens exceed '
                          f'model.max_len={max_len}; use at most {max_len} per row')
    if S and (B * T) % S:
        raise ConfigError(name, f'shape {[B, T]}', f'B*T={B * T} tokens must be whole routing '
                          f'groups of moe.group_size={S}')
    return ids_BT.astype(np.int32)


def check_out(path: str, name: str = '--out') -> None:
    """ConfigError unless a file can be written at path (its directory is created if missing)."""
    if not path:
        raise ConfigError(name, path, 'is required: the .npy file to write')
    if os.path.isdir(path):
        raise ConfigError(name, path, 'is a directory: give a file path, e.g. logits.npy')
    directory = os.path.dirname(os.path.abspath(path))
    reason = workdir_lib.unwritable(directory)
    if reason:
        raise ConfigError(name, path, f'cannot be written in {directory} ({reason})')


def write_npy(path: str, array: np.ndarray) -> None:
    """np.save, atomically: a reader never sees a partial file."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:  # a file object: np.save would add .npy to a name
        np.save(f, array)
    os.replace(tmp, path)


def padded_rows(setup: state_lib.Setup, B: int, T: int) -> int:
    """The fewest rows >= B that the batch sharding and routing groups split evenly.

    Rows added are padding (segment id 0: attended by nothing, routed nowhere) in routing
    groups of their own, so they change nothing in the real rows."""
    devices = setup.mesh.size
    shards = devices // setup.batch_sharding.shard_shape((devices, 1))[0]
    S = setup.cfg.moe.group_size or T
    rows = -(-B // shards) * shards
    while (rows * T) % S or ((rows * T) // S) % shards:
        rows += shards
    return rows


def forward_logits(run: SavedRun, ids_BT) -> np.ndarray:
    """float32 logits [B, T, V] of token ids [B, T], each row one whole document (segment ids
    1, positions 0..T-1), in evaluation mode (no router noise, moe.eval_capacity_factor), as
    eval computes them. Matmuls run at full float32 precision on every backend; the dtype the
    model computes in is run.cfg.model.dtype (open_run(..., dtype='float32') for a reference)."""
    ids_BT = check_tokens(np.asarray(ids_BT), run.cfg)
    B, T = ids_BT.shape
    rows = padded_rows(run.setup, B, T)
    inputs_RT = np.zeros((rows, T), np.int32)
    inputs_RT[:B] = ids_BT
    segments_RT = (np.arange(rows) < B).astype(np.int32)[:, None].repeat(T, axis=1)
    positions_RT = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T))
    put = lambda x: jax.make_array_from_callback(x.shape, run.setup.batch_sharding,
                                                 lambda index: x[index])
    graphdef, state = nnx.split(run.model)

    def forward(state, inputs_RT, segments_RT, positions_RT):
        model = nnx.merge(graphdef, state)
        logits_RTV, _ = model(inputs_RT, segments_RT, positions_RT, train=False)
        return logits_RTV[:B]
    # Replicated output: every process holds the whole result (one file, written by process 0).
    replicated = NamedSharding(run.setup.mesh, P())
    with jax.default_matmul_precision('highest'):
        logits_BTV = jax.jit(mesh_lib.traced_in(run.setup.mesh, forward),
                             out_shardings=replicated)(
            state, put(inputs_RT), put(segments_RT), put(positions_RT))
    return np.asarray(jax.device_get(logits_BTV), np.float32)
