"""Checkpoints of the whole run (moejax/run/checkpoint.py): restored onto another mesh."""
import jax
import jax.numpy as jnp
import numpy as np

from moejax import mesh as mesh_lib
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import state as state_lib
from tests.layouts import make_config


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    """Saved on data=8, restored onto data=2 x expert=4: same values, the new shardings."""
    cfg = make_config({'data': 8})
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    state = state_lib.init_state(setup, 0)
    # Distinct non-zero optimizer moments, so a mix-up between leaves would show.
    bump = lambda x: x * 2 + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3
    state = state.replace(opt_state=jax.tree.map(bump, state.opt_state))
    saver = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
    saver.save(3, state, {'next_batch': 3})
    saver.close()

    cfg2 = make_config({'data': 2, 'expert': 4})
    setup2 = state_lib.make_setup(cfg2, mesh_lib.make_mesh(cfg2.mesh))
    loader = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
    restored, data_state, step = loader.restore(setup2.abstract_state)
    loader.close()
    assert step == 3 and data_state == {'next_batch': 3}
    saved, loaded = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(saved) == len(loaded)
    for a, b, sharding in zip(saved, loaded, jax.tree.leaves(setup2.state_shardings)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(sharding, b.ndim)
    w_in = restored.params['blocks'][0]['ffn']['w_in_EDF'][...]
    assert {s.data.shape[0] for s in w_in.addressable_shards} == {cfg2.moe.num_experts // 4}
