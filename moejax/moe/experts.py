"""The expert FFN, written once: one activation convention, one grouped matmul per backend.

Convention (HF Mixtral/LLaMA): SwiGLU experts compute (silu(x @ w_gate) * (x @ w_in)) @ w_out,
where w_gate is HF's gate_proj (Mixtral w1), w_in its up_proj (w3), w_out its down_proj (w2);
GELU experts (no w_gate) compute gelu(x @ w_in) @ w_out. The dense MLP, shared experts,
capacity buffers, dropless groups and the all_to_all path's local experts all call this file.

Grouped matmuls (dropless: rows sorted by expert, one group per expert), `moe.grouped_matmul`:
- 'blocks': loops over experts and dense row blocks (moejax.moe.grouped), ~1x the dense work on
  CPU, where jax.lax.ragged_dot does every expert's work on every row;
- 'ragged_dot': jax.lax.ragged_dot (XLA's kernel on GPU/TPU);
- 'tokamax': tokamax.ragged_dot: the Mosaic GPU kernel on H100, the Pallas (Megablox-style)
  kernel on TPU, XLA's ragged_dot elsewhere (tokamax's 'xla' fallback, which is what CPU runs);
- 'auto': blocks on CPU; tokamax on GPU/TPU when it is importable (and the trace is not split
  over devices by GSPMD, which cannot partition its kernels), else ragged_dot.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding, target
from moejax.errors import ConfigError
from moejax.moe import grouped

ACTIVATIONS = ('gelu', 'swiglu')  # model.activation
BACKENDS = ('auto', 'blocks', 'ragged_dot', 'tokamax')
KEY = 'moe.grouped_matmul'


class ExpertWeights(NamedTuple):
    """Stacked weights of E experts (parameter names as in checkpoints)."""
    w_in_EDF: jax.Array
    w_gate_EDF: jax.Array | None  # set for SwiGLU experts
    w_out_EFD: jax.Array


# ---- the convention -------------------------------------------------------------------------

def activate(h_in, h_gate):
    """GELU (tanh form) of x @ w_in; or SwiGLU silu(x @ w_gate) * (x @ w_in) when gated."""
    return jax.nn.gelu(h_in) if h_gate is None else jax.nn.silu(h_gate) * h_in


def ffn(x_MD, w_in_DF, w_gate_DF, w_out_FD, constrain_hidden=lambda h: h):
    """One FFN (the dense MLP, shared experts) on x [..., D], matmuls in x's dtype.

    constrain_hidden: applied to the [..., F] activation (the MLP's sharding constraint).
    The matmuls run on x flattened to [M, D]: XLA:CPU's gradient of x_BTD @ w (a contraction
    over two dims) took 2.2x the time of the flat one (fwd+bwd, [4, 512, 256] @ [256, 1024]).
    """
    dt, lead = x_MD.dtype, x_MD.shape[:-1]
    x_MD = x_MD.reshape(-1, x_MD.shape[-1])
    h_in = x_MD @ w_in_DF.astype(dt)
    h_gate = None if w_gate_DF is None else x_MD @ w_gate_DF.astype(dt)
    a_MF = constrain_hidden(activate(h_in, h_gate).reshape(*lead, -1))
    return (a_MF.reshape(-1, a_MF.shape[-1]) @ w_out_FD.astype(dt)).reshape(*lead, -1)


def batched_ffn(w: ExpertWeights, x_ECD):
    """Each expert's FFN on its own C rows as batched einsums (expert dim leading: XLA:CPU is
    slow at dots whose batch dim is not the leading one)."""
    dt = x_ECD.dtype
    mm = lambda a, w_E: jnp.einsum('eci,eio->eco', a, w_E.astype(dt))
    h_gate = None if w.w_gate_EDF is None else mm(x_ECD, w.w_gate_EDF)
    return mm(activate(mm(x_ECD, w.w_in_EDF), h_gate), w.w_out_EFD)


# ---- backends -------------------------------------------------------------------------------

@functools.cache
def _tokamax():
    """The tokamax module, or the reason it cannot be imported (a string)."""
    try:
        import tokamax  # noqa: PLC0415 - optional, heavy, and needs jax >= 0.11.1
        return tokamax
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return f'{type(err).__name__}: {err}'


def tokamax_available() -> bool:
    return not isinstance(_tokamax(), str)


def resolve(backend: str) -> str:
    """The concrete backend ('blocks' | 'ragged_dot' | 'tokamax') for a config choice."""
    if backend not in BACKENDS:
        raise ConfigError(KEY, backend, 'allowed: ' + ', '.join(BACKENDS))
    if backend == 'auto':
        if target.platform() == 'cpu':
            return 'blocks'
        # tokamax's kernels are not partitioned by GSPMD (they run per device, inside
        # shard_map); jax.lax.ragged_dot is, so it serves a partitioned trace.
        return 'tokamax' if tokamax_available() and not grouped.partitioned() else 'ragged_dot'
    if backend == 'tokamax' and not tokamax_available():
        raise ConfigError(KEY, backend, f'tokamax cannot be imported ({_tokamax()}); install it '
                          '(pip install "moejax[cuda]" or "tokamax>=0.0.17", Python >= 3.12, '
                          "jax >= 0.11.1) or use 'auto', 'ragged_dot' or 'blocks'")
    return backend


def layout_blocks(backend: str) -> tuple[int, ...] | None:
    """Row blocks of the 'blocks' grouped matmul (groups are padded to the last); None for the
    kernels, which take groups of any size."""
    return grouped.CPU_BLOCKS if resolve(backend) == 'blocks' else None


# tokamax's kernel for each target platform. It picks one itself from the real device at trace
# time, which is the CPU when planning for an accelerator: moejax names it from the target.
TOKAMAX_KERNELS = {'tpu': 'mosaic_tpu', 'gpu': 'mosaic_gpu'}


def _ragged_dot(backend: str):
    return _tokamax_ragged_dot if backend == 'tokamax' else jax.lax.ragged_dot


def _tokamax_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G):
    """tokamax's kernel for the target platform; XLA's ragged_dot (one line says so) where the
    kernel cannot take these shapes or there is none (CPU)."""
    kernel = TOKAMAX_KERNELS.get(target.platform(), 'xla')
    shapes = f'{lhs_MK.dtype.name}{list(lhs_MK.shape)} x {list(rhs_GKN.shape)}'
    # Its TPU kernel would fall back to XLA by itself, without a word, for dims under 128.
    if kernel == 'mosaic_tpu' and min(lhs_MK.shape[-2:] + rhs_GKN.shape[-2:]) < 128:
        _say_fallback(kernel, shapes, 'its TPU kernel takes dims >= 128')
        kernel = 'xla'
    # Its GPU kernel's backward returns the weights' cotangent without shard_map's manual axis
    # types, which JAX refuses (found compiling Mixtral's ragged exchange for 64 H100s).
    if kernel == 'mosaic_gpu' and jax.sharding.get_abstract_mesh().manual_axes:
        _say_fallback(kernel, shapes, "inside shard_map: its backward drops the manual axis "
                      'types (tokamax 0.0.17)')
        kernel = 'xla'
    # Inside shard_map the kernel's output type must say which mesh axes it varies over.
    varying = jax.sharding.ManualAxisType(varying=jax.typeof(lhs_MK).mat.varying
                                          | jax.typeof(rhs_GKN).mat.varying)
    try:
        return _tokamax().ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, manual_axis_type=varying,
                                     implementation=kernel)
    except NotImplementedError as err:
        _say_fallback(kernel, shapes, str(err).splitlines()[0][:160])
        return _tokamax().ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, implementation='xla')


@functools.cache
def _say_fallback(kernel: str, shapes: str, reason: str) -> None:
    print(f"moejax: tokamax's {kernel} kernel cannot take {shapes} ({reason}); using XLA's "
          'ragged_dot', flush=True)


def grouped_ffn(w: ExpertWeights, x_MD, group_sizes_E, backend: str = 'auto'):
    """Expert e's FFN on the rows of group e (groups are consecutive); rows past them give 0.

    With 'blocks' every group size must be a multiple of layout_blocks(backend)[-1].
    """
    backend = resolve(backend)
    dt = x_MD.dtype
    w_in, w_out = w.w_in_EDF.astype(dt), w.w_out_EFD.astype(dt)
    w_gate = None if w.w_gate_EDF is None else w.w_gate_EDF.astype(dt)
    if backend == 'blocks':
        return grouped.blocked_ffn(x_MD, w_in, w_gate, w_out, group_sizes_E, grouped.CPU_BLOCKS,
                                   activate)
    # Rows past the groups are zeroed on the way in and out: a kernel may leave them unwritten,
    # and the input mask keeps their (unspecified) input gradient at zero.
    in_groups_M1 = (jnp.arange(x_MD.shape[0]) < jnp.sum(group_sizes_E))[:, None]
    x_MD = jnp.where(in_groups_M1, x_MD, 0)
    rd = _ragged_dot(backend)
    mm = lambda a, w_E: rd(a, w_E, group_sizes_E)
    h_gate = None if w_gate is None else mm(x_MD, w_gate)
    y_MD = mm(activate(mm(x_MD, w_in), h_gate), w_out)
    return jnp.where(in_groups_M1, y_MD, 0).astype(dt)


def expert_ffn(w: ExpertWeights, x_ECD, backend: str = 'auto'):
    """Each expert's FFN on its own capacity buffer [E, C, D].

    With 'blocks' (CPU by default) and one unpartitioned device the buffers run through the
    block loops, which beat XLA:CPU's batched dots; otherwise batched einsums, which GSPMD
    splits cleanly over experts (a loop would gather sharded expert weights) and which are
    plain batched GEMMs on GPU/TPU (equal group sizes: the ragged kernels would not pay).
    """
    e, c, d = x_ECD.shape
    blocks = (grouped.ffn_blocks(c, partitioned_ok=False) if resolve(backend) == 'blocks'
              else None)
    if not blocks:
        return batched_ffn(w, x_ECD)
    dt = x_ECD.dtype
    w_gate = None if w.w_gate_EDF is None else w.w_gate_EDF.astype(dt)
    y_MD = grouped.blocked_ffn(x_ECD.reshape(e * c, d), w.w_in_EDF.astype(dt), w_gate,
                               w.w_out_EFD.astype(dt), jnp.full((e,), c, jnp.int32), blocks,
                               activate)
    return y_MD.reshape(e, c, -1)


class MLP(nnx.Module):
    """The dense FFN: D -> F -> D, GELU or SwiGLU (moejax.moe.experts' convention:
    (silu(x @ w_gate) * (x @ w_in)) @ w_out)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, *, rngs: nnx.Rngs):
        self.activation = activation
        self.w_in_DF = sharding.param(rngs, (d_model, d_ff), ('embed', 'mlp'), d_model)
        self.w_gate_DF = (sharding.param(rngs, (d_model, d_ff), ('embed', 'mlp'), d_model)
                          if activation == 'swiglu' else None)
        self.w_out_FD = sharding.param(rngs, (d_ff, d_model), ('mlp', 'embed'), d_ff)

    def __call__(self, x_BTD):
        w_gate = None if self.w_gate_DF is None else self.w_gate_DF[...]
        hidden = lambda h: sharding.constrain(h, ('batch', 'length', 'act_mlp'))
        return ffn(x_BTD, self.w_in_DF[...], w_gate, self.w_out_FD[...], hidden)
