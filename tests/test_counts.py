"""Parameter and FLOP counts from the config alone (moejax/model/counts.py), against the
model's arrays and a hand count."""
import jax
import pytest
from flax import nnx

from moejax.model import counts
from moejax.model import transformer as model_lib
from tests.helpers import tiny_config


def test_param_counts_match_the_arrays():
    for variant in ({}, {'activation': 'swiglu', 'num_shared_experts': 1},
                    {'router': 'noisy_top_k', 'moe_every': 1},
                    {'activation': 'swiglu', 'head_dim': 8, 'qkv_bias': True, 'qk_norm': True,
                     'moe_every': 1, 'dense_layers': [0], 'expert_d_ff': 40,
                     'num_shared_experts': 1, 'shared_d_ff': 24, 'shared_gate': True}):
        cfg = tiny_config(**variant)
        params = nnx.state(model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0))),
                           nnx.Param)
        total = sum(x.size for x in jax.tree.leaves(params))
        assert counts.param_counts(cfg)['params'] == total, variant


def test_flops_per_token_counts_causal_attention_at_half():
    """By hand for configs/default.py:tiny (d_model 32, 2 layers of 2 heads, d_ff 64, 4 gelu
    experts top-1 on the second layer, byte vocabulary 259, seq_len 32)."""
    cfg = tiny_config()
    D_, F_, V, L, T = 32, 64, 259, 2, 32
    attn_params = 4 * D_ * D_ + 2 * D_  # q, k, v, o and two norms
    # the output head, attention, one dense FFN, one active expert, the router, the final norm
    matmul_params = D_ * V + L * attn_params + 2 * D_ * F_ + 2 * D_ * F_ + D_ * 4 + D_
    want = 6 * matmul_params + 3 * L * (4 * T * D_ / 2)
    assert counts.flops_per_token(cfg) == pytest.approx(want)
