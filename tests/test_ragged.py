"""Tests of ragged.py against plain-NumPy truth, on simulated CPU devices.

Run: cd /work/scratch/ragged && /work/main/.venv/bin/python -m pytest -q test_ragged.py
(conftest.py sets JAX_PLATFORMS=cpu and 8 CPU devices.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.moe.ragged import emulated_ragged_all_to_all, ragged_all_to_all, return_rows, send_rows

AXIS = 'expert'


def make_mesh(n):
    return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n])


def shard(mesh, *arrays):
    """Puts arrays on the mesh, leading axis split over AXIS."""
    sharding = NamedSharding(mesh, P(AXIS))
    return [jax.device_put(jnp.asarray(a), sharding) for a in arrays]


def per_device(mesh, fn):
    """shard_map of fn over stacked [n, ...] inputs: fn sees device i's [i]."""

    def body(*blocks):
        outs = fn(*[b[0] for b in blocks])
        return jax.tree.map(lambda o: o[None], outs)

    return jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))


# ---------------------------------------------------------------------------
# 1. ragged_all_to_all (emulation on CPU) vs. its documented semantics
# ---------------------------------------------------------------------------


def place(rng, sizes, capacity):
    """Random non-overlapping offsets for segments `sizes` in [0, capacity)."""
    order = rng.permutation(len(sizes))
    leftover = capacity - int(np.sum(sizes))
    assert leftover >= 0
    gaps = np.diff(np.concatenate([[0], np.sort(rng.integers(0, leftover + 1, len(sizes)))]))
    offsets = np.zeros(len(sizes), np.int32)
    pos = 0
    for gap, idx in zip(gaps, order):
        pos += gap
        offsets[idx] = pos
        pos += sizes[idx]
    return offsets


def random_ragged_case(rng, n, spd, *, full, zero_frac=0.3, dim=3):
    """Valid random ragged_all_to_all arguments, stacked over n devices.

    spd slices per peer (K = n * spd). Input slices are disjoint within each
    operand, written slices disjoint within each output; if `full`, the busiest
    receiver's output is exactly filled.
    """
    k = n * spd
    size_SK = rng.integers(0, 4, (n, k)).astype(np.int32)
    size_SK[rng.random((n, k)) < zero_frac] = 0
    recv_sizes = np.zeros((n, k), np.int32)  # [receiver, s * spd + kk]
    for s in range(n):
        for i in range(k):
            j, kk = divmod(i, spd)
            recv_sizes[j, s * spd + kk] = size_SK[s, i]
    num_in = int(size_SK.sum(1).max()) + 2
    num_out = int(recv_sizes.sum(1).max()) + (0 if full else 3)
    num_out = max(num_out, 1)
    input_offsets = np.stack([place(rng, size_SK[s], num_in) for s in range(n)])
    output_offsets = np.zeros((n, k), np.int32)
    for j in range(n):
        offs = place(rng, recv_sizes[j], num_out)
        for s in range(n):
            for kk in range(spd):
                output_offsets[s, j * spd + kk] = offs[s * spd + kk]
    operand = rng.standard_normal((n, num_in, dim)).astype(np.float32)
    output = rng.standard_normal((n, num_out, dim)).astype(np.float32)
    return operand, output, input_offsets, size_SK, output_offsets, recv_sizes


def ragged_truth(operand, output, input_offsets, send_sizes, output_offsets):
    """Documented semantics as a loop: slice i of sender s lands on peer i // spd."""
    n, k = input_offsets.shape
    spd = k // n
    result = output.copy()
    for s in range(n):
        for i in range(k):
            j, size = i // spd, send_sizes[s, i]
            src, dst = input_offsets[s, i], output_offsets[s, i]
            result[j, dst : dst + size] = operand[s, src : src + size]
    return result


def ragged_vjp_truth(cot, operand, input_offsets, send_sizes, output_offsets):
    """Transpose of the loop above: gather cotangents back, zero written rows."""
    n, k = input_offsets.shape
    spd = k // n
    operand_bar = np.zeros_like(operand)
    output_bar = cot.copy()
    for s in range(n):
        for i in range(k):
            j, size = i // spd, send_sizes[s, i]
            src, dst = input_offsets[s, i], output_offsets[s, i]
            operand_bar[s, src : src + size] += cot[j, dst : dst + size]
            output_bar[j, dst : dst + size] = 0
    return operand_bar, output_bar


RAGGED_CASES = [  # (n, slices per peer, full buffer, fraction of zero sizes)
    (2, 1, False, 0.3),
    (2, 2, True, 0.3),
    (4, 1, True, 0.3),
    (4, 2, False, 0.5),
    (8, 1, True, 0.3),
    (8, 2, False, 0.3),
    (4, 1, False, 1.0),  # everything empty: output untouched
]


