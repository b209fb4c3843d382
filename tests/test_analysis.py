"""Routing analysis (moejax/readers/analysis.py): token -> expert maps against a hand
computation, and the PNG plots, also from a damaged metrics.jsonl or a read-only workdir."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from moejax import data as data_lib
from moejax.errors import ConfigError
from moejax.model import transformer as model_lib
from moejax.moe.block import MoEBlock
from moejax.readers import analysis
from tests.helpers import (
    assert_usage_error,
    fake_run,
    jitted,
    load_records,
    run_cli,
    timed,
    tiny_config,
    write_records,
)

TEXT = 'def add(a, b):\n    return a + b  # sums\n'


def assert_png(path, min_width=200):
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.std() > 0


def hand_top1(model, ids_T, bias_E=None):
    """Walk the blocks by hand; at each MoE block take argmax of (softmax of) h @ w_router."""
    ids_BT = jnp.asarray(ids_T[None])
    seg_BT, pos_BT = jnp.ones_like(ids_BT), jnp.arange(len(ids_T))[None]
    x = np.asarray(model.embed.table_VD[...])[ids_T][None]
    experts = []
    call, moe = jitted(), jitted(train=False)
    for block in model.blocks:
        x = x + call(block.attn, call(block.attn_norm, jnp.asarray(x)), seg_BT, pos_BT)
        h = call(block.ffn_norm, x)
        if isinstance(block.ffn, MoEBlock):
            w_DE = np.asarray(block.ffn.router.w_DE[...], np.float64)
            logits = np.asarray(h[0], np.float64) @ w_DE
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            experts.append((probs + (0 if bias_E is None else bias_E)).argmax(-1))
            y, _ = moe(block.ffn, h, seg_BT)
        else:
            y = call(block.ffn, h)
        x = x + y
    return np.stack(experts)


@pytest.mark.parametrize('case', ['switch', 'biased_switch', 'soft'])
def test_token_routes_equal_a_hand_computation(case):
    cfg = tiny_config(moe_every=1, router='soft' if case == 'soft' else 'top_k',
                      balance='bias' if case == 'biased_switch' else 'aux_loss')
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(3)))
    bias_E = None
    if case == 'biased_switch':  # loss-free balancing bias shifts the choice: 2 wins everywhere
        bias_E = np.array([0.0, 0.0, 2.0, 0.0], np.float32)
        model.blocks[1].ffn.router.expert_bias[...] = jnp.asarray(bias_E)
    tokenizer = data_lib.ByteTokenizer(cfg.data.vocab_size)
    ids_T, experts_LT = analysis.token_routes(model, tokenizer, TEXT, max_len=cfg.model.max_len)
    np.testing.assert_array_equal(ids_T, ([1] + tokenizer.encode(TEXT))[:cfg.model.max_len])
    assert experts_LT.shape == (2, cfg.model.max_len)
    want = hand_top1(model, ids_T)
    if case == 'biased_switch':
        want[1] = 2
    np.testing.assert_array_equal(experts_LT, want)
    assert len(np.unique(experts_LT[0])) > 1  # a real test: tokens do go to different experts


def test_token_routes_of_a_dense_model_is_a_clear_error():
    cfg = tiny_config(moe_every=0)
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    with pytest.raises(ConfigError, match='dense'):
        analysis.token_routes(model, data_lib.ByteTokenizer(), 'x', max_len=8)


def write_metrics(path, loads_by_step):
    with open(path, 'w') as f:
        for step, load in loads_by_step.items():
            f.write(json.dumps({'step': step, 'loss': 1.0, 'expert_load': load}) + '\n')
            f.write(json.dumps({'step': step, 'eval_loss': 1.0}) + '\n')


def test_expert_load_history_and_heatmap(tmp_path):
    rng = np.random.default_rng(0)
    loads = {s: rng.dirichlet(np.ones(4), size=2).tolist() for s in (10, 20, 30, 45)}
    path = str(tmp_path / 'metrics.jsonl')
    write_metrics(path, loads)
    steps, load_NLE = analysis.expert_load_history(path)
    np.testing.assert_array_equal(steps, [10, 20, 30, 45])
    np.testing.assert_allclose(load_NLE, np.asarray(list(loads.values())))
    out = analysis.plot_expert_load(path, str(tmp_path / 'plots' / 'load.png'))
    assert_png(out)


def test_expert_load_of_a_dense_run_is_a_clear_error(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text(json.dumps({'step': 1, 'loss': 2.0}) + '\n')
    with pytest.raises(ConfigError, match='dense'):
        analysis.expert_load_history(str(path))


def test_token_route_plot(tmp_path):
    experts_LT = np.random.default_rng(0).integers(0, 8, (2, 120))
    labels = [f't{i}' for i in range(120)]
    assert_png(analysis.plot_token_routes(labels, experts_LT, 8, str(tmp_path / 'tok.png')))


@pytest.mark.slow
def test_analyze_cli_writes_both_plots(trained_tiny_run, tmp_path):
    """Of a step before the last (5 of 10), into the run's plots/ (so a copy of the run)."""
    workdir = str(tmp_path / 'run')
    shutil.copytree(trained_tiny_run, workdir)
    proc = run_cli('analyze', f'--workdir={workdir}', '--text=for x in range(3):', '--step=5')
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    assert paths['step'] == 5
    assert os.path.dirname(paths['expert_load']) == os.path.join(workdir, 'plots')
    assert_png(paths['expert_load'])
    assert_png(paths['token_experts'])
    missing = run_cli('analyze', f'--workdir={tmp_path / "nothing"}')
    assert missing.returncode == 2 and 'metrics.jsonl' in missing.stderr


def test_analyze_tolerates_a_partial_last_line(tmp_path):
    workdir = fake_run(tmp_path / 'run')
    records = load_records(5)
    write_records(workdir / 'metrics.jsonl', records, tail='{"step": 60, "loss": 0.')
    proc = run_cli('analyze', f'--workdir={workdir}', timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])['expert_load']
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    from moejax.readers import analysis  # what was plotted: exactly the complete records
    steps_N, load_NLE = analysis.expert_load_history(str(workdir / 'metrics.jsonl'))
    np.testing.assert_array_equal(steps_N, [r['step'] for r in records])
    np.testing.assert_allclose(load_NLE, [r['expert_load'] for r in records])


def test_analyze_on_a_read_only_workdir(tmp_path):
    """One line naming the directory and the way out (--out_dir), before any work is done."""
    workdir = fake_run(tmp_path / 'run')
    if os.geteuid() == 0:  # permission bits do not bind root: block the plots path instead
        (workdir / 'plots').write_text('')
    else:
        os.chmod(workdir, 0o555)
    try:
        proc, seconds = timed('analyze', f'--workdir={workdir}')
        assert_usage_error(proc, '--workdir', 'plots', 'cannot be written', '--out_dir',
                           seconds=seconds)
        elsewhere = tmp_path / 'elsewhere'
        proc = run_cli('analyze', f'--workdir={workdir}', f'--out_dir={elsewhere}', timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert os.path.isfile(elsewhere / 'expert_load.png')
    finally:
        os.chmod(workdir, 0o755)
