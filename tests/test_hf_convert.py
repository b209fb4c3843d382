"""Hugging Face interop against golden fixtures made by transformers (tests/fixtures/hf): import ->
logits equal to the ones transformers recorded; export -> the same tensors, bit for bit; upcycling
-> the dense run's loss at step 0; bad inputs -> one line and exit 2. No torch needed, except for
the test that loads an export in transformers (it runs where torch and transformers are installed).
"""
import concurrent.futures
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs import default
from moejax.errors import ConfigError
from moejax.hf import convert, staging
from moejax.readers import evaluation, saved_run
from moejax.run import loop
from moejax.run import workdir as workdir_lib
from tests import decisions, launcher
from tests.helpers import REPO, cli_env, mounted_tmpfs, run_cli, tiny_config

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


def test_a_dense_layer_after_moe_ones_cannot_be_scanned(tmp_path, data_dir):
    """Qwen2-MoE's mlp_only_layers=[1] is no dense prefix: a scanned base is refused in one
    line before anything is written (only the first k layers may stay unrolled)."""
    base = base_config(data_dir)
    base.model.scan_layers = True
    with pytest.raises(ConfigError, match=r'model.dense_layers=\[1\] breaks'):
        convert.import_hf(fixture('qwen2_moe'), str(tmp_path / 'w'), base)
    assert not os.path.exists(tmp_path / 'w')


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
    return jax.tree.leaves(jax.device_get(nnx.to_pure_dict(nnx.state(run.model, nnx.Param))))


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
    """On a small corpus of its own (the import's tokenizer would otherwise encode the whole
    python_stdlib corpus, ~10M tokens, for 20 steps)."""
    workdir = str(tmp_path / 'ft')
    shutil.copytree(imported['qwen2_moe'], workdir)
    cfg = saved_run.run_config(workdir)
    cfg.train.update(num_steps=20, eval_every=0, checkpoint_every=20)
    cfg.data.update(batch_size=8, eval_batches=2,  # free: the workdir holds only step 0
                    name='text_files', text_format='lines', data_dir=str(tmp_path / 'data'),
                    text_glob=os.path.join(sysconfig.get_paths()['stdlib'], 'json', '*.py'))
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

def edited_copy(tmp_path, family: str, edit_config=None, edit_tensors=None,
                edit_dir=None) -> str:
    """A copy of a single-file fixture with its config.json (edited in place, or replaced by
    what edit_config returns), its tensors and/or its files edited."""
    out = str(tmp_path / f'{family}_edited')
    shutil.copytree(fixture(family), out)
    if edit_config:
        path = os.path.join(out, 'config.json')
        with open(path) as f:
            hf = json.load(f)
        hf = edit_config(hf) or hf
        with open(path, 'w') as f:
            json.dump(hf, f)
    if edit_dir:
        edit_dir(out)
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
    # issue 24, finding 9: quantized or boolean tensors are not weights to read as floats
    'int8 tensor': (dict(edit_tensors=lambda t: t.update({
        'model.norm.weight': np.ones(32, np.int8)})), ['model.norm.weight is I8']),
    'bool tensor': (dict(edit_tensors=lambda t: t.update({
        'model.layers.0.input_layernorm.weight': np.ones(32, bool)})), ['is BOOL']),
    # finding 2: sizes checked against the tensors present before anything is built
    'a million layers': (dict(edit_config=lambda hf: hf.update(num_hidden_layers=10**6)),
                         ['num_hidden_layers=1000000', 'the weights hold 2 layers']),
    'ten million experts': (dict(edit_config=lambda hf: hf.update(num_local_experts=10**7)),
                            ['num_local_experts=10000000', 'the weights hold 4 experts']),
    # finding 8: config.json of the wrong shape
    'config a list': (dict(edit_config=lambda hf: [hf]), ['config.json holds a list']),
    'no hidden_size': (dict(edit_config=lambda hf: {k: v for k, v in hf.items()
                                                   if k != 'hidden_size'}),
                       ['hidden_size=None', 'is required']),
    'wrong type': (dict(edit_config=lambda hf: hf.update(num_attention_heads='4')),
                   ["num_attention_heads='4'", 'positive integer']),
    'zero heads': (dict(edit_config=lambda hf: hf.update(num_attention_heads=0)),
                   ['num_attention_heads=0', 'positive integer']),
    # findings 3 and 9: the tokenizer is checked before anything is written
    'bad tokenizer.json': (dict(edit_dir=lambda d: open(os.path.join(d, 'tokenizer.json'),
                                                        'w').write('{"model": 3')),
                           ['tokenizer.json: is not a Hugging Face tokenizer.json']),
    'tokenizer beyond the vocabulary': (dict(edit_dir=lambda d: grow_tokenizer(d)),
                                        ['tokenizer.json has 97 tokens', 'vocab_size=96']),
}


