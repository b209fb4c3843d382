"""The dropless engine's expert step on CPU in one custom VJP: rows in, FFN, weighted sum out.

moejax.moe.dispatch's dropless engine gathers each (token, choice) pair's row into a layout
sorted by expert, runs the grouped FFN, gathers the results back to the pairs and sums them
with the gates. Done as separate ops, that makes ~7 buffers of [layout rows, D] per step
(x, y, and their gradients in the layout and in pair order), and XLA:CPU gets fresh pages
for its temporaries on every run: with fine-grained experts (top-8 of 256: 8x the rows at
equal FLOPs) the page faults cost more than the matmuls (issue 25, docs/granularity.md).

Here the block loops of moejax.moe.grouped scatter-add each block's gate-weighted output
straight into the tokens' rows (and, backward, each block's input gradient), so only x and
dy are laid out ([P, D] each, one gather apiece) besides the FFN's hidden activations. The
gates' gradient comes from the backward's dy @ w_out.T, which it computes anyway.
"""
import functools

import jax
import jax.numpy as jnp

from moejax.moe import grouped


def blocked_dropless_ffn(x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD,
                         group_sizes_E, blocks, activate):
    """y[t] = sum over layout rows p with token_P[p] = t of gate_P[p] * FFN_e(p)(x[t]).

    The layout rows come in groups, one per expert (consecutive, each a multiple of
    blocks[-1] as in grouped.blocked_ffn); rows past the groups are never read. A padding
    row inside a group must have gate 0 (its token index any valid one). Weights must be in
    x's dtype; outputs and input gradients accumulate in float32.
    """
    blocks = tuple(b for b in blocks[:-1] if b <= token_P.shape[0]) + tuple(blocks[-1:])
    if jax.sharding.get_abstract_mesh().manual_axes:
        x_TD, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD = grouped.vary_alike(
            x_TD, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD)
    return _ffn(x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks,
                activate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ffn(x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks,
         activate):
    return _forward(x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E,
                    blocks, activate, False)[0]


def _ffn_fwd(x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks,
             activate):
    y, saved = _forward(x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E,
                        blocks, activate, True)
    return y, (x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E,
               saved)


def _forward(x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, blocks,
             activate, save: bool):
    """Per block: h = x @ w_in[e] (g = x @ w_gate[e]), y[tokens] += gate * act(h, g) @ w_out[e].

    Returns y, and (x_PD, h, g) for the backward pass if save (else None)."""
    p, f = token_P.shape[0], w_in_EDF.shape[-1]
    gated = w_gate_EDF is not None
    x_PD = x_TD[token_P]  # one gather; the loops slice it (gathers inside them cost more)

    def expert_fn(e, row, size, carry):
        w_in, w_out = w_in_EDF[e], w_out_EFD[e]
        w_gate = w_gate_EDF[e] if gated else None

        def block_fn(r, b, carry):
            y, h, g = carry
            x_bD = grouped.slice_rows(x_PD, r, b)
            h_bF = x_bD @ w_in
            g_bF = x_bD @ w_gate if gated else None
            y_bD = (activate(h_bF, g_bF) @ w_out).astype(jnp.float32)
            gate_b1 = grouped.slice_rows(gate_P, r, b)[:, None]
            y = y.at[grouped.slice_rows(token_P, r, b)].add(y_bD * gate_b1)
            if save:
                h, g = grouped.put_rows(h, h_bF, r), grouped.put_rows(g, g_bF, r) if gated else None
            return y, h, g
        return grouped.block_loops(row, size, blocks, block_fn, carry)
    hidden = lambda keep: jnp.zeros((p, f), x_TD.dtype) if keep else None
    init = (jnp.zeros(x_TD.shape, jnp.float32), hidden(save), hidden(save and gated))
    y, h, g = grouped.expert_loop(group_sizes_E, expert_fn, init)
    return y.astype(x_TD.dtype), ((x_PD, h, g) if save else None)


def _ffn_bwd(blocks, activate, res, dy_TD):
    """Per block, from the saved x, h and g: the FFN's backward on the gate-weighted dy, the
    gates' gradient sum(act * (dy @ w_out.T)), input gradients scatter-added to the tokens and
    weight gradients accumulated per expert in float32."""
    x_TD, token_P, gate_P, w_in_EDF, w_gate_EDF, w_out_EFD, group_sizes_E, saved = res
    x_PD, h_PF, g_PF = saved
    gated = w_gate_EDF is not None
    dy_PD = dy_TD[token_P]

    def expert_fn(e, row, size, carry):
        dx, dgate, dw_in, dw_gate, dw_out = carry
        w_in, w_out = w_in_EDF[e], w_out_EFD[e]
        w_gate = w_gate_EDF[e] if gated else None

        def block_fn(r, b, carry):
            dx, dgate, a_in, a_gate, a_out = carry
            gate_b1 = grouped.slice_rows(gate_P, r, b)[:, None]
            x_bD, dy_bD = grouped.slice_rows(x_PD, r, b), grouped.slice_rows(dy_PD, r, b)
            h_bF = grouped.slice_rows(h_PF, r, b)
            g_bF = grouped.slice_rows(g_PF, r, b) if gated else None
            act_bF, act_vjp = jax.vjp(activate, h_bF, g_bF)
            dact_bF = grouped.mm_t(dy_bD, w_out)  # before the gate: its product with act is dgate
            dgate_b = jnp.sum((dact_bF * act_bF).astype(jnp.float32), axis=-1)
            dgate = grouped.put_rows(dgate, dgate_b, r)
            dh_bF, dg_bF = act_vjp((dact_bF * gate_b1).astype(dact_bF.dtype))
            dx_bD = grouped.mm_t(dh_bF, w_in)
            if gated:
                dx_bD = dx_bD + grouped.mm_t(dg_bF, w_gate)
                a_gate = a_gate + grouped.t_mm(x_bD, dg_bF)
            dx = dx.at[grouped.slice_rows(token_P, r, b)].add(dx_bD.astype(jnp.float32))
            a_out = a_out + grouped.t_mm(act_bF, (dy_bD * gate_b1).astype(dy_bD.dtype))
            return dx, dgate, a_in + grouped.t_mm(x_bD, dh_bF), a_gate, a_out
        dx, dgate, a_in, a_gate, a_out = grouped.block_loops(
            row, size, blocks, block_fn,
            (dx, dgate, grouped.expert_grad_zeros(w_in_EDF), grouped.expert_grad_zeros(w_gate_EDF),
             grouped.expert_grad_zeros(w_out_EFD)))
        return (dx, dgate, grouped.put_expert(dw_in, a_in, e),
                grouped.put_expert(dw_gate, a_gate, e), grouped.put_expert(dw_out, a_out, e))
    like = lambda w: None if w is None else jnp.zeros_like(w)
    init = (jnp.zeros(x_TD.shape, jnp.float32), jnp.zeros(gate_P.shape, jnp.float32),
            like(w_in_EDF), like(w_gate_EDF), like(w_out_EFD))
    dx, dgate, dw_in, dw_gate, dw_out = grouped.expert_loop(group_sizes_E, expert_fn, init)
    return (dx.astype(x_TD.dtype), None, dgate.astype(gate_P.dtype), dw_in, dw_gate, dw_out,
            None)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)
