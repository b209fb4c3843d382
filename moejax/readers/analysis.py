"""Routing analysis: expert load over training (from metrics.jsonl), and where a text's tokens go.

Both write PNG files. Figures are built with matplotlib's object API (`Figure`, rendered by Agg),
never pyplot, so they work without a display and leave a notebook's plotting backend alone.
flax, the model and the checkpoint reader are imported only where a text's tokens are routed:
the load plot alone needs none of them (0.45 s of its start).
"""
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from matplotlib.figure import Figure

from moejax.errors import ConfigError
from moejax.run import metrics as metrics_lib
from moejax.run import workdir as workdir_lib

MAX_PLOTTED_TOKENS = 96  # a token map wider than this is unreadable; longer texts are cut


def expert_load_history(metrics_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [N], expert_load [N, L, E]) of the training records that carry expert_load."""
    _require_metrics(metrics_path)
    steps, loads = [], []
    for record in metrics_lib.read_jsonl(metrics_path):
        if 'expert_load' in record and 'step' in record:
            steps.append(record['step'])
            loads.append(record['expert_load'])
    if not steps:
        raise ConfigError('--workdir', os.path.dirname(metrics_path),
                          'metrics.jsonl has no expert_load records: a dense model has no experts')
    return np.asarray(steps), np.asarray(loads, np.float64)


def _require_metrics(metrics_path: str) -> None:
    if not os.path.isfile(metrics_path):
        raise ConfigError('--workdir', os.path.dirname(metrics_path),
                          'holds no metrics.jsonl; train first')


def plot_expert_load(metrics_path: str, out_png: str) -> str:
    """One heatmap per MoE layer: expert (rows) x logged step (columns), colour = load."""
    steps_N, load_NLE = expert_load_history(metrics_path)
    _, num_layers, num_experts = load_NLE.shape
    fig = Figure(figsize=(9, 1.2 + 0.35 * num_experts * num_layers))
    axes = fig.subplots(num_layers, 1, squeeze=False, sharex=True)
    step_edges = _edges(steps_N.astype(np.float64))
    expert_edges = np.arange(num_experts + 1) - 0.5
    image = None
    for layer, ax in enumerate(axes[:, 0]):
        image = ax.pcolormesh(step_edges, expert_edges, load_NLE[:, layer].T, cmap='viridis',
                              vmin=0.0, vmax=float(load_NLE.max()))
        ax.set_ylabel(f'MoE layer {layer}\nexpert')
        ax.set_yticks(range(num_experts))
    axes[-1, 0].set_xlabel('training step')
    fig.suptitle(f'Expert load per MoE layer (fraction of routed tokens; uniform = 1/{num_experts}'
                 f' = {1 / num_experts:.3f})', fontsize=10)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label='load')
    return _save(fig, out_png)


def _edges(centers_N: np.ndarray) -> np.ndarray:
    """Cell edges halfway between centers (logged steps may be unevenly spaced)."""
    if len(centers_N) == 1:
        return np.array([centers_N[0] - 0.5, centers_N[0] + 0.5])
    mid = (centers_N[1:] + centers_N[:-1]) / 2
    return np.concatenate([[2 * centers_N[0] - mid[0]], mid, [2 * centers_N[-1] - mid[-1]]])


def token_routes(model, tokenizer, text: str, max_len: int):
    """Top-1 expert of each token of `text` (after a bos) in each MoE layer, as the model routes it.

    Returns (token ids [T], experts [L, T]). Token-choice routers report their first choice
    (after any balancing bias); expert-choice and soft routers the expert of highest router
    probability. The model runs in evaluation mode, exactly as in eval and generation.
    """
    from flax import nnx
    if not any(hasattr(block.ffn, 'router') for block in model.blocks):
        raise ConfigError('model.moe_every', 0, 'a dense model has no experts to analyse')
    ids_T = np.asarray(([tokenizer.bos_id] + list(tokenizer.encode(text)))[:max_len], np.int32)
    graphdef, state = nnx.split(model)
    top1_LT = jax.jit(lambda state, ids_T: _top1_experts(nnx.merge(graphdef, state), ids_T))(
        state, jnp.asarray(ids_T))
    return ids_T, np.asarray(jax.device_get(top1_LT))


def _top1_experts(model, ids_T):
    """[L, T] top-1 experts, read from the router outputs of one forward pass (nnx.capture)."""
    from flax import nnx

    from moejax.moe import routing
    inputs_BT = ids_T[None]
    positions_BT = jnp.arange(ids_T.shape[0], dtype=jnp.int32)[None]
    forward = nnx.capture(lambda m, *args: m(*args, train=False), nnx.Intermediate,
                          method_outputs=nnx.Intermediate)
    _, captured = forward(model, inputs_BT, jnp.ones_like(inputs_BT), positions_BT)
    experts = []
    for i, block in enumerate(model.blocks):
        if not hasattr(block.ffn, 'router'):
            continue
        route = captured['blocks'][i]['ffn']['router']['__call__'].get_value()[0]
        if isinstance(route, routing.TokenChoice):
            top1 = route.expert_GSK[..., 0]
        else:
            h_BTD = captured['blocks'][i]['ffn_norm']['__call__'].get_value()[0]
            top1 = jnp.argmax(h_BTD.astype(jnp.float32) @ block.ffn.router.w_DE[...], axis=-1)
        experts.append(top1.reshape(-1))
    return jnp.stack(experts)


def token_label(tokenizer, token_id: int) -> str:
    """A token's text with whitespace made visible, for tick labels."""
    if token_id == tokenizer.bos_id:
        return '<bos>'
    text = tokenizer.decode([token_id])
    return text.replace(' ', '\u2423').replace('\n', '\\n').replace('\t', '\\t') or '?'