@pytest.mark.parametrize('n,spd,full,zero_frac', RAGGED_CASES)
def test_ragged_all_to_all_matches_documented_semantics(n, spd, full, zero_frac):
    rng = np.random.default_rng(100 * n + 10 * spd + full)
    case = random_ragged_case(rng, n, spd, full=full, zero_frac=zero_frac)
    operand, output, io, ss, oo, rs = case
    mesh = make_mesh(n)
    args = shard(mesh, *case)
    fn = per_device(mesh, lambda *a: ragged_all_to_all(*a, axis_name=AXIS))
    emu = per_device(mesh, lambda *a: emulated_ragged_all_to_all(*a, axis_name=AXIS))
    want = ragged_truth(operand, output, io, ss, oo)
    cot = rng.standard_normal(output.shape).astype(np.float32)
    want_bar = ragged_vjp_truth(cot, operand, io, ss, oo)
    with jax.set_mesh(mesh):
        np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*args)), want)
        np.testing.assert_array_equal(np.asarray(jax.jit(emu)(*args)), want)

        # Reverse mode: exact transpose (= JAX's rule for disjoint slices).
        def loss(x, out):
            return jnp.sum(fn(x, out, *args[2:]) * cot)

        got_bar = jax.jit(jax.grad(loss, (0, 1)))(args[0], args[1])
        np.testing.assert_array_equal(np.asarray(got_bar[0]), want_bar[0])
        np.testing.assert_array_equal(np.asarray(got_bar[1]), want_bar[1])

        # Forward mode: the map is linear, so the tangent is the map of tangents.
        t_op, t_out = rng.standard_normal(operand.shape), rng.standard_normal(output.shape)
        t_op, t_out = shard(mesh, t_op.astype(np.float32), t_out.astype(np.float32))
        _, tangent = jax.jit(
            lambda x, o, tx, to: jax.jvp(lambda x, o: fn(x, o, *args[2:]), (x, o), (tx, to))
        )(args[0], args[1], t_op, t_out)
        np.testing.assert_array_equal(
            np.asarray(tangent), ragged_truth(np.asarray(t_op), np.asarray(t_out), io, ss, oo)
        )


def test_emulation_grad_equals_jax_transpose_rule():
    """Autodiff of the emulation == the operand cotangent JAX's rule computes.

    jax/_src/lax/parallel.py `_ragged_all_to_all_transpose`: operand_t =
    ragged_all_to_all(t, zeros_like(operand), all_to_all(output_offsets),
    recv_sizes, all_to_all(input_offsets), send_sizes); output_t = t with the
    received rows zeroed. Evaluated here with the emulation.
    """
    n = 4
    rng = np.random.default_rng(7)
    case = random_ragged_case(rng, n, 2, full=True)
    mesh = make_mesh(n)
    args = shard(mesh, *case)
    cot = shard(mesh, rng.standard_normal(case[1].shape).astype(np.float32))[0]

    def autodiff(x, out, io, ss, oo, rs, t):
        _, vjp = jax.vjp(
            lambda x, out: ragged_all_to_all(x, out, io, ss, oo, rs, axis_name=AXIS), x, out
        )
        return vjp(t)

    def jax_rule(x, out, io, ss, oo, rs, t):
        oo_local = lax.all_to_all(oo, AXIS, 0, 0, tiled=True)
        io_peer = lax.all_to_all(io, AXIS, 0, 0, tiled=True)
        operand_t = ragged_all_to_all(
            t, jnp.zeros_like(x), oo_local, rs, io_peer, ss, axis_name=AXIS
        )
        written = jnp.zeros(t.shape[0], bool)
        for i in range(rs.shape[0]):  # the exact mask (JAX's misses empty segments at a shared offset)
            rows = jnp.arange(t.shape[0])
            written |= (rows >= oo_local[i]) & (rows < oo_local[i] + rs[i])
        return operand_t, jnp.where(written[:, None], 0.0, t)

    with jax.set_mesh(mesh):
        got = jax.jit(per_device(mesh, autodiff))(*args, cot)
        want = jax.jit(per_device(mesh, jax_rule))(*args, cot)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ---------------------------------------------------------------------------
# 2./3. MoE dispatch -> per-expert linear map -> combine, vs. NumPy
# ---------------------------------------------------------------------------


