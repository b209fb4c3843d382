"""Routing analysis: token -> expert maps against a hand computation, and the PNG plots."""
import json
import os

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
from tests.helpers import run_cli, tiny_config

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
    for block in model.blocks:
        x = x + block.attn(block.attn_norm(jnp.asarray(x)), seg_BT, pos_BT)
        h = block.ffn_norm(x)
        if isinstance(block.ffn, MoEBlock):
            w_DE = np.asarray(block.ffn.router.w_DE[...], np.float64)
            logits = np.asarray(h[0], np.float64) @ w_DE
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            experts.append((probs + (0 if bias_E is None else bias_E)).argmax(-1))
            y, _ = block.ffn(h, seg_BT, train=False)
        else:
            y = block.ffn(h)
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
def test_analyze_cli_writes_both_plots(tmp_path):
    workdir, data_dir = str(tmp_path / 'run'), str(tmp_path / 'data')
    trained = run_cli('train', '--config=configs/default.py:tiny', f'--workdir={workdir}',
                      f'--config.data.data_dir={data_dir}', '--config.train.num_steps=6',
                      '--config.train.checkpoint_every=3')
    assert trained.returncode == 0, trained.stderr[-3000:]
    proc = run_cli('analyze', f'--workdir={workdir}', '--text=for x in range(3):', '--step=3')
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    assert paths['step'] == 3
    assert os.path.dirname(paths['expert_load']) == os.path.join(workdir, 'plots')
    assert_png(paths['expert_load'])
    assert_png(paths['token_experts'])
    missing = run_cli('analyze', f'--workdir={tmp_path / "nothing"}')
    assert missing.returncode == 2 and 'metrics.jsonl' in missing.stderr
