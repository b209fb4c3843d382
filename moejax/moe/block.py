"""The MoE block: a router, a dispatch engine and E experts (plus optional shared experts).

Tokens are routed within groups defined by the data (a sequence, or `moe.group_size`
consecutive tokens), never by the device layout, so every mesh computes the same function.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config as config_lib
from moejax import sharding
from moejax.moe import dispatch, expert_parallel, experts, routing


class MoEBlock(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        m, e = cfg.model, cfg.moe
        self.moe_cfg = e
        self.router = routing.Router(m.d_model, e, rngs=rngs)
        E, D, F = e.num_experts, m.d_model, config_lib.expert_d_ff(cfg)
        self.w_in_EDF = sharding.param(rngs, (E, D, F), ('exp', 'embed', 'mlp'), D)
        self.w_gate_EDF = (sharding.param(rngs, (E, D, F), ('exp', 'embed', 'mlp'), D)
                           if m.activation == 'swiglu' else None)
        self.w_out_EFD = sharding.param(rngs, (E, F, D), ('exp', 'mlp', 'embed'), F)
        shared_width = config_lib.shared_d_ff(cfg)
        self.shared = (experts.MLP(D, shared_width, m.activation, rngs=rngs)
                       if shared_width else None)
        # Qwen2-MoE: the shared experts' output is scaled by sigmoid(x @ w), a learned per-token
        # choice between the shared FFN and the routed experts (NLLB-200's two-level gate).
        self.shared_gate_D1 = (sharding.param(rngs, (D, 1), ('embed', None), D)
                               if shared_width and e.shared_gate else None)

    def expert_weights(self, dtype) -> experts.ExpertWeights:
        w_gate = self.w_gate_EDF[...].astype(dtype) if self.w_gate_EDF is not None else None
        return experts.ExpertWeights(self.w_in_EDF[...].astype(dtype), w_gate,
                                      self.w_out_EFD[...].astype(dtype))

    def __call__(self, x_BTD, segment_ids_BT, *, train: bool, rng=None):
        """Returns y_BTD and this layer's routing statistics and (unweighted) losses."""
        e = self.moe_cfg
        seq_len = x_BTD.shape[1] if e.seq_aux_loss_weight > 0 else 0
        return self._apply(x_BTD, segment_ids_BT > 0, e.group_size or x_BTD.shape[1],
                           train=train, rng=rng, seq_len=seq_len, parallel=True)

    def decode(self, x_BTD):
        """The block for cached decoding: each row's T new tokens form one routing group, with
        no noise, the eval capacity and no expert-parallel exchange (a batch of a few rows).

        Decoding one token at a time makes every group a single token, so token-choice routing
        never drops there; the full forward routes a whole sequence per group and can drop when
        the eval capacity is short. The two agree whenever the full forward drops nothing.
        Expert choice picks tokens within a group, so decoding it per token differs by design.
        """
        B, T, _ = x_BTD.shape
        y_BTD, _ = self._apply(x_BTD, jnp.ones((B, T), bool), T, train=False, rng=None,
                               seq_len=0, parallel=False)
        return y_BTD

    def capacity(self, group_size: int, train: bool) -> int:
        """Slots per expert in a routing group: the one place capacity is computed."""
        e = self.moe_cfg
        return routing.expert_capacity(
            e, group_size, e.capacity_factor if train else e.eval_capacity_factor)

    def _apply(self, x_BTD, real_BT, group_size: int, *, train, rng, seq_len, parallel):
        """Route in groups of group_size tokens, dispatch, run the experts, combine: on this
        device, or (parallel) through expert_parallel's exchange where the mesh asks for it."""
        e = self.moe_cfg
        B, T, D = x_BTD.shape
        x_GSD = x_BTD.reshape(B * T // group_size, group_size, D)
        mask_GS = real_BT.reshape(B * T // group_size, group_size)
        capacity = self.capacity(group_size, train)
        route = self.router(x_GSD, mask_GS, train=train, rng=rng, capacity=capacity,
                            seq_len=seq_len)
        y_GSD, dropped, left = self._dispatch(x_GSD, mask_GS, route, capacity,
                                              expert_parallel.path(e, route) if parallel
                                              else 'gspmd', x_BTD.dtype)
        y_BTD = sharding.constrain(y_GSD.reshape(B, T, D), ('batch', 'length', 'act_embed'))
        y_BTD = y_BTD + self.shared_out(x_BTD)
        stats = dict(route.losses, **route.stats, dropped_fraction=dropped, tokens_left_behind=left)
        return y_BTD, stats

    def _dispatch(self, x_GSD, mask_GS, route, capacity: int, path: str, dtype):
        """(y_GSD, dropped_fraction, tokens_left_behind) by the path expert_parallel chose."""
        e, w = self.moe_cfg, self.expert_weights(dtype)
        if path == 'ragged':
            y_GSD, keep_GSK = expert_parallel.ragged_dispatch_combine(
                x_GSD, mask_GS, route, w, buffer_factor=e.ep_buffer_factor,
                grouped_matmul=e.grouped_matmul)
            return (y_GSD, *dispatch.drop_stats(keep_GSK, mask_GS))
        engine = (expert_parallel.dispatch_combine if path == 'buffers'
                  else dispatch.dispatch_combine)
        y_GSD, dropped = engine(x_GSD, mask_GS, route, w, engine=e.dispatch, capacity=capacity,
                                grouped_matmul=e.grouped_matmul)
        left = dispatch.tokens_left_behind(mask_GS, route, engine=e.dispatch, capacity=capacity,
                                           num_experts=e.num_experts)
        return y_GSD, dropped, left

    def shared_out(self, x_BTD):
        """The shared experts' contribution (0 without them), gated when moe.shared_gate."""
        if self.shared is None:
            return 0.0
        y_BTD = self.shared(x_BTD)
        if self.shared_gate_D1 is not None:
            gate_BT1 = jnp.einsum('btd,do->bto', x_BTD, self.shared_gate_D1[...].astype(x_BTD.dtype))
            y_BTD = jax.nn.sigmoid(gate_BT1) * y_BTD
        return y_BTD

    def update_bias(self, expert_load_E) -> None:
        """Loss-free balancing (DeepSeek-V3): nudge the selection bias toward uniform load."""
        if self.moe_cfg.balance == 'bias':
            bias = self.router.expert_bias
            bias[...] = routing.updated_bias(bias[...], expert_load_E,
                                              self.moe_cfg.bias_update_rate)