def plot_token_routes(labels: list[str], experts_LT: np.ndarray, num_experts: int,
                      out_png: str) -> str:
    """A strip per MoE layer: each token's cell coloured (and numbered) by its top-1 expert."""
    experts_LT = experts_LT[:, :MAX_PLOTTED_TOKENS]
    labels = labels[:experts_LT.shape[1]]
    num_layers, T = experts_LT.shape
    fig = Figure(figsize=(max(6.0, 0.32 * T + 1.5), 1.2 + 0.45 * num_layers))
    ax = fig.subplots()
    cmap = matplotlib.colormaps['tab20' if num_experts > 10 else 'tab10'].resampled(num_experts)
    ax.imshow(experts_LT, cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, aspect='auto',
              interpolation='nearest')
    for layer in range(num_layers):
        for t in range(T):
            ax.text(t, layer, str(experts_LT[layer, t]), ha='center', va='center', fontsize=7)
    ax.set_xticks(range(T))
    ax.set_xticklabels(labels, rotation=90, fontsize=8, family='monospace')
    ax.set_yticks(range(num_layers))
    ax.set_yticklabels([f'MoE layer {i}' for i in range(num_layers)])
    ax.set_title('Top-1 expert of each token (cell colour and number = expert)', fontsize=10)
    return _save(fig, out_png)


def _save(fig, out_png: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches='tight')
    return out_png


def _check_writable(directory: str, key: str, value: str, where: str) -> None:
    """ConfigError unless PNGs can be written in directory (created if missing).

    A read-only run (archived, another user's) is refused with the fix rather than written
    around: plots left in an unexpected place are plots lost.
    """
    reason = workdir_lib.unwritable(directory)
    if reason:
        raise ConfigError(key, value, f'{where} cannot be written ({reason}); pass '
                          '--out_dir=DIR to write the plots elsewhere')


def analyze(workdir: str, *, text: str | None = None, step: int | None = None,
            out_dir: str | None = None) -> dict:
    """Write expert_load.png (and token_experts.png when a text is given); returns their paths."""
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    _require_metrics(metrics_path)
    if out_dir:
        _check_writable(out_dir, '--out_dir', out_dir, 'the directory')
    else:  # checked before any work is done
        out_dir = os.path.join(workdir, 'plots')
        _check_writable(out_dir, '--workdir', workdir, f'plots go to {out_dir} by default, which')
    paths = {'expert_load': plot_expert_load(metrics_path,
                                             os.path.join(out_dir, 'expert_load.png'))}
    if text:
        from moejax.model import transformer as model_lib
        from moejax.readers import saved_run
        run = saved_run.open_run(workdir, step)
        model = model_lib.unrolled_model(run.model, run.cfg)  # walks blocks one by one
        ids_T, experts_LT = token_routes(model, run.tokenizer, text, run.cfg.model.max_len)
        labels = [token_label(run.tokenizer, int(i)) for i in ids_T]
        paths['token_experts'] = plot_token_routes(
            labels, experts_LT, run.cfg.moe.num_experts,
            os.path.join(out_dir, 'token_experts.png'))
        paths['step'] = run.step
    return paths
