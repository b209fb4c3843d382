"""Ragged row exchange along the expert axis: each device sends only the rows it routes.

`ragged_all_to_all` is `jax.lax.ragged_all_to_all` on GPU and TPU. XLA:CPU cannot compile that
op (jax 0.12), so on CPU the same call runs an emulation with identical semantics, chosen by
`jax.lax.platform_dependent` when the program is lowered: a step lowered for cuda or tpu holds
only the real collective, and the CPU tests run everything else of the very same program.

`send_rows` / `return_rows` are the MoE exchange of one device inside shard_map (after Megatron's
and MaxText's ragged dispatchers): rows sorted by global expert go to the devices that own those
experts, into a receive buffer of static size; the received rows are regrouped so each local
expert's rows are contiguous (a grouped matmul's groups), and the results travel back the same
way. Rows that do not fit a receiver's buffer are dropped by a fixed rule (`send_rows`).

Shapes: R rows on this device, B receive-buffer rows, D features, E global experts, L local
experts (E = n L for n devices on the axis), N peers (= n), K slices of a ragged all-to-all.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# ---- the collective ---------------------------------------------------------------------------

def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` from a dense all_to_all (for CPU, which lacks the op).

    With n devices on the axis and K = len(input_offsets) (a multiple of n), slice i of this
    device, operand[input_offsets[i]:][:send_sizes[i]], goes to peer i // (K / n), which writes
    it at its rows output_offsets[i]:][:send_sizes[i]] (the receiver's coordinates); rows of
    `output` that nothing writes keep their value. Each slice travels in a zero-padded chunk of
    min(len(operand), len(output)) rows, so this moves K times that: meant for tests on CPU.
    Built from differentiable ops and linear in (operand, output), so autodiff gives the exact
    transpose: the reverse exchange, as JAX's rule for the real op.
    """
    n = lax.axis_size(axis_name)
    num_slices = input_offsets.shape[0]
    if num_slices % n:
        raise ValueError(f'{num_slices} slices do not divide among {n} devices')
    num_in, num_out = operand.shape[0], output.shape[0]
    row_C = jnp.arange(min(num_in, num_out), dtype=jnp.int32)
    # Sender: slice i -> chunk i, zero past send_sizes[i].
    sent_KC = row_C < send_sizes.astype(jnp.int32)[:, None]
    src_KC = jnp.where(sent_KC, input_offsets.astype(jnp.int32)[:, None] + row_C, num_in)
    chunks_KCD = jnp.take(operand, src_KC, axis=0, mode='fill', fill_value=0)
    # Exchange: block s now holds peer s's slices for this device, and where they go here.
    got_KCD = lax.all_to_all(chunks_KCD, axis_name, 0, 0, tiled=True)
    at_K = lax.all_to_all(output_offsets.astype(jnp.int32), axis_name, 0, 0, tiled=True)
    # Receiver: the first recv_sizes[i] rows of chunk i, written at its offset.
    dst_KC = at_K[:, None] + row_C
    written_KC = (row_C < recv_sizes.astype(jnp.int32)[:, None]) & (dst_KC >= 0) & (
        dst_KC < num_out)
    dst_M = jnp.where(written_KC, dst_KC, num_out).reshape(-1)  # num_out: out of range, dropped
    got_MD = got_KCD.reshape((-1,) + operand.shape[1:])
    written = jnp.zeros((num_out,), bool).at[dst_M].set(True, mode='drop')
    received = jnp.zeros_like(output).at[dst_M].add(got_MD, mode='drop')
    return jnp.where(written.reshape((num_out,) + (1,) * (output.ndim - 1)), received, output)


def _varying(output, operand, axis_name):
    """`output` typed (shard_map's types) to vary over the axes `operand` varies over and over
    axis_name: the real op's result takes `output`'s type, the emulation's varies like operand,
    and both branches must have one type."""
    axes = set(jax.typeof(operand).mat.varying) | {axis_name}
    missing = tuple(sorted(axes - set(jax.typeof(output).mat.varying)))
    return lax.pcast(output, missing, to='varying') if missing else output


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      *, axis_name):
    """`jax.lax.ragged_all_to_all` (inside shard_map), emulated where the platform is CPU."""
    real = lambda *args: lax.ragged_all_to_all(*args, axis_name=axis_name)
    emulated = lambda *args: emulated_ragged_all_to_all(*args, axis_name=axis_name)
    return lax.platform_dependent(operand, _varying(output, operand, axis_name), input_offsets,
                                  send_sizes, output_offsets, recv_sizes, cpu=emulated,
                                  default=real)


# ---- the MoE exchange -------------------------------------------------------------------------

def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis, dtype=x.dtype) - x


class Exchange(NamedTuple):
    """One device's side of a row exchange (int32 arrays; dropped_R bool), for return_rows.

    A chunk is this device's rows for one peer's experts (contiguous: rows are sorted by expert).
    """
    input_offsets_N: jax.Array   # where the chunk for peer j starts in this device's rows
    send_sizes_N: jax.Array      # rows of that chunk peer j took (a prefix of it)
    output_offsets_N: jax.Array  # where peer j wrote them (its buffer's rows)
    recv_sizes_N: jax.Array      # rows this device took from peer s
    recv_offsets_N: jax.Array    # where peer s's rows start in this device's buffer
    peer_offsets_N: jax.Array    # where peer s's chunk started in peer s's rows
    order_B: jax.Array           # buffer row (peer-major) behind each expert-major row
    dropped_R: jax.Array         # this device's rows no buffer had room for


