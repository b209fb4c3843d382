"""Every mesh layout and both expert-parallel paths train exactly like one device.

Truth is a one-device run of the same config (float32, capacity large enough that nothing
drops unless a test says so): 6 training steps on the same batches must give the same losses.
Its routing decisions must first have a clear margin (tests/decisions.py), so that the verdict
does not depend on how this CPU rounds; `pytest --router_ulps=N` nudges the logits of every
layout side by N ulps to show that it does not.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import mesh as mesh_lib
from moejax.moe import routing
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import state as state_lib
from moejax.run import step as step_lib
from tests import decisions
from tests.helpers import tiny_config

STEPS = 6
DATA_SEED = 3  # batches whose every reference decision has a clear margin (decisions.py)
RTOL = 1e-5  # DESIGN.md section 3; the issue asks for 1e-4


def make_config(mesh=None, **moe):
    """The tiny model with one MoE layer, 8 experts and (by default) a no-drop capacity."""
    num_experts = moe.pop('num_experts', 8)
    top_k = moe.get('top_k', 1)
    capacity_factor = moe.pop('capacity_factor', num_experts / top_k)
    cfg = tiny_config(num_layers=1, moe_every=1, num_experts=num_experts,
                      capacity_factor=capacity_factor, **moe)
    cfg.data.vocab_size = 260  # divisible by tensor=2 (the vocab dim is tensor-sharded)
    cfg.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    cfg.mesh.update(**(mesh or {'data': -1}))
    return cfg


def make_batches(cfg, num):
    """Random tokens with packed documents and padding, so shards hold different token counts."""
    rng = np.random.default_rng(DATA_SEED)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    seg = np.ones((B, T), np.int32)
    seg[2, T // 2:] = 2
    seg[1, 20:], seg[5, 5:], seg[6, :] = 0, 0, 0
    pos = np.where(seg == 2, np.arange(T) - T // 2, np.arange(T)) * (seg > 0)
    batches = []
    for _ in range(num):
        ids = rng.integers(3, cfg.data.vocab_size, (B, T + 1), dtype=np.int32)
        batches.append({'inputs': ids[:, :-1], 'targets': ids[:, 1:], 'segment_ids': seg,
                        'positions': pos.astype(np.int32)})
    return batches


def run(cfg, devices=None, *, ulps=None, record=False):
    """Per-step metrics of STEPS training steps on cfg's mesh, the compiled program's text, and
    (record: for a reference, whose program the recording changes) the margins of its routing
    decisions. ulps: nudge the router logits by this many ulps (default: --router_ulps)."""
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
    state = state_lib.init_state(setup, cfg.train.seed)
    batches = [state_lib.global_batch(setup, b) for b in make_batches(cfg, STEPS)]
    ulps = decisions.LAYOUT_ULPS if ulps is None else ulps
    recording = decisions.record(capacity(cfg)) if record else contextlib.nullcontext()
    with recording as margins, decisions.perturbed(ulps):
        step = step_lib.compile_steps(setup)[0].lower(state, batches[0]).compile()
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return history, step.as_text(), margins


def capacity(cfg) -> int:
    """Training slots per expert of cfg's routing groups."""
    group_size = cfg.moe.group_size or cfg.data.seq_len
    return routing.expert_capacity(cfg.moe, group_size, cfg.moe.capacity_factor)


@functools.lru_cache(maxsize=None)
def one_device(**moe):
    """The reference: history on one device, after checking its decisions' margins."""
    history, _, margins = run(make_config(**moe), jax.devices()[:1], ulps=0, record=True)
    margins.assert_clear()
    return history


def assert_same_training(history, reference):
    for key in ('loss', 'aux_loss', 'z_loss', 'grad_norm', 'dropped_fraction', 'expert_load'):
        got = np.array([h[key] for h in history])
        want = np.array([h[key] for h in reference])
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6, err_msg=key)


LAYOUTS = [
    ({'data': 8}, 'gspmd'),
    ({'data': 2, 'expert': 4}, 'gspmd'),
    ({'data': 2, 'expert': 4}, 'all_to_all'),
    ({'expert': 8}, 'all_to_all'),
    ({'data': 2, 'expert': 2, 'tensor': 2}, 'gspmd'),
    ({'data': 2, 'expert': 2, 'tensor': 2}, 'all_to_all'),
    ({'fsdp': 2, 'expert': 4}, 'gspmd'),
    ({'fsdp': 2, 'expert': 4}, 'all_to_all'),
]


def _check(mesh, comm, **moe):
    history, hlo, _ = run(make_config(mesh, comm=comm, **moe))
    assert_same_training(history, one_device(**moe))
    if comm == 'all_to_all':
        assert 'all-to-all' in hlo  # the explicit path really ran
    return history


@pytest.mark.parametrize('mesh,comm', LAYOUTS, ids=lambda v: v if isinstance(v, str) else
                         'x'.join(f'{k}{n}' for k, n in v.items()))
def test_layout_matches_one_device(mesh, comm):
    _check(mesh, comm)


@pytest.mark.parametrize('engine,comm', [('einsum', 'gspmd'), ('einsum', 'all_to_all'),
                                         ('dropless', 'auto'), ('dropless', 'all_to_all')])
def test_dispatch_engine_matches_one_device(engine, comm):  # 'sort' is the default above
    _check({'data': 2, 'expert': 4}, comm, dispatch=engine, ep_buffer_factor=0.0)


def test_all_to_all_with_drops_matches_one_device():
    """Top-2 (SwiGLU experts), capacity factor 1: drops are per group, so any mesh has the same."""
    history = _check({'data': 2, 'expert': 4}, 'all_to_all', top_k=2, capacity_factor=1.0,
                     activation='swiglu')
    assert all(h['dropped_fraction'] > 0 for h in history)


def test_all_to_all_expert_choice_matches_one_device():
    _check({'expert': 8}, 'all_to_all', router='expert_choice', capacity_factor=2.0)


def test_each_device_holds_its_share_of_the_experts():
    """From the arrays: E / mesh.expert experts per device, distinct along the expert axis."""
    cfg = make_config({'fsdp': 2, 'expert': 4})
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    state = state_lib.init_state(setup, 0)
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
