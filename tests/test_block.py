"""The MoE block (moejax/moe/block.py): route, capacity and dispatch together, against a dense
FFN."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.moe import experts
from moejax.moe.block import MoEBlock
from tests.helpers import tiny_config


def test_moe_block_with_one_expert_equals_dense_ffn():
    """E=1, k=1, ample capacity: the gate is softmax over one expert = 1, so MoE == its FFN."""
    cfg = tiny_config(num_experts=1, top_k=1, capacity_factor=2.0, eval_capacity_factor=2.0)
    block = MoEBlock(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    dense = experts.MLP(cfg.model.d_model, cfg.model.d_ff, 'gelu',
                       rngs=nnx.Rngs(params=jax.random.key(1)))
    dense.w_in_DF[...] = block.w_in_EDF[...][0]
    dense.w_out_FD[...] = block.w_out_EFD[...][0]
    x = jax.random.normal(jax.random.key(2), (2, 8, cfg.model.d_model))
    y, stats = block(x, jnp.ones((2, 8), jnp.int32), train=False)
    np.testing.assert_allclose(y, dense(x), atol=1e-5)
    assert float(stats['dropped_fraction']) == 0.0
