"""Opening a finished run (moejax/readers/saved_run.py: open_run) and its logits through the
parity tool launch/forward.py, against a model restored independently (the whole TrainState
through Checkpointer.restore)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax import mesh as mesh_lib
from moejax.errors import ConfigError
from moejax.readers import saved_run
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import state as state_lib
from tests.helpers import jitted, run_cli, tiny_config


def full_restore(workdir: str, step: int | None = None):
    """(TrainState, step) the way training resumes: every part, optimizer moments included."""
    cfg = config_lib.from_json(os.path.join(workdir, 'config.json'))
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    checkpointer = checkpoint_lib.Checkpointer(workdir, 3, read_only=True)
    try:
        state, _, saved_step = checkpointer.restore(setup.abstract_state, step)
    finally:
        checkpointer.close()
    return setup, state, saved_step


def reference_logits(workdir: str, ids_BT: np.ndarray, step: int | None = None) -> np.ndarray:
    """Logits of the fully restored model, called directly on the rows (no padding, no mesh)."""
    setup, state, _ = full_restore(workdir, step)
    model = nnx.merge(setup.graphdef, state.params, state.extra)
    B, T = ids_BT.shape
    logits_BTV, _ = jitted(train=False)(model, jnp.asarray(ids_BT), jnp.ones((B, T), jnp.int32),
                                        jnp.broadcast_to(jnp.arange(T), (B, T)))
    return np.asarray(logits_BTV)


def assert_same_tree(got, want):
    """Same structure, shardings and values, exactly."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype and g.sharding == w.sharding
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ------------------------------------------------------------------ without a trained run


def save_run(workdir: str, cfg):
    """A run's directory as training leaves it (config.json, one checkpoint) from a fresh
    state whose model state is not empty (loss-free balancing keeps a bias per MoE layer)."""
    os.makedirs(workdir, exist_ok=True)
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    state = state_lib.init_state(setup, seed=3)
    # A bias that is not the initial zeros, so reading it back means something.
    state = state.replace(extra=jax.tree.map(lambda x: x + jnp.arange(x.size).reshape(x.shape),
                                             state.extra))
    config_lib.save_json(cfg, workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, 3, async_save=False)
    checkpointer.save(4, state, {'next_batch': 4})
    checkpointer.close()
    return state


def test_open_run_restores_params_and_model_state_exactly(tmp_path):
    cfg = tiny_config(balance='bias')
    state = save_run(str(tmp_path), cfg)
    assert jax.tree.leaves(state.extra), 'the premise: the model has state besides params'
    run = saved_run.open_run(str(tmp_path))
    assert run.step == 4 and run.cfg.to_dict() == cfg.to_dict()
    assert_same_tree(run.params, state.params)
    assert_same_tree(run.extra, state.extra)
    # The model holds those weights.
    params, extra = nnx.split(run.model, nnx.Param, ...)[1:]
    assert_same_tree(params, state.params)
    assert_same_tree(extra, state.extra)


def test_dtype_override_changes_the_compute_dtype_only(tmp_path):
    cfg = tiny_config()
    state = save_run(str(tmp_path), cfg)
    run = saved_run.open_run(str(tmp_path), dtype='bfloat16')
    assert run.cfg.model.dtype == 'bfloat16' and run.model.dtype == jnp.bfloat16
    assert cfg.model.dtype == 'float32'  # the caller's config is not changed
    assert_same_tree(run.params, state.params)  # stored weights stay float32
    with pytest.raises(ConfigError, match='dtype'):
        saved_run.open_run(str(tmp_path), dtype='float16')


def direct_logits(cfg, state, ids_BT) -> np.ndarray:
    """The model of cfg with the state's weights, called directly on the rows."""
    model = nnx.merge(state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh)).graphdef,
                      state.params, state.extra)
    B, T = ids_BT.shape
    return np.asarray(jitted(train=False)(model, jnp.asarray(ids_BT), jnp.ones((B, T), jnp.int32),
                                          jnp.broadcast_to(jnp.arange(T), (B, T)))[0])


@pytest.mark.slow
def test_forward_cli_computes_in_float32_whatever_the_run_computes_in(tmp_path):
    cfg = tiny_config(dtype='bfloat16')
    state = save_run(str(tmp_path / 'run'), cfg)
    ids_BT = np.random.default_rng(1).integers(0, cfg.data.vocab_size, (2, 9))
    np.save(tmp_path / 'ids.npy', ids_BT)
    proc = run_cli('forward', f'--workdir={tmp_path / "run"}', f'--tokens={tmp_path / "ids.npy"}',
                   f'--out={tmp_path / "logits.npy"}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    as_float32 = cfg.copy_and_resolve_references()
    as_float32.model.dtype = 'float32'
    logits_BTV = np.load(tmp_path / 'logits.npy')
    np.testing.assert_allclose(logits_BTV, direct_logits(as_float32, state, ids_BT),
                               rtol=1e-6, atol=1e-6)
    assert np.abs(logits_BTV - direct_logits(cfg, state, ids_BT)).max() > 1e-3  # not bf16


def test_open_run_of_a_directory_that_holds_no_run_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match='config.json'):
        saved_run.open_run(str(tmp_path))
    config_lib.save_json(tiny_config(), str(tmp_path))
    with pytest.raises(ConfigError, match='checkpoints/'):
        saved_run.open_run(str(tmp_path))
    os.makedirs(tmp_path / 'checkpoints')
    with pytest.raises(ConfigError, match='no restorable checkpoint'):
        saved_run.open_run(str(tmp_path))


