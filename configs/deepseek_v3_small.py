"""A small DeepSeek-V3-style MoE LM (DeepSeek-AI 2024) that trains on a 2-core CPU in minutes.

DeepSeek-V3's architecture on the data and model width (d_model 128) of configs/default.py:wide:
- multi-head latent attention: keys and values from a 64-channel latent per token (the KV cache
  for generation holds it and a 16-channel rotary key: 80 numbers per token per layer against
  256 for this width's standard attention), 4 heads of 32 non-rotary + 16 rotary query/key
  channels and 32 value channels; queries full rank (DeepSeek-V3 compresses them to 1536);
- fine-grained SwiGLU experts (16 routed, d_ff 128, plus 1 shared expert) in every layer; each
  token scores experts with sigmoids, keeps its 2 best of 4 expert groups (group score: the sum
  of its two best scores, selection bias included), takes its top-4 experts there, normalises
  their scores to sum to 1 and scales them by 2.5; dropless dispatch, as DeepSeek-V3 drops none;
- balance: the loss-free per-expert selection bias (never in the gate), nudged by 1e-3 per step
  toward uniform load, plus the 1e-4 sequence-wise balance loss;
- multi-token prediction at depth 1 (one extra block predicting the token after next, sharing
  the embedding and output head), weight 0.3 as in DeepSeek-V3's first 10T tokens; evaluation
  reports the next-token loss alone. Variant `no_mtp` turns it off (benchmarks/mtp.py).
(DeepSeek-V3 itself, configs/deepseek_v3_671b.py: 256 routed experts of d_ff 2048, top-8,
8 groups, top-4 groups, the first 3 layers dense, YaRN to 128K context.)
COMMAND: python launch/train.py --config=configs/deepseek_v3_small.py --workdir=/tmp/moejax_dsv3
"""
from configs import default


def get_config(arg: str | None = None):
    variants = [v for v in (arg or '').split(',') if v]
    mtp = 'no_mtp' not in variants
    base = ','.join(['wide'] + [v for v in variants if v != 'no_mtp'])
    cfg = default.get_config(base)
    cfg.model.update(moe_every=1, activation='swiglu', d_ff=128, attention_kind='mla',
                     q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, mtp_depth=1 if mtp else 0, mtp_loss_weight=0.3)
    cfg.moe.update(num_experts=16, top_k=4, num_shared_experts=1, dispatch='dropless',
                   score_fn='sigmoid', gate_norm='renorm', routed_scaling_factor=2.5,
                   num_expert_groups=4, top_expert_groups=2, balance='bias',
                   bias_update_rate=1e-3, aux_loss_weight=0.0, z_loss_weight=0.0,
                   seq_aux_loss_weight=1e-4)
    return cfg
