"""Every routing, balancing and dispatch choice trains on the embedded corpus: finite, falling loss.

Each run is 24 steps of a tiny model on real python_stdlib batches (byte tokenizer), compared
with its own first steps; the text_files source is trained through the command line with both
tokenizers.
"""
import json

import jax
import numpy as np
import pytest

from moejax import data, mesh
from moejax.run import state as state_lib
from moejax.run import step as step_lib
from tests.helpers import run_cli, tiny_config

STEPS = 24
COMBINATIONS = [
    dict(router='top_k', top_k=1, dispatch='einsum'),
    dict(router='top_k', top_k=2, dispatch='sort', jitter=0.01),
    dict(router='top_k', top_k=2, dispatch='dropless', num_shared_experts=1),
    dict(router='top_k', balance='bias', dispatch='sort'),
    dict(router='top_k', balance='none', dispatch='dropless'),
    dict(router='noisy_top_k', top_k=2, dispatch='sort', num_shared_experts=1),
    dict(router='expert_choice', dispatch='einsum'),
    dict(router='expert_choice', dispatch='dropless', num_shared_experts=1),
    dict(router='soft', dispatch='sort'),
]


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))


def losses_of(cfg, corpus_dir):
    cfg.data.data_dir = corpus_dir
    cfg.opt.update(lr=3e-3, warmup_steps=2)
    cfg.mesh.update(data=1)
    devices = jax.devices()[:1]
    setup = state_lib.make_setup(cfg, mesh.make_mesh(cfg.mesh, devices=devices))
    state = state_lib.init_state(setup, seed=0)
    step_fn, _ = step_lib.compile_steps(setup)
    batches = data.train_batches(cfg, data.get_tokenizer(cfg))
    losses = []
    for i in range(STEPS):
        state, metrics = step_fn(state, state_lib.global_batch(setup, batches[i]))
        losses.append(float(metrics['ce_loss']))
    return np.array(losses)


@pytest.mark.slow
@pytest.mark.parametrize('overrides', COMBINATIONS, ids=lambda o: '-'.join(map(str, o.values())))
def test_each_routing_choice_trains(overrides, corpus_dir):
    losses = losses_of(tiny_config(**overrides), corpus_dir)
    assert np.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean() - 0.5, losses


@pytest.mark.slow
@pytest.mark.parametrize('tokenizer,vocab', [('byte', 259), ('sentencepiece', 320)])
def test_text_files_train_with_either_tokenizer(tmp_path, tokenizer, vocab):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ['alpha', 'beta', 'gamma', 'delta', 'mixture', 'expert', 'router', 'token']
    for i in range(60):
        text = ' '.join(rng.choice(words, 400)) + '\n'
        (corpus / f'doc{i}.txt').write_text(text)
    workdir = tmp_path / 'run'
    proc = run_cli('train', '--config=configs/default.py:tiny', f'--workdir={workdir}',
                   '--config.data.name=text_files', f'--config.data.text_glob={corpus}/*.txt',
                   f'--config.data.tokenizer={tokenizer}', f'--config.data.vocab_size={vocab}',
                   f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.num_steps=12',
                   '--config.train.log_every=1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
