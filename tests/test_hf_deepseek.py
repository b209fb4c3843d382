"""DeepSeek-V3 checkpoints (moejax/hf/deepseek.py) against transformers' golden fixture
(tests/fixtures/hf/deepseek_v3, made by make_deepseek_fixture.py): MLA with YaRN, a dense then
MoE layers with shared experts and biased sigmoid group-limited routing, an MTP layer, and an
FP8 block-quantised copy dequantised in float32 or bfloat16."""
import json
import os
import shutil

import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.hf import convert
from moejax.readers import saved_run
from tests import decisions
from tests.test_hf_convert import FIXTURES, assert_close, base_config, hf_tensors

HERE = os.path.join(FIXTURES, 'deepseek_v3')


def recorded(name: str = 'logits.npy'):
    return np.load(os.path.join(HERE, 'token_ids.npy')), np.load(os.path.join(HERE, name))


@pytest.fixture(scope='module')
def imported(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp('dsv3')
    return convert.import_hf(os.path.join(HERE, 'single'), str(root / 'w'),
                             base_config(data_dir))['workdir']


def logits_of(workdir: str, ids_BT):
    run = saved_run.open_run(workdir, dtype='float32')
    with decisions.record() as margins:  # transformers routed these tokens on another CPU
        logits = saved_run.forward_logits(run, ids_BT)
    margins.assert_clear()
    return run, logits


def test_import_gives_transformers_logits(imported):
    ids_BT, reference_BTV = recorded()
    run, logits = logits_of(imported, ids_BT)
    assert_close(logits, reference_BTV)
    m = run.cfg.model
    assert (m.attention_kind, m.mtp_depth, list(m.dense_layers)) == ('mla', 1, [0])
    assert m.rope_scaling == 'yarn' and run.cfg.moe.balance == 'bias'
    assert not run.model.scan  # the base's scan_layers=None (auto): unrolled, as imports were


def test_import_into_a_scanned_config_gives_transformers_logits_and_exports_back(tmp_path,
                                                                                 data_dir):
    """A base with model.scan_layers=True: the dense layer 0 stays unrolled before the stacked
    MoE layers 1-2 (selection biases included); transformers' logits, and every tensor back."""
    base = base_config(data_dir)
    base.model.scan_layers = True
    workdir = convert.import_hf(os.path.join(HERE, 'single'), str(tmp_path / 'w'),
                                base)['workdir']
    ids_BT, reference_BTV = recorded()
    run, logits = logits_of(workdir, ids_BT)
    assert len(run.model.prefix_blocks()) == 1 and run.model.num_periods() == 2
    assert_close(logits, reference_BTV)
    out = str(tmp_path / 'hf')
    convert.export_hf(workdir, out)
    exported, original = hf_tensors(out), hf_tensors(os.path.join(HERE, 'single'))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


@pytest.mark.parametrize('fp8_dtype,logits', [('float32', 'logits_fp8.npy'),
                                              ('bfloat16', 'logits_fp8_bf16.npy')])
def test_fp8_import_gives_the_dequantised_models_logits(fp8_dtype, logits, tmp_path, data_dir):
    ids_BT, reference_BTV = recorded(logits)
    workdir = convert.import_hf(os.path.join(HERE, 'fp8'), str(tmp_path / 'w'),
                                base_config(data_dir), fp8_dtype)['workdir']
    assert_close(logits_of(workdir, ids_BT)[1], reference_BTV)


def test_export_gives_back_every_tensor_mtp_and_biases_included(imported, tmp_path):
    out = str(tmp_path / 'hf')
    convert.export_hf(imported, out)
    exported, original = hf_tensors(out), hf_tensors(os.path.join(HERE, 'single'))
    assert sorted(exported) == sorted(original)
    assert any('.layers.3.eh_proj' in n for n in exported)  # the MTP layer
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    with open(os.path.join(out, 'config.json')) as f:
        hf = json.load(f)
    assert hf['architectures'] == ['DeepseekV3ForCausalLM'] and hf['num_nextn_predict_layers'] == 1


def test_an_export_loads_in_transformers(imported, tmp_path):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    out = str(tmp_path / 'hf')
    convert.export_hf(imported, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids_BT, reference_BTV = recorded()
    with torch.no_grad():
        logits = model.eval()(torch.as_tensor(ids_BT, dtype=torch.long)).logits.numpy()
    assert_close(logits, reference_BTV, 1e-5)


def fp8_copy(tmp_path, drop: str = '', block=None) -> str:
    """The FP8 fixture with one tensor's header entry removed (its bytes stay, unreferenced), or
    another weight_block_size in config.json (NumPy's safetensors cannot write float8)."""
    out = str(tmp_path / 'fp8')
    shutil.copytree(os.path.join(HERE, 'fp8'), out)
    path = os.path.join(out, 'model.safetensors')
    with open(path, 'rb') as f:
        raw = f.read()
    size = int.from_bytes(raw[:8], 'little')
    header = json.loads(raw[8:8 + size])
    header.pop(drop, None)
    # Keep the data where it was: pad the new header with spaces to the old length.
    text = json.dumps(header, separators=(',', ':')).encode().ljust(size)
    with open(path, 'wb') as f:
        f.write(raw[:8] + text + raw[8 + size:])
    if block:
        with open(os.path.join(out, 'config.json')) as f:
            cfg = json.load(f)
        cfg['quantization_config']['weight_block_size'] = block
        with open(os.path.join(out, 'config.json'), 'w') as f:
            json.dump(cfg, f)
    return out


@pytest.mark.parametrize('case,edit,match', [
    ('no scale', dict(drop='model.layers.0.self_attn.o_proj.weight_scale_inv'),
     'F8_E4M3; moejax imports floating-point'),
    ('other blocks', dict(block=[32, 32]),
     r'weight_scale_inv has shape \[2, 2\]; \[24, 32\] in blocks of 32x32')])
def test_broken_fp8_checkpoints_are_refused_in_one_line(case, edit, match, tmp_path, data_dir):
    with pytest.raises(ConfigError, match=match):
        convert.import_hf(fp8_copy(tmp_path, **edit), str(tmp_path / 'w'), base_config(data_dir))
    assert not os.path.exists(tmp_path / 'w')


def test_bad_fp8_dtype_is_refused(tmp_path, data_dir):
    with pytest.raises(ConfigError, match='--fp8_dtype'):
        convert.import_hf(os.path.join(HERE, 'fp8'), str(tmp_path / 'w'), base_config(data_dir),
                          'float16')