def grow_tokenizer(hf_dir: str) -> None:
    """Give the directory's tokenizer.json (96 tokens) a 97th, beyond the model's vocabulary."""
    path = os.path.join(hf_dir, 'tokenizer.json')
    with open(path) as f:
        spec = json.load(f)
    spec['added_tokens'].append({'id': 96, 'content': '<extra>', 'single_word': False,
                                 'lstrip': False, 'rstrip': False, 'normalized': False,
                                 'special': True})
    with open(path, 'w') as f:
        json.dump(spec, f)


def leftovers(parent) -> list[str]:
    """Temporary directories of conversions in parent (none may outlive one)."""
    return [e for e in os.listdir(parent) if e.startswith(staging.PREFIX)]


@pytest.mark.parametrize('case', list(REFUSALS))
def test_unsupported_imports_are_refused_in_one_line(case, tmp_path, data_dir):
    edits, phrases = REFUSALS[case]
    hf_dir = edited_copy(tmp_path, 'mixtral', **edits)
    workdir = tmp_path / 'w'
    start = time.time()
    with pytest.raises(ConfigError) as err:
        convert.import_hf(hf_dir, str(workdir), base_config(data_dir))
    assert time.time() - start < 10  # a size edited upward costs neither time nor memory
    message = str(err.value)
    assert '\n' not in message and all(p in message for p in phrases), message
    assert not workdir.exists() and not leftovers(tmp_path)  # nothing written


def test_the_command_exits_2_naming_the_problem(imported, tmp_path):
    hf_dir = edited_copy(tmp_path, 'qwen3_moe',
                         edit_config=lambda hf: hf.update(architectures=['GPT2LMHeadModel']))
    proc = run_cli('convert', f'--from_hf={hf_dir}', f'--workdir={tmp_path / "w"}')
    assert proc.returncode == 2 and 'GPT2LMHeadModel' in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # a workdir that holds a run is never written over
    proc = run_cli('convert', f'--from_hf={fixture("mixtral")}', f'--workdir={imported["mixtral"]}')
    assert proc.returncode == 2 and 'already holds' in proc.stderr, proc.stderr[-2000:]


def test_export_refuses_what_no_family_computes(dense_run, tmp_path):
    with pytest.raises(ConfigError, match='model.moe_every.*dense model has no MoE family'):
        convert.export_hf(dense_run, str(tmp_path / 'hf'))
    assert not (tmp_path / 'hf').exists()


# ---- nothing escapes, nothing is half-written (issue 24) --------------------------------------

def test_an_interrupted_import_leaves_nothing_and_the_next_removes_a_killed_ones_rest(
        imported, tmp_path, data_dir, monkeypatch, capsys):
    """SIGTERM once the step-0 checkpoint is written: no workdir, no temporary. A temporary a
    killed process (a pid that is gone) left is removed by the next import to that workdir."""
    workdir = tmp_path / 'w'
    save_step0 = convert.save_step0

    def then_terminated(*args):
        count = save_step0(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return count
    monkeypatch.setattr(convert, 'save_step0', then_terminated)
    with pytest.raises(KeyboardInterrupt):
        convert.import_hf(fixture('mixtral'), str(workdir), base_config(data_dir))
    assert not workdir.exists() and not leftovers(tmp_path)
    assert f'interrupted: nothing was written to {workdir}' in capsys.readouterr().err
    monkeypatch.undo()
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    stale = staging.partial_path(str(workdir)).replace(f'.{os.getpid()}.', f'.{gone}.')
    os.makedirs(os.path.join(stale, 'checkpoints', '0'))
    convert.import_hf(fixture('mixtral'), str(workdir), base_config(data_dir))
    assert not leftovers(tmp_path) and f'pid {gone} (killed)' in capsys.readouterr().out
    for a, b in zip(params_of(str(workdir)), params_of(imported['mixtral']), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_export_is_whole_with_ordinary_permissions_and_the_generation_config(imported,
                                                                             tmp_path):
    umask = os.umask(0o022)
    try:
        out = tmp_path / 'hf'
        convert.export_hf(imported['mixtral'], str(out), max_shard_bytes=50_000)
    finally:
        os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert {os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)} == {0o644}
    with open(os.path.join(fixture('mixtral'), 'generation_config.json'), 'rb') as f:
        assert (out / 'generation_config.json').read_bytes() == f.read()
    assert not leftovers(tmp_path)


EXPORT_TARGETS = {
    'a file': (lambda p: p.write_text('precious'), 'is a file'),
    'a dangling symlink': (lambda p: os.symlink(p.parent / 'nowhere', p), 'a dangling symlink'),
    'not empty': (lambda p: p.mkdir() or (p / 'notes.txt').write_text('precious'),
                  'already holds notes.txt'),
    'a name too long': (lambda p: None, 'name is longer than'),
}


@pytest.mark.parametrize('case', list(EXPORT_TARGETS))
def test_an_export_target_it_cannot_become_is_refused_in_one_line(imported, tmp_path, case):
    make, phrase = EXPORT_TARGETS[case]
    out = tmp_path / ('x' * 300 if case == 'a name too long' else 'hf')
    make(out)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=phrase):
        convert.export_hf(imported['mixtral'], str(out))
    assert sorted(os.listdir(tmp_path)) == before  # nothing made, moved or written
    if case != 'a name too long' and os.path.exists(out):
        assert 'precious' in (out.read_text() if out.is_file() else (out / 'notes.txt').read_text())