def test_padding_rows_fill_the_batch_shards_and_whole_groups():
    """8 data-parallel devices; groups of 6 tokens with T=3 span two rows."""
    setup = state_lib.make_setup(tiny_config(), mesh_lib.make_mesh(tiny_config().mesh))
    assert saved_run.padded_rows(setup, 1, 5) == 8
    assert saved_run.padded_rows(setup, 9, 5) == 16
    grouped = tiny_config(group_size=6)
    setup = state_lib.make_setup(grouped, mesh_lib.make_mesh(grouped.mesh))
    rows = saved_run.padded_rows(setup, 2, 3)  # 2 rows = one group; padding: whole groups
    assert rows % 8 == 0 and (rows * 3) % 6 == 0 and (rows * 3 // 6) % 8 == 0
    assert rows == 16


# ------------------------------------------------------------------- from a trained run


@pytest.mark.slow
def test_forward_cli_logits_equal_an_independently_restored_model(trained_tiny_run, tmp_path):
    vocab = tiny_config().data.vocab_size
    ids_BT = np.random.default_rng(0).integers(0, vocab, (3, 17)).astype(np.int32)
    np.save(tmp_path / 'ids.npy', ids_BT)
    out = str(tmp_path / 'new_dir' / 'logits.npy')
    proc = run_cli('forward', f'--workdir={trained_tiny_run}', f'--tokens={tmp_path / "ids.npy"}',
                   f'--out={out}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        'step': 10, 'shape': [3, 17, vocab], 'out': out}
    logits_BTV = np.load(out)
    assert logits_BTV.dtype == np.float32 and logits_BTV.shape == (3, 17, vocab)
    # float32 rounding may differ with the rows each device gets (the CLI pads 3 rows to 8)
    np.testing.assert_allclose(logits_BTV, reference_logits(trained_tiny_run, ids_BT),
                               rtol=1e-5, atol=1e-5)
    assert os.listdir(tmp_path / 'new_dir') == ['logits.npy']  # no temporary file left


@pytest.mark.slow
def test_forward_cli_step_flag_and_one_dimensional_tokens(trained_tiny_run, tmp_path):
    ids_T = np.arange(5, 37, dtype=np.int64)  # [T] is one row; any integer dtype
    np.save(tmp_path / 'ids.npy', ids_T)
    out = str(tmp_path / 'logits.npy')
    proc = run_cli('forward', f'--workdir={trained_tiny_run}', '--step=5',
                   f'--tokens={tmp_path / "ids.npy"}', f'--out={out}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])['step'] == 5
    at_5 = reference_logits(trained_tiny_run, ids_T[None], step=5)
    np.testing.assert_allclose(np.load(out), at_5, rtol=1e-5, atol=1e-5)
    assert np.abs(at_5 - reference_logits(trained_tiny_run, ids_T[None])).max() > 1e-3  # 5 != 10


@pytest.mark.slow
def test_open_run_params_equal_the_full_restore_at_each_step(trained_tiny_run):
    for step in (None, 5):
        _, state, saved_step = full_restore(trained_tiny_run, step)
        run = saved_run.open_run(trained_tiny_run, step)
        assert run.step == saved_step == (step or 10)
        assert_same_tree(run.params, state.params)
        assert_same_tree(run.extra, state.extra)
    with pytest.raises(ConfigError, match=r'--step.*saved steps: \[5, 10\]'):
        saved_run.open_run(trained_tiny_run, 7)


@pytest.mark.slow
def test_open_run_never_reads_the_optimizer_state(trained_tiny_run, monkeypatch):
    """Every array Orbax reads is recorded: the full restore reads opt_state (so the recording
    works), open_run reads params only. And since it reads none, a config whose optimizer has
    another state (adafactor for adamw) opens the run all the same."""
    read = []
    for handler in (ocp.type_handlers.ArrayHandler, ocp.type_handlers.NumpyHandler,
                    ocp.type_handlers.ScalarHandler):
        def recording(self, infos, args=None, _original=handler.deserialize):
            read.extend(info.name for info in infos)
            return _original(self, infos, args)
        monkeypatch.setattr(handler, 'deserialize', recording)
    full_restore(trained_tiny_run)
    assert any('opt_state' in name for name in read)
    read.clear()
    run = saved_run.open_run(trained_tiny_run)
    assert read and any('params' in name for name in read)
    assert not [name for name in read if 'opt_state' in name]
    other = run.cfg.copy_and_resolve_references()
    other.opt.name = 'adafactor'
    assert_same_tree(saved_run.open_run(trained_tiny_run, cfg=other).params, run.params)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_and_nothing_is_moved(trained_tiny_run, tmp_path,
                                                                      capfd):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(trained_tiny_run, workdir)
    step_dir = os.path.join(workdir, 'checkpoints', '10')
    with open(os.path.join(step_dir, checkpoint_lib.DIGEST)) as f:
        victim = os.path.join(step_dir, max(json.load(f).items(), key=lambda kv: kv[1][0])[0])
    with open(victim, 'r+b') as f:  # flip one byte of the largest file
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = sorted(os.listdir(workdir))
    run = saved_run.open_run(workdir)
    assert run.step == 5
    assert 'checkpoint 10 could not be restored' in capfd.readouterr().err
    assert sorted(os.listdir(workdir)) == before and os.path.isdir(step_dir)  # read-only
    with pytest.raises(ConfigError, match='--step=10.*damaged'):
        saved_run.open_run(workdir, 10)


TINY = tiny_config()


def bad_tokens(tmp_path, case: str) -> str:
    """A --tokens file that is wrong in one way for the tiny model."""
    path = str(tmp_path / f'{case}.npy')
    arrays = {
        'float': np.zeros((2, 4), np.float32),
        'rank_3': np.zeros((1, 2, 4), np.int32),
        'empty': np.zeros((0,), np.int32),
        'id_too_large': np.array([[3, TINY.data.vocab_size]], np.int32),
        'negative_id': np.array([[-1, 3]], np.int32),
        'too_long': np.zeros((1, TINY.model.max_len + 1), np.int32),
    }
    if case == 'missing':
        return str(tmp_path / 'no_such.npy')
    if case == 'not_npy':
        with open(path, 'w') as f:
            f.write('1 2 3\n')
    elif case == 'forged_header':  # declares 4 TiB of ids (issue 24, finding 2): never allocated
        with open(path, 'wb') as f:
            np.lib.format.write_array_header_1_0(
                f, {'descr': '<i4', 'fortran_order': False, 'shape': (1, 2**40)})
            f.write(bytes(16))
    else:
        np.save(path, arrays[case])
    return path


@pytest.mark.slow
@pytest.mark.parametrize('case,shown', [
    ('missing', 'No such file'), ('not_npy', 'not a readable .npy'), ('float', 'integers'),
    ('rank_3', '[1, 2, 4]'), ('empty', 'not empty'),
    ('id_too_large', f'[0, {TINY.data.vocab_size})'), ('negative_id', '[-1, 3]'),
    ('too_long', f'exceed model.max_len={TINY.model.max_len}'),
    ('forged_header', 'declares [1, 1099511627776] int32 values'),
])
def test_bad_tokens_are_one_line_naming_the_flag(trained_tiny_run, tmp_path, case, shown):
    proc = run_cli('forward', f'--workdir={trained_tiny_run}',
                   f'--tokens={bad_tokens(tmp_path, case)}', f'--out={tmp_path / "logits.npy"}',
                   timeout=120)
    assert_one_line(proc, '--tokens', shown)
    assert not os.path.exists(tmp_path / 'logits.npy')


@pytest.mark.slow
def test_bad_out_and_missing_flags_are_one_line(trained_tiny_run, tmp_path):
    ids = str(tmp_path / 'ids.npy')
    np.save(ids, np.zeros((1, 4), np.int32))
    blocker = tmp_path / 'a_file'
    blocker.write_text('')  # a directory that cannot be made, whoever runs the test (root too)
    proc = run_cli('forward', f'--workdir={trained_tiny_run}', f'--tokens={ids}',
                   f'--out={blocker / "logits.npy"}', timeout=120)
    assert_one_line(proc, '--out', 'cannot be written')
    proc = run_cli('forward', f'--workdir={trained_tiny_run}', f'--tokens={ids}',
                   f'--out={tmp_path}', timeout=120)
    assert_one_line(proc, '--out', 'is a directory')
    proc = run_cli('forward', f'--workdir={trained_tiny_run}', f'--out={tmp_path / "x.npy"}',
                   timeout=120)
    assert_one_line(proc, '--tokens', 'required')
    proc = run_cli('forward', f'--workdir={tmp_path}', f'--tokens={ids}', '--out=x.npy',
                   timeout=120)
    assert_one_line(proc, '--workdir', 'config.json')


def assert_one_line(proc, *shown):
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, f'exit {proc.returncode}\n{proc.stderr[-3000:]}'
    assert len(lines) == 1 and lines[0].startswith('moejax: error: '), lines
    for text in shown:
        assert text in lines[0], (text, lines[0])
