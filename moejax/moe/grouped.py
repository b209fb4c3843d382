"""Sorted row layouts, row gathers, and the CPU grouped FFN: dispatch without one-hot tensors.

The dropless engine sorts (token, choice) pairs by expert into a layout where each expert's
rows are one contiguous group, runs each expert's FFN on its group (moejax.moe.experts picks the
grouped matmul), and gathers the results back. On CPU jax.lax.ragged_dot is slow (~8x the dense
time here: it does every expert's work on every row), so there each group is padded to a
multiple of a small block and the FFN runs as loops over experts and their blocks (big blocks,
then small ones for each group's tail), with the expert's weights sliced once, and a custom
backward that does the same per block. That is ~1x the dense work at the speed of a dense
matmul. The activation is passed in (moejax.moe.experts.activate), so the convention lives there.

Row permutations (tokens -> layout rows, layout rows -> pairs) are gathers whose gradients are
again gathers, by the inverse map.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Rows per block of the CPU grouped FFN, largest first. Big blocks amortise the per-block
# weight-gradient accumulation; the smallest bounds the padding (< E * 32 rows). Measured best
# of (256, 32), (512, 64), (512, 128, 32), (1024, 256, 32) at d_model 512, d_ff 1024, E 8.
CPU_BLOCKS = (512, 128, 32)
MIN_BLOCK = 8  # capacity buffers whose size is not a multiple of this use einsums instead


def partitioned() -> bool:
    """Whether GSPMD partitions the computation being traced over more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return any(mesh.shape[a] > 1 and a not in mesh.manual_axes for a in mesh.axis_names)


def ffn_blocks(rows_multiple: int | None = None, *, partitioned_ok: bool = True):
    """Block sizes for blocked_ffn; None means einsums instead.

    rows_multiple: every group's size is a multiple of it (capacity buffers), so the smallest
    block is the largest power of two <= CPU_BLOCKS[-1] that divides it (None if under
    MIN_BLOCK). partitioned_ok=False: None when GSPMD partitions the computation over devices
    (a loop over experts would gather sharded expert weights; einsums split cleanly).
    """
    if not partitioned_ok and partitioned():
        return None
    if rows_multiple is None:
        return CPU_BLOCKS
    last = CPU_BLOCKS[-1]
    while rows_multiple % last:
        last //= 2
    return CPU_BLOCKS[:-1] + (last,) if last >= MIN_BLOCK else None


class Layout(NamedTuple):
    """Pairs sorted by expert into P rows, each expert's group padded to a multiple of block.

    row_N: the layout row of each pair (meaningless where the pair is not valid);
    pair_P: the pair in each row (meaningless where not filled); filled_P: the row holds a pair;
    group_sizes_E: rows per expert in the layout, padding included (a multiple of block).
    """
    row_N: jax.Array
    pair_P: jax.Array
    filled_P: jax.Array
    group_sizes_E: jax.Array


def num_layout_rows(num_pairs: int, num_experts: int, block: int) -> int:
    """Static bound on the rows of a layout: every group padded by at most block - 1 rows."""
    return (num_pairs + num_experts * (block - 1)) // block * block


def inverse_permutation(perm_N):
    """inv[perm[i]] = i (a scatter of int32 indices: cheap, and no gradient flows through it)."""
    n = perm_N.shape[0]
    return jnp.zeros((n,), jnp.int32).at[perm_N].set(jnp.arange(n, dtype=jnp.int32),
                                                      unique_indices=True)


def sorted_layout(expert_N, valid_N, num_experts: int, block: int) -> Layout:
    """One stable argsort of the pairs by expert; everything else is gathers of int vectors."""
    n = expert_N.shape[0]
    key_N = jnp.where(valid_N, expert_N, num_experts)  # invalid pairs sort last
    order_N = jnp.argsort(key_N, stable=True)  # sorted index -> pair
    rank_N = inverse_permutation(order_N)  # pair -> sorted index
    counts_E = jnp.zeros((num_experts + 1,), jnp.int32).at[key_N].add(1)[:num_experts]
    sizes_E = (counts_E + block - 1) // block * block
    start_E = jnp.cumsum(counts_E) - counts_E
    end_E = jnp.cumsum(sizes_E)
    pstart_E = end_E - sizes_E
    e_N = jnp.minimum(expert_N, num_experts - 1)
    row_N = rank_N - start_E[e_N] + pstart_E[e_N]
    rows = num_layout_rows(n, num_experts, block)
    r_P = jnp.arange(rows, dtype=jnp.int32)
    # each row's expert, O(P) (a search over the groups' ends would cost O(P E))
    e_P = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), sizes_E,
                     total_repeat_length=rows)
    offset_P = r_P - pstart_E[e_P]
    filled_P = offset_P < counts_E[e_P]
    pair_P = order_N[jnp.clip(start_E[e_P] + offset_P, 0, n - 1)]
    return Layout(jnp.where(valid_N, row_N, 0), pair_P, filled_P, sizes_E)


