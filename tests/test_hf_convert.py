"""Hugging Face interop against golden fixtures made by transformers (tests/fixtures/hf): import ->
logits equal to the ones transformers recorded; export -> the same tensors, bit for bit; upcycling
-> the dense run's loss at step 0; bad inputs -> one line and exit 2. No torch needed, except for
the test that loads an export in transformers (it runs where torch and transformers are installed).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs import default
from moejax.errors import ConfigError
from moejax.hf import convert
from moejax.readers import evaluation, saved_run
from moejax.run import loop
from tests import decisions
from tests.helpers import run_cli, tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf')
FAMILIES = ('mixtral', 'qwen2_moe', 'qwen3_moe')


def fixture(family: str, layout: str = 'single') -> str:
    return os.path.join(FIXTURES, family, layout)


def recorded(family: str):
    """(token ids [B, T], transformers' float32 logits [B, T, V]) saved with the fixture."""
    d = os.path.join(FIXTURES, family)
    return np.load(os.path.join(d, 'token_ids.npy')), np.load(os.path.join(d, 'logits.npy'))


def hf_tensors(hf_dir: str) -> dict:
    """Every tensor of a safetensors directory (one file or shards), by name."""
    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith('.safetensors'):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


def base_config(data_dir: str):
    cfg = default.get_config()
    cfg.data.data_dir = data_dir
    return cfg


def assert_close(logits, reference, tol=1e-4):
    """Within tol of the reference's scale (its largest magnitude)."""
    err = np.max(np.abs(logits - reference)) / np.max(np.abs(reference))
    assert err < tol, err


@pytest.fixture(scope='module')
def imported(tmp_path_factory, data_dir):
    """Each family imported from its single-file fixture, once for the module."""
    root = tmp_path_factory.mktemp('imported')
    return {f: convert.import_hf(fixture(f), str(root / f), base_config(data_dir))['workdir']
            for f in FAMILIES}


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('layout', ['single', 'sharded'])
def test_import_gives_transformers_logits(family, layout, tmp_path, data_dir):
    ids_BT, reference_BTV = recorded(family)
    result = convert.import_hf(fixture(family, layout), str(tmp_path / 'w'), base_config(data_dir))
    assert (result['family'], result['step']) == (family, 0)
    run = saved_run.open_run(result['workdir'], dtype='float32')
    with decisions.record() as margins:  # transformers routed these tokens on another CPU
        logits = saved_run.forward_logits(run, ids_BT)
    margins.assert_clear()
    assert_close(logits, reference_BTV)


def test_import_straight_into_an_expert_and_fsdp_sharded_mesh(tmp_path, data_dir):
    """Parameters assembled slice by slice on the devices that hold them: same logits."""
    ids_BT, reference_BTV = recorded('qwen3_moe')
    base = base_config(data_dir)
    base.mesh.update(data=1, fsdp=2, expert=4)
    workdir = convert.import_hf(fixture('qwen3_moe', 'sharded'), str(tmp_path / 'w'), base)[
        'workdir']
    run = saved_run.open_run(workdir, dtype='float32')
    w_in = run.params['blocks'][0]['ffn']['w_in_EDF'][...]
    assert w_in.sharding.shard_shape(w_in.shape)[0] == w_in.shape[0] // 4  # experts split 4 ways
    assert_close(saved_run.forward_logits(run, ids_BT), reference_BTV)


def test_forward_command_on_an_import(imported, tmp_path):
    ids_BT, reference_BTV = recorded('qwen3_moe')
    np.save(tmp_path / 'ids.npy', ids_BT)
    out = tmp_path / 'logits.npy'
    proc = run_cli('forward', f'--workdir={imported["qwen3_moe"]}',
                   f'--tokens={tmp_path / "ids.npy"}', f'--out={out}')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_close(np.load(out), reference_BTV)


@pytest.mark.parametrize('family', FAMILIES)
def test_export_gives_back_the_published_tensors(family, imported, tmp_path):
    out = str(tmp_path / 'hf')
    convert.export_hf(imported[family], out, max_shard_bytes=20_000)  # several shards
    assert os.path.exists(os.path.join(out, 'model.safetensors.index.json'))
    exported, original = hf_tensors(out), hf_tensors(fixture(family))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['architectures'] == [convert.hf_config.ARCHITECTURE[family]]


def params_of(workdir: str) -> list:
    run = saved_run.open_run(workdir)
    return jax.tree.leaves(jax.device_get(nnx.state(run.model, nnx.Param).to_pure_dict()))


def test_export_then_import_is_bit_exact(imported, tmp_path, data_dir):
    out = str(tmp_path / 'hf')
    convert.export_hf(imported['qwen2_moe'], out)
    again = convert.import_hf(out, str(tmp_path / 'again'), base_config(data_dir))['workdir']
    for a, b in zip(params_of(imported['qwen2_moe']), params_of(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_export_loads_in_transformers(imported, tmp_path):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    for family in FAMILIES:
        out = str(tmp_path / family)
        convert.export_hf(imported[family], out)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ids_BT, reference_BTV = recorded(family)
        with torch.no_grad():
            logits = model.eval()(torch.as_tensor(ids_BT, dtype=torch.long)).logits.numpy()
        assert_close(logits, reference_BTV, 1e-5)


# ---- training on an imported model, and upcycling a dense run -------------------------------

def eval_loss(workdir: str, step=None) -> float:
    cfg = saved_run.run_config(workdir)
    return evaluation.evaluate_checkpoint(cfg, workdir, 'validation', step)['loss']


@pytest.mark.slow
def test_fine_tuning_an_import_lowers_its_loss(imported, tmp_path):
    workdir = str(tmp_path / 'ft')
    shutil.copytree(imported['qwen2_moe'], workdir)
    cfg = saved_run.run_config(workdir)
    cfg.train.update(num_steps=20, eval_every=0, checkpoint_every=20)
    cfg.data.update(batch_size=8, eval_batches=2)  # free: the workdir holds only step 0
    cfg.opt.update(lr=1e-3, warmup_steps=2)
    before = evaluation.evaluate_checkpoint(cfg, workdir, 'validation', 0)['loss']
    loop.train_and_evaluate(cfg, workdir)
    after = eval_loss(workdir, 20)
    assert after < before - 0.3, (before, after)


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory, data_dir):
    cfg = tiny_config(moe_every=0, activation='swiglu')
    cfg.data.data_dir = data_dir
    workdir = str(tmp_path_factory.mktemp('dense') / 'w')
    loop.train_and_evaluate(cfg, workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize('top_k,tol', [(2, 1e-6), (1, 1e-5)])
def test_upcycled_step0_loss_is_the_dense_loss(top_k, tol, dense_run, tmp_path, data_dir):
    """Top-2 renormalised gates: the same function up to rounding; top-1 raw gates (scaled by
    E/k): equal to the router's near-zero spread."""
    cfg = tiny_config(activation='swiglu', top_k=top_k, dispatch='dropless')
    cfg.data.data_dir = data_dir
    result = convert.upcycle(dense_run, str(tmp_path / 'moe'), cfg)
    assert result['routed_scaling_factor'] == (4.0 if top_k == 1 else 1.0)
    dense, moe = eval_loss(dense_run), eval_loss(result['workdir'], 0)
    assert abs(moe - dense) / dense < tol, (dense, moe)
    experts = params_of(result['workdir'])
    assert len(experts) > len(params_of(dense_run))


# ---- refusals ---------------------------------------------------------------------------------

def edited_copy(tmp_path, family: str, edit_config=None, edit_tensors=None) -> str:
    """A copy of a single-file fixture with its config.json and/or tensors edited."""
    out = str(tmp_path / f'{family}_edited')
    shutil.copytree(fixture(family), out)
    if edit_config:
        path = os.path.join(out, 'config.json')
        with open(path) as f:
            hf = json.load(f)
        edit_config(hf)
        with open(path, 'w') as f:
            json.dump(hf, f)
    if edit_tensors:
        path = os.path.join(out, 'model.safetensors')
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path, metadata={'format': 'pt'})
    return out


REFUSALS = {
    'architecture': (dict(edit_config=lambda hf: hf.update(architectures=['LlamaForCausalLM'])),
                     ["architectures=['LlamaForCausalLM'] is not supported", 'MixtralForCausalLM']),
    'sliding window': (dict(edit_config=lambda hf: hf.update(sliding_window=16)),
                       ['sliding_window=16', 'not built']),
    'rope scaling': (dict(edit_config=lambda hf: hf['rope_parameters'].update(rope_type='yarn')),
                     ["rope_type='yarn'"]),
    'missing tensor': (dict(edit_tensors=lambda t: t.pop('model.layers.1.block_sparse_moe.'
                                                         'experts.2.w3.weight')),
                       ['tensor model.layers.1.block_sparse_moe.experts.2.w3.weight is missing']),
    'misshapen tensor': (dict(edit_tensors=lambda t: t.update({
        'model.norm.weight': np.ones(31, np.float32)})),
        ['tensor model.norm.weight has shape [31], config.json implies [32]']),
    'unknown tensor': (dict(edit_tensors=lambda t: t.update({
        'model.layers.0.self_attn.o_proj.bias': np.zeros(32, np.float32)})),
        ['model.layers.0.self_attn.o_proj.bias has no place']),
}


@pytest.mark.parametrize('case', list(REFUSALS))
def test_unsupported_imports_are_refused_in_one_line(case, tmp_path, data_dir):
    edits, phrases = REFUSALS[case]
    hf_dir = edited_copy(tmp_path, 'mixtral', **edits)
    workdir = tmp_path / 'w'
    with pytest.raises(ConfigError) as err:
        convert.import_hf(hf_dir, str(workdir), base_config(data_dir))
    message = str(err.value)
    assert '\n' not in message and all(p in message for p in phrases), message
    assert not workdir.exists() or not os.listdir(workdir)  # nothing written


def test_the_command_exits_2_naming_the_problem(imported, tmp_path):
    hf_dir = edited_copy(tmp_path, 'qwen3_moe',
                         edit_config=lambda hf: hf.update(architectures=['GPT2LMHeadModel']))
    proc = run_cli('convert', f'--from_hf={hf_dir}', f'--workdir={tmp_path / "w"}')
    assert proc.returncode == 2 and 'GPT2LMHeadModel' in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # a workdir that holds a run is never written over
    proc = run_cli('convert', f'--from_hf={fixture("mixtral")}', f'--workdir={imported["mixtral"]}')
    assert proc.returncode == 2 and 'already holds a run' in proc.stderr, proc.stderr[-2000:]


def test_export_refuses_what_no_family_computes(dense_run, tmp_path):
    with pytest.raises(ConfigError, match='model.moe_every.*dense model has no MoE family'):
        convert.export_hf(dense_run, str(tmp_path / 'hf'))
    assert not (tmp_path / 'hf').exists()