def test_an_export_to_a_read_only_or_a_full_disk(imported, tmp_path):
    with mounted_tmpfs(tmp_path / 'ro', read_only=True) as read_only:
        with pytest.raises(ConfigError, match='cannot be written.*Read-only file system'):
            convert.export_hf(imported['mixtral'], str(read_only / 'hf'))
    with mounted_tmpfs(tmp_path / 'small', size='64k') as small:
        with pytest.raises(OSError) as err:
            convert.export_hf(imported['mixtral'], str(small / 'hf'))
        assert err.value.errno == errno.ENOSPC and os.listdir(small) == []


def test_upcycling_an_moe_run_is_refused_before_anything_is_written(imported, tmp_path):
    cfg = tiny_config(activation='swiglu', dispatch='dropless')
    with pytest.raises(ConfigError, match='is an MoE run'):
        convert.upcycle(imported['mixtral'], str(tmp_path / 'w'), cfg)
    assert os.listdir(tmp_path) == []


def test_a_model_without_a_tokenizer_exports_and_evaluates_token_ids(tmp_path, data_dir):
    """Weights only (research checkpoints): the export is its weights (nothing trained), eval
    of token ids gives transformers' loss, and what needs text says so in one line."""
    hf_dir = edited_copy(tmp_path, 'qwen3_moe',
                         edit_dir=lambda d: os.remove(os.path.join(d, 'tokenizer.json')))
    workdir = str(tmp_path / 'w')
    assert convert.import_hf(hf_dir, workdir, base_config(data_dir))['tokenizer'] is None
    cfg = saved_run.run_config(workdir)
    assert cfg.data.tokenizer == 'none'
    out = tmp_path / 'hf'
    assert convert.export_hf(workdir, str(out))['tokenizer'] is None
    assert not [n for n in os.listdir(out) if n.startswith('tokenizer')]
    for name, tensor in hf_tensors(fixture('qwen3_moe')).items():
        np.testing.assert_array_equal(hf_tensors(str(out))[name], tensor, err_msg=name)
    ids_BT, logits_BTV = recorded('qwen3_moe')
    np.save(tmp_path / 'ids.npy', ids_BT)
    with decisions.record() as margins:
        result = evaluation.evaluate_tokens(workdir, str(tmp_path / 'ids.npy'))
    margins.assert_clear()
    logits = logits_BTV[:, :-1].astype(np.float64)
    nll = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(
        logits, ids_BT[:, 1:, None], -1)[..., 0]
    assert result['loss'] == pytest.approx(nll.mean(), abs=1e-4)
    assert os.path.exists(os.path.join(workdir, 'eval_tokens_0.json'))
    with pytest.raises(ConfigError, match='has no tokenizer.*tokenizer_path'):
        saved_run.open_run(workdir).tokenizer  # generate and analyze --text read this
    with pytest.raises(ConfigError, match='has no tokenizer'):
        loop.prepare(cfg, workdir)  # training: needs text


# ---- through the command line, in processes that fail, race and are killed --------------------

def convert_command(*args) -> list[str]:
    return [sys.executable, os.path.join(REPO, 'launch', 'convert.py'), *args]