# ---- row gathers whose transpose is a gather ------------------------------------------------

@jax.custom_vjp
def gather_rows(x_MD, index_R, valid_R, inverse_MJ, inverse_valid_MJ):
    """y[r] = x[index[r]] where valid[r], else 0.

    inverse_MJ lists, for each source row m, the (at most J) output rows r that read it
    (inverse_valid marks the real entries); it makes the gradient a gather and a sum over J.
    """
    return jnp.where(valid_R[:, None], x_MD[index_R], 0).astype(x_MD.dtype)


def _gather_rows_fwd(x_MD, index_R, valid_R, inverse_MJ, inverse_valid_MJ):
    return (gather_rows(x_MD, index_R, valid_R, inverse_MJ, inverse_valid_MJ),
            (index_R, valid_R, inverse_MJ, inverse_valid_MJ))


def _gather_rows_bwd(res, dy_RD):
    _, _, inverse_MJ, inverse_valid_MJ = res
    dx_MJD = jnp.where(inverse_valid_MJ[..., None], dy_RD[inverse_MJ], 0).astype(dy_RD.dtype)
    return jnp.sum(dx_MJD, axis=1), None, None, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


# ---- grouped FFN by block loops --------------------------------------------------------------

def blocked_ffn(x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks, activate):
    """Expert e's FFN on the rows of group e (groups are consecutive); rows past them give 0.

    blocks: a descending tuple of block sizes, each dividing the one before; every group size
    must be a multiple of the last (a padded layout), and each group runs as blocks of the
    largest size that fits, then smaller ones. activate(h_in, h_gate) is the FFN's activation
    (h_gate None without a gate). Weights must already be in x's dtype.
    """
    blocks = tuple(b for b in blocks[:-1] if b <= x_MD.shape[0]) + tuple(blocks[-1:])
    if jax.sharding.get_abstract_mesh().manual_axes:
        x_MD, w_in_EDF, w_gate_EDF, w_out_EFD = vary_alike(x_MD, w_in_EDF, w_gate_EDF,
                                                            w_out_EFD)
    return _blocked_ffn(x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks, activate)


def expert_loop(group_sizes_E, expert_fn, carry):
    """carry = expert_fn(e, row_e, size_e, carry) for e = 0..E-1 (row_e: the group's start)."""
    start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    body = lambda e, c: expert_fn(e, start_E[e], group_sizes_E[e], c)
    return jax.lax.fori_loop(0, group_sizes_E.shape[0], body, carry)


def block_loops(row, size, blocks, block_fn, carry):
    """carry = block_fn(block_row, block_size, carry) over one group [row, row + size): as many
    blocks of blocks[0] rows as fit, then of blocks[1], ... (size is a multiple of blocks[-1])."""
    for b in blocks:
        n = size // b
        carry = jax.lax.fori_loop(0, n, lambda j, c, b=b, row=row: block_fn(row + j * b, b, c),
                                  carry)
        row, size = row + n * b, size - n * b
    return carry


def slice_rows(a, row, b):
    return jax.lax.dynamic_slice_in_dim(a, row, b)


def put_rows(a, rows, row):
    return jax.lax.dynamic_update_slice_in_dim(a, rows.astype(a.dtype), row, 0)


