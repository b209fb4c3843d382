"""The train step (moejax/run/step.py): a non-finite step changes nothing, and gradient
accumulation over micro-batches equals the larger batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import mesh as mesh_lib
from moejax.run import state as state_lib
from moejax.run import step as step_lib
from tests import decisions
from tests.helpers import tiny_config


def step_config(grad_accum: int):
    cfg = tiny_config()
    cfg.data.batch_size = 16  # micro-batches of 8 rows: one per device
    cfg.opt.update(grad_accum=grad_accum, warmup_steps=0, schedule='constant')
    return cfg


@pytest.fixture(scope='module')
def batch_16():
    """16 rows of random tokens: a few packed documents per row, and padding in two rows."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(16, 33))
    segments = np.repeat(np.arange(1, 5), 8)[None].repeat(16, axis=0)
    segments[3, 20:] = 0       # a partly padded row in the first micro-batch
    segments[12, :] = 0        # an all-padding row in the second
    positions = np.tile(np.arange(8), 4)[None].repeat(16, axis=0)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segments,
             'positions': positions}
    return {k: v.astype(np.int32) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def compiled_step(grad_accum: int):
    """(setup, jitted train_step) for step_config(grad_accum), compiled once per module."""
    cfg = step_config(grad_accum)
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    return setup, step_lib.compile_steps(setup)[0]


def one_step(grad_accum, batch, poison=False, compiled=None):
    """(state before, state after, metrics) of one jitted train_step, as host arrays
    (compiled: a (setup, step) pair to use instead of the module's)."""
    setup, step_fn = compiled or compiled_step(grad_accum)
    state = state_lib.init_state(setup, setup.cfg.train.seed)
    if poison:  # a NaN in one weight: the loss and every gradient become NaN
        leaves, treedef = jax.tree.flatten(state.params)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
        state = jax.device_put(state.replace(params=jax.tree.unflatten(treedef, leaves)),
                               setup.state_shardings)
    before = jax.device_get(state)
    after, metrics = step_fn(state, state_lib.global_batch(setup, batch))
    return before, jax.device_get(after), jax.device_get(metrics)


def test_nonfinite_step_leaves_params_and_optimizer_untouched(batch_16):
    before, after, metrics = one_step(1, batch_16, poison=True)
    assert metrics['skipped'] == 1 and not np.isfinite(metrics['loss'])
    assert int(after.step) == 1  # the batch is consumed: a resume repeats the same skip
    same = jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True),
                        (before.params, before.opt_state, before.extra),
                        (after.params, after.opt_state, after.extra))
    assert all(jax.tree.leaves(same))


def test_grad_accum_equals_the_larger_batch(batch_16):
    """Two micro-batches of 8 rows give the step of one batch of 16: gradients (Adam's first
    moment), loss and balance terms, with padding spread unevenly between micro-batches."""
    with decisions.record() as margins:
        before, whole, whole_metrics = one_step(1, batch_16, compiled=compiled_step.__wrapped__(1))
    margins.assert_clear()
    _, accum, accum_metrics = one_step(2, batch_16)
    assert whole_metrics['skipped'] == 0 and accum_metrics['skipped'] == 0
    for key in ('loss', 'ce_loss', 'aux_loss', 'z_loss', 'grad_norm'):
        np.testing.assert_allclose(accum_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(accum_metrics['expert_load'], whole_metrics['expert_load'],
                               atol=1e-6)
    close = jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-7),
                         (accum.params, accum.opt_state), (whole.params, whole.opt_state))
    assert all(jax.tree.leaves(close))
    # The step did something (lr at step 0 is not 0): every param moved.
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), whole.params, before.params)
    assert all(jax.tree.leaves(moved))