def _limit_file_size():
    """A file past 20 kB fails with EFBIG (SIGXFSZ ignored): the checkpoint's data files do."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.slow
def test_a_full_disk_during_an_import_is_one_line_and_leaves_nothing(tmp_path):
    workdir = tmp_path / 'w'
    proc = subprocess.run(convert_command(f'--from_hf={fixture("mixtral")}',
                                          f'--workdir={workdir}'), cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == f'moejax: the conversion stopped: File too large; nothing was written ' \
                       f'to {workdir}'
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_two_imports_into_one_new_workdir_leave_one_whole_run(imported, tmp_path):
    workdir = tmp_path / 'w'
    command = convert_command(f'--from_hf={fixture("mixtral")}', f'--workdir={workdir}')
    procs = [launcher.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = sorted((p.wait(timeout=300), p.communicate()[1]) for p in procs)
    assert [code for code, _ in done] == [0, 2], done
    loser = done[1][1].strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith(f'moejax: error: --workdir={str(workdir)!r}')
    assert os.listdir(tmp_path) == ['w'] and workdir_lib.LOCK not in os.listdir(workdir)
    for a, b in zip(params_of(str(workdir)), params_of(imported['mixtral']), strict=True):
        np.testing.assert_array_equal(a, b)


# Moments to kill -9 a conversion at, told by what its temporary directory holds: just made;
# writing the weights (the step-0 checkpoint, or safetensors files); finishing (the tokenizer,
# written after the weights, before the final rename).
MOMENTS = {'made': lambda names: True,
           'writing': lambda names: 'checkpoints' in names or any(
               n.startswith('model') for n in names),
           'finishing': lambda names: 'tokenizer.json' in names}


def partial_contents(parent) -> list[set]:
    found = []
    for name in leftovers(parent):
        try:
            found.append(set(os.listdir(os.path.join(parent, name))))
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return found


def run_until(command: list[str], parent, moment: str) -> None:
    """Run command; kill -9 it as soon as a temporary in parent shows the moment."""
    proc = launcher.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(MOMENTS[moment](names) for names in partial_contents(parent)):
            proc.kill()
            break
        time.sleep(0.001)
    proc.wait(timeout=60)


def kill_at_each_moment_then_finish(command_to, parent) -> list[str]:
    """kill -9 command_to(target) at each moment; each time the target must hold nothing (a
    stale lock at most) or a result (checked whole by the caller); a last uninterrupted run must
    succeed and leave no temporary. Returns the results to check."""
    os.makedirs(parent)
    targets = iter(os.path.join(parent, f'out{i}') for i in range(len(MOMENTS) + 1))
    target, results = next(targets), []
    for moment in MOMENTS:
        run_until(command_to(target), parent, moment)
        if os.path.isdir(target) and set(os.listdir(target)) - {workdir_lib.LOCK}:
            results.append(target)
            target = next(targets)  # a result is never written over: start anew
    final = launcher.run(command_to(target), cwd=REPO, env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not leftovers(parent)
    return results + [target]


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_nothing_or_a_whole_result(imported, dense_run, tmp_path,
                                                               data_dir):
    """--from_hf, --to_hf and --upcycle_from, each killed at three moments (in parallel)."""
    moe_flags = ('--config=configs/default.py:tiny', '--config.model.activation=swiglu',
                 '--config.moe.dispatch=dropless', f'--config.data.data_dir={data_dir}')
    upcycled = str(tmp_path / 'upcycled')
    convert.upcycle(dense_run, upcycled, tiny_config(activation='swiglu', dispatch='dropless'))

    def same_params(reference):
        def check(workdir):
            for a, b in zip(params_of(workdir), params_of(reference), strict=True):
                np.testing.assert_array_equal(a, b)
        return check

    def same_tensors(out):
        for name, tensor in hf_tensors(fixture('mixtral')).items():
            np.testing.assert_array_equal(hf_tensors(out)[name], tensor, err_msg=name)
    modes = {
        'from_hf': (lambda t: convert_command(f'--from_hf={fixture("mixtral")}', f'--workdir={t}'),
                    same_params(imported['mixtral'])),
        'to_hf': (lambda t: convert_command(f'--to_hf={t}', f'--workdir={imported["mixtral"]}',
                                            '--max_shard_mb=0.02'), same_tensors),
        'upcycle_from': (lambda t: convert_command(f'--upcycle_from={dense_run}',
                                                   f'--workdir={t}', *moe_flags),
                         same_params(upcycled)),
    }
    with concurrent.futures.ThreadPoolExecutor(len(modes)) as pool:
        runs = {mode: pool.submit(kill_at_each_moment_then_finish, command_to,
                                  str(tmp_path / mode))
                for mode, (command_to, _) in modes.items()}
    for mode, run in runs.items():  # checked here: JAX's mesh context is the main thread's
        for result in run.result():
            modes[mode][1](result)