def random_moe_case(rng, n, num_local, num_rows, d=4, f=3, full_rows=False):
    num_experts = n * num_local
    count_NE = np.zeros((n, num_experts), np.int32)
    for s in range(n):
        total = num_rows if full_rows else int(rng.integers(0, num_rows + 1))
        p = rng.random(num_experts) * (rng.random(num_experts) > 0.3)  # some empty
        p = p + 1e-9 if p.sum() == 0 else p
        count_NE[s] = rng.multinomial(total, p / p.sum())
    x = rng.standard_normal((n, num_rows, d)).astype(np.float32)
    w = rng.standard_normal((num_experts, d, f)).astype(np.float32)
    cot = rng.standard_normal((n, num_rows, f)).astype(np.float32)
    return x, count_NE, w, cot


def moe_truth(x, count_NE, w, cot, buffer_rows):
    """Row-by-row truth: expert of each row, drop rule, outputs and grads."""
    n, num_rows, d = x.shape
    num_experts, _, f = w.shape
    num_local = num_experts // n
    expert_NR = np.full((n, num_rows), -1)
    for s in range(n):
        expert_NR[s, : count_NE[s].sum()] = np.repeat(np.arange(num_experts), count_NE[s])
    # Drop rule: receiver j takes rows sender by sender, in row order, until full.
    dropped = np.zeros((n, num_rows), bool)
    for j in range(n):
        fill = 0
        for s in range(n):
            for r in np.nonzero(expert_NR[s] // num_local == j)[0]:
                if expert_NR[s, r] < 0:
                    continue
                if fill < buffer_rows:
                    fill += 1
                else:
                    dropped[s, r] = True
    kept = (expert_NR >= 0) & ~dropped
    y = np.zeros((n, num_rows, f), np.float32)
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    x_buf = np.zeros((n, buffer_rows, d), np.float32)
    group_sizes = np.zeros((n, num_local), np.int32)
    for s in range(n):
        for r in np.nonzero(kept[s])[0]:
            e = expert_NR[s, r]
            y[s, r] = x[s, r] @ w[e]
            gx[s, r] = w[e] @ cot[s, r]
            gw[e] += np.outer(x[s, r], cot[s, r])
    for j in range(n):  # expected expert-major receive buffer
        rows = []
        for local in range(num_local):
            for s in range(n):
                sel = np.nonzero(kept[s] & (expert_NR[s] == j * num_local + local))[0]
                rows += [x[s, r] for r in sel]
                group_sizes[j, local] += len(sel)
        if rows:
            x_buf[j, : len(rows)] = np.stack(rows)
    return dict(y=y, gx=gx, gw=gw, dropped=dropped, x_buf=x_buf, group_sizes=group_sizes)


def run_moe(n, x, count_NE, w, cot, buffer_rows, check_vma=True):
    """Dispatch + ragged_dot + combine in shard_map; values, extras and grads."""
    mesh = make_mesh(n)
    num_rows, d = x.shape[1:]
    f = w.shape[2]

    def step(x_RD, count_E, w_LDF):
        x_BD, group_sizes_L, exchange = send_rows(
            x_RD, count_E, buffer_rows=buffer_rows, axis_name=AXIS
        )
        h_BF = lax.ragged_dot(x_BD, w_LDF, group_sizes_L)
        y_RF = return_rows(h_BF, exchange, num_rows=x_RD.shape[0], axis_name=AXIS)
        return y_RF, exchange.dropped_R, x_BD, group_sizes_L, exchange

    smap = jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=check_vma)
    x_g, count_g, w_g, cot_g = shard(
        mesh, x.reshape(n * num_rows, d), count_NE.reshape(-1), w, cot.reshape(n * num_rows, f)
    )

    def loss(x_g, w_g):
        return jnp.sum(smap(x_g, count_g, w_g)[0] * cot_g)

    with jax.set_mesh(mesh):
        y, dropped, x_buf, gs, exchange = jax.jit(smap)(x_g, count_g, w_g)
        gx, gw = jax.jit(jax.grad(loss, (0, 1)))(x_g, w_g)
    return dict(
        y=np.asarray(y).reshape(n, num_rows, f),
        dropped=np.asarray(dropped).reshape(n, num_rows),
        x_buf=np.asarray(x_buf).reshape(n, buffer_rows, d),
        group_sizes=np.asarray(gs).reshape(n, -1),
        gx=np.asarray(gx).reshape(n, num_rows, d),
        gw=np.asarray(gw),
        exchange={k: np.asarray(v).reshape(n, -1) for k, v in exchange._asdict().items()},
        buffer_rows=buffer_rows,
    )


