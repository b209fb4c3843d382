"""A small DeepSeek-V3-style MoE LM (DeepSeek-AI 2024) that trains on a 2-core CPU in minutes.

DeepSeek-V3's routing on the data and model width (d_model 128) of configs/default.py:wide:
fine-grained SwiGLU experts (16 routed, d_ff 128, plus 1 shared expert) in every layer; each
token scores experts with sigmoids, keeps its 2 best of 4 expert groups (group score: the sum
of its two best scores, selection bias included), takes its top-4 experts there, normalises
their scores to sum to 1 and scales them by 2.5. Balance is loss-free: a per-expert selection
bias (never in the gate) nudged by 1e-3 per step toward uniform load. Dropless dispatch, as
DeepSeek-V3 drops no tokens.
(DeepSeek-V3 itself: 256 routed experts of d_ff 2048, top-8, 8 groups, top-4 groups, the first 3
layers dense, plus a 1e-4 sequence-wise balance loss beside the bias, which moejax's
moe.balance does not combine.)
COMMAND: python launch/train.py --config=configs/deepseek_v3_small.py --workdir=/tmp/moejax_dsv3
"""
from configs import default


def get_config(arg: str | None = None):
    cfg = default.get_config(f'wide,{arg}' if arg else 'wide')
    cfg.model.update(moe_every=1, activation='swiglu', d_ff=128)
    cfg.moe.update(num_experts=16, top_k=4, num_shared_experts=1, dispatch='dropless',
                   score_fn='sigmoid', gate_norm='renorm', routed_scaling_factor=2.5,
                   num_expert_groups=4, top_expert_groups=2, balance='bias',
                   bias_update_rate=1e-3, aux_loss_weight=0.0, z_loss_weight=0.0)
    return cfg
