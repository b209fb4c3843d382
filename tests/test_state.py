"""The train state and its shardings (moejax/run/state.py), read from the arrays themselves."""
import jax
import numpy as np

from moejax import mesh as mesh_lib
from moejax.run import state as state_lib
from tests.layouts import initial_state, make_config


def test_each_device_holds_its_share_of_the_experts():
    """From the arrays: E / mesh.expert experts per device, distinct along the expert axis; and
    the whole state is the one-device init's, bit for bit (the layout tests start from that)."""
    cfg = make_config({'fsdp': 2, 'expert': 4})
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    state = state_lib.init_state(setup, cfg.train.seed)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
                 jax.device_get(initial_state(setup)))
    E, D = cfg.moe.num_experts, cfg.model.d_model
    # The expert weights, and the optimizer's moments of them (mu, nu).
    found = [(jax.tree_util.keystr(path), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
             if 'w_in_EDF' in jax.tree_util.keystr(path) or 'w_out_EFD' in jax.tree_util.keystr(path)]
    assert len(found) == 6, [name for name, _ in found]
    for name, array in found:
        assert array.shape[0] == E
        shards = array.addressable_shards
        assert len(shards) == 8
        assert all(s.data.shape[0] == E // 4 for s in shards), name
        # D (the 'embed' dim) is split over fsdp as well: a quarter of the experts, half of D.
        embed_dim = 1 if 'w_in_EDF' in name else 2
        assert all(s.data.shape[embed_dim] == D // 2 for s in shards), name
        assert {s.index[0].start for s in shards} == {0, 2, 4, 6}, name
        full = np.asarray(array)
        for s in shards:  # each device's rows are that slice of the whole array
            np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