def check_exchange(exchange, group_sizes, buffer_rows):
    """The four ragged_all_to_all argument pairs are consistent and in bounds."""
    p = exchange
    # What s sends to j is what j expects from s, at j's offsets; return trip.
    np.testing.assert_array_equal(p['send_sizes_N'], p['recv_sizes_N'].T)
    np.testing.assert_array_equal(p['output_offsets_N'], p['recv_offsets_N'].T)
    np.testing.assert_array_equal(p['peer_offsets_N'], p['input_offsets_N'].T)
    assert (p['recv_sizes_N'] >= 0).all() and (p['recv_offsets_N'] >= 0).all()
    assert (p['recv_offsets_N'] + p['recv_sizes_N'] <= buffer_rows).all()
    np.testing.assert_array_equal(group_sizes.sum(1), p['recv_sizes_N'].sum(1))


def check_moe(got, want):
    check_exchange(got['exchange'], got['group_sizes'], got['buffer_rows'])
    np.testing.assert_array_equal(got['dropped'], want['dropped'])
    np.testing.assert_array_equal(got['group_sizes'], want['group_sizes'])
    np.testing.assert_array_equal(got['x_buf'], want['x_buf'])
    for key in ('y', 'gx', 'gw'):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize('n,check_vma', [(2, True), (4, True), (8, True), (4, False)])
def test_moe_exchange_no_drops(n, check_vma):
    """Buffer n * R can never overflow: every row is sent and comes back mapped."""
    rng = np.random.default_rng(n)
    num_rows = 6
    x, count_NE, w, cot = random_moe_case(rng, n, num_local=2, num_rows=num_rows)
    want = moe_truth(x, count_NE, w, cot, buffer_rows=n * num_rows)
    got = run_moe(n, x, count_NE, w, cot, buffer_rows=n * num_rows, check_vma=check_vma)
    assert not want['dropped'].any()
    check_moe(got, want)


@pytest.mark.parametrize('n,buffer_rows', [(2, 3), (4, 5), (8, 1), (4, 'exact')])
def test_moe_exchange_forced_overflow(n, buffer_rows):
    """A small buffer drops exactly the rows the sender-order fill rule says."""
    rng = np.random.default_rng(50 + n)
    num_rows = 6
    x, count_NE, w, cot = random_moe_case(rng, n, num_local=2, num_rows=num_rows, full_rows=True)
    if buffer_rows == 'exact':  # busiest receiver exactly full, nothing dropped
        buffer_rows = int(count_NE.reshape(n, n, -1).sum(axis=(0, 2)).max())
    want = moe_truth(x, count_NE, w, cot, buffer_rows)
    got = run_moe(n, x, count_NE, w, cot, buffer_rows)
    check_moe(got, want)
    if buffer_rows < 6:
        assert want['dropped'].any()


# ---------------------------------------------------------------------------
# 4. Lowering for accelerators holds the real collective only
# ---------------------------------------------------------------------------


def _float_all_to_all_lines(hlo_text):
    """HLO all-to-all ops carrying floating data (the emulation's padded chunks)."""
    return [
        line
        for line in hlo_text.splitlines()
        if ' all-to-all(' in line
        and re.search(r'\b(f16|bf16|f32|f64)\[', line.split(' all-to-all(')[0])
    ]


@pytest.mark.parametrize('platform', ['cpu', 'cuda', 'tpu'])
def test_lowering_uses_ragged_all_to_all_off_cpu(platform):
    n, num_rows, buffer_rows = 4, 6, 10
    rng = np.random.default_rng(3)
    x, count_NE, w, cot = random_moe_case(rng, n, num_local=2, num_rows=num_rows)
    mesh = make_mesh(n)

    def step(x_RD, count_E, w_LDF):
        x_BD, group_sizes_L, exchange = send_rows(
            x_RD, count_E, buffer_rows=buffer_rows, axis_name=AXIS
        )
        return return_rows(
            lax.ragged_dot(x_BD, w_LDF, group_sizes_L),
            exchange,
            num_rows=x_RD.shape[0],
            axis_name=AXIS,
        )

    smap = jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    x_g, count_g, w_g = shard(mesh, x.reshape(n * num_rows, -1), count_NE.reshape(-1), w)

    def loss(x_g, w_g):
        return jnp.sum(smap(x_g, count_g, w_g) ** 2)

    with jax.set_mesh(mesh):
        for fn, args in ((smap, (x_g, count_g, w_g)), (jax.grad(loss, (0, 1)), (x_g, w_g))):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
            stablehlo, hlo = lowered.as_text(), lowered.as_text(dialect='hlo')
            if platform == 'cpu':  # control: the check below does see the emulation
                assert 'ragged' not in stablehlo and 'ragged-all-to-all' not in hlo
                assert _float_all_to_all_lines(hlo)
            else:
                assert 'stablehlo.custom_call @ragged_all_to_all' in stablehlo
                assert 'ragged-all-to-all(' in hlo
                assert not _float_all_to_all_lines(hlo)