def send_rows(x_RD, count_E, *, buffer_rows: int, axis_name: str):
    """Send each row to the device that owns its expert (expert e lives on device e // L as
    local expert e % L); returns (x_BD, group_sizes_L, exchange).

    x_RD: this device's rows sorted by global expert, count_E rows for each (rows past their
    sum are padding, never sent). x_BD: the rows this device received, grouped by local expert
    (expert 0's from peers 0..n-1 in peer order, then expert 1's, ...), then zeros;
    group_sizes_L: how many rows each local expert got.

    The drop rule: each device fills its buffer in peer order, and a peer's chunk keeps the
    rows that fit, in their order (by expert, then position): the chunks of the last peers, and
    in them the last experts' last rows, are dropped first; exchange.dropped_R marks them.

    Communication: two all_to_alls of a few int32 per peer (counts, then where each chunk
    lands), and one ragged all-to-all of the rows.
    """
    n = lax.axis_size(axis_name)
    num_rows, num_local = x_RD.shape[0], count_E.shape[0] // n
    count_NL = count_E.astype(jnp.int32).reshape(n, num_local)
    send_total_N = jnp.sum(count_NL, axis=1)
    input_offsets_N = _exclusive_cumsum(send_total_N)
    # 1. Each peer learns how many rows this device holds for each of its local experts.
    header = lax.all_to_all(jnp.concatenate([count_NL, input_offsets_N[:, None]], axis=1),
                            axis_name, 0, 0, tiled=True)
    got_count_NL, peer_offsets_N = header[:, :num_local], header[:, num_local]
    # 2. The drop rule: the buffer fills in peer order; what does not fit is clipped.
    recv_total_N = jnp.sum(got_count_NL, axis=1)
    recv_offsets_N = jnp.minimum(_exclusive_cumsum(recv_total_N), buffer_rows)
    recv_sizes_N = jnp.minimum(recv_total_N, buffer_rows - recv_offsets_N)
    # 3. Each sender learns where its chunk lands and how much of it was taken.
    reply = lax.all_to_all(jnp.stack([recv_offsets_N, recv_sizes_N], axis=1), axis_name, 0, 0,
                           tiled=True)
    output_offsets_N, send_sizes_N = reply[:, 0], reply[:, 1]
    # 4. Which rows were dropped: past what their peer took of their chunk.
    dropped_R = _dropped_rows(num_rows, send_total_N, input_offsets_N, send_sizes_N)
    # 5. The rows, into a peer-major buffer.
    buffer_BD = jnp.zeros((buffer_rows,) + x_RD.shape[1:], x_RD.dtype)
    got_BD = ragged_all_to_all(x_RD, buffer_BD, input_offsets_N, send_sizes_N, output_offsets_N,
                               recv_sizes_N, axis_name=axis_name)
    # 6. Expert-major, peer order within an expert.
    kept_NL, order_B = _expert_major(got_count_NL, recv_sizes_N, buffer_rows)
    exchange = Exchange(input_offsets_N, send_sizes_N, output_offsets_N, recv_sizes_N,
                        recv_offsets_N, peer_offsets_N, order_B, dropped_R)
    return got_BD[order_B], jnp.sum(kept_NL, axis=0), exchange


def _dropped_rows(num_rows, send_total_N, input_offsets_N, send_sizes_N):
    """[R] bool: the rows past what their peer took of their chunk (padding rows: False)."""
    n = send_total_N.shape[0]
    row_R = jnp.arange(num_rows, dtype=jnp.int32)
    peer_R = jnp.searchsorted(jnp.cumsum(send_total_N), row_R, side='right')
    real_R = peer_R < n
    peer_R = jnp.minimum(peer_R, n - 1)
    return real_R & (row_R - input_offsets_N[peer_R] >= send_sizes_N[peer_R])


def _expert_major(got_count_NL, recv_sizes_N, buffer_rows):
    """(kept_NL, order_B): the rows kept from each peer for each local expert, and the order
    that makes the peer-major buffer expert-major: each buffer row is labelled with its local
    expert (L for the empty tail) and sorted stably, which keeps peer order within an expert."""
    n, num_local = got_count_NL.shape
    kept_NL = jnp.clip(recv_sizes_N[:, None] - _exclusive_cumsum(got_count_NL, axis=1), 0,
                       got_count_NL)
    label_S = jnp.concatenate([jnp.tile(jnp.arange(num_local, dtype=jnp.int32), n),
                               jnp.array([num_local], jnp.int32)])
    repeat_S = jnp.concatenate([kept_NL.reshape(-1), (buffer_rows - jnp.sum(kept_NL))[None]])
    label_B = jnp.repeat(label_S, repeat_S, total_repeat_length=buffer_rows)
    return kept_NL, jnp.argsort(label_B, stable=True).astype(jnp.int32)


def return_rows(y_BD, exchange: Exchange, *, num_rows: int, axis_name: str):
    """The inverse of send_rows: y_BD (rows in x_BD's order) back to the rows they came from;
    dropped and padding rows come back as zeros."""
    buffer_rows = y_BD.shape[0]
    unsort_B = jnp.zeros((buffer_rows,), jnp.int32).at[exchange.order_B].set(
        jnp.arange(buffer_rows, dtype=jnp.int32))
    out_RD = jnp.zeros((num_rows,) + y_BD.shape[1:], y_BD.dtype)
    return ragged_all_to_all(y_BD[unsort_B], out_RD, exchange.recv_offsets_N,
                             exchange.recv_sizes_N, exchange.peer_offsets_N,
                             exchange.send_sizes_N, axis_name=axis_name)