def mm_t(a, b):
    """a @ b.T without materialising the transpose."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def vary_alike(*arrays):
    """The arrays, each typed to vary over the union of the mesh axes they vary over (inside
    shard_map): loop carries and custom_vjp cotangents must keep one type, and a block's
    result varies over both the tokens' axes and the weights' axes. Adding a zero does it on
    any jax version (the implicit cast's transpose sums the weight gradients over devices)."""
    zero = sum(jnp.zeros_like(a.reshape(-1)[0], jnp.float32) for a in arrays if a is not None)
    return tuple(None if a is None else a + zero.astype(a.dtype) for a in arrays)


def expert_grad_zeros(w_EXY):
    """A float32 accumulator for one expert's slice of w's gradient (None for no weight)."""
    return None if w_EXY is None else jnp.zeros_like(w_EXY, jnp.float32, shape=w_EXY.shape[1:])


def put_expert(dw_EXY, acc_XY, e):
    """dw with expert e's slice set to the accumulated gradient (None for no weight)."""
    return None if dw_EXY is None else jax.lax.dynamic_update_index_in_dim(
        dw_EXY, acc_XY.astype(dw_EXY.dtype), e, 0)


def t_mm(a, b):
    """a.T @ b, accumulated in float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked_ffn(x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks, activate):
    return _ffn_loops(x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks, activate,
                      False)[0]


def _blocked_ffn_fwd(x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks, activate):
    y, h, g = _ffn_loops(x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks, activate,
                         True)
    return y, (x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, h, g)


def _ffn_loops(x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks, activate,
               save: bool):
    """Per block: h = x @ w_in[e] (g = x @ w_gate[e]), y = activate(h, g) @ w_out[e].

    Returns y, and h, g for the backward pass if save (else None)."""
    m, f = x_MD.shape[0], w_in_EDF.shape[-1]
    gated = w_gate_EDF is not None
    zeros = lambda n, keep=True: jnp.zeros_like(x_MD, shape=(m, n)) if keep else None

    def expert_fn(e, row, size, carry):
        w_in, w_out = w_in_EDF[e], w_out_EFD[e]
        w_gate = w_gate_EDF[e] if gated else None

        def block_fn(r, b, carry):
            y, h, g = carry
            x_bD = slice_rows(x_MD, r, b)
            h_bF = x_bD @ w_in
            g_bF = x_bD @ w_gate if gated else None
            y = put_rows(y, activate(h_bF, g_bF) @ w_out, r)
            if save:
                h, g = put_rows(h, h_bF, r), put_rows(g, g_bF, r) if gated else None
            return y, h, g
        return block_loops(row, size, blocks, block_fn, carry)
    init = (zeros(x_MD.shape[1]), zeros(f, save), zeros(f, save and gated))
    return expert_loop(group_sizes_E, expert_fn, init)


def _blocked_ffn_bwd(blocks, activate, res, dy_MD):
    """Per block, from the saved h and g: the four (six with a gate) matmuls of the backward
    pass; weight gradients accumulate per expert in float32."""
    x_MD, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, h_MF, g_MF = res
    gated = w_gate_EDF is not None

    def expert_fn(e, row, size, carry):
        dx, dw_in, dw_gate, dw_out = carry
        w_in, w_out = w_in_EDF[e], w_out_EFD[e]
        w_gate = w_gate_EDF[e] if gated else None

        def block_fn(r, b, carry):
            dx, a_in, a_gate, a_out = carry
            x_bD, dy_bD = slice_rows(x_MD, r, b), slice_rows(dy_MD, r, b)
            h_bF = slice_rows(h_MF, r, b)
            g_bF = slice_rows(g_MF, r, b) if gated else None
            act_bF, act_vjp = jax.vjp(activate, h_bF, g_bF)
            dh_bF, dg_bF = act_vjp(mm_t(dy_bD, w_out))
            dx_bD = mm_t(dh_bF, w_in)
            if gated:
                dx_bD = dx_bD + mm_t(dg_bF, w_gate)
                a_gate = a_gate + t_mm(x_bD, dg_bF)
            return (put_rows(dx, dx_bD, r), a_in + t_mm(x_bD, dh_bF), a_gate,
                    a_out + t_mm(act_bF, dy_bD))
        dx, a_in, a_gate, a_out = block_loops(
            row, size, blocks, block_fn,
            (dx, expert_grad_zeros(w_in_EDF), expert_grad_zeros(w_gate_EDF),
             expert_grad_zeros(w_out_EFD)))
        return (dx, put_expert(dw_in, a_in, e), put_expert(dw_gate, a_gate, e),
                put_expert(dw_out, a_out, e))
    like = lambda w: None if w is None else jnp.zeros_like(w)
    init = (like(x_MD), like(w_in_EDF), like(w_gate_EDF), like(w_out_EFD))
    dx, dw_in, dw_gate, dw_out = expert_loop(group_sizes_E, expert_fn, init)
    return dx, dw_in, dw_gate, dw_out, None


_blocked_ffn.defvjp(_blocked_ffn_fwd, _blocked_ffn_bwd)
