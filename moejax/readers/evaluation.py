"""Evaluate a saved checkpoint: on a split of the run's data (its own eval step), or on token ids
from a .npy file (for runs without a tokenizer, or text tokenized elsewhere).

The weights come from saved_run.open_run (parameters only, never the optimizer state). Nothing
is written into the workdir but the result, eval_<split>_<step>.json (or eval_tokens_<step>.json),
and that goes to out_dir instead when given (a read-only workdir).
"""
import json
import math
import os

import jax
import numpy as np

from moejax.errors import ConfigError
from moejax.readers import saved_run
from moejax.run import evaluate as evaluate_lib
from moejax.run import loop
from moejax.run import workdir as workdir_lib


def result_dir(workdir: str, out_dir: str | None) -> str:
    """Where the result file goes (out_dir, else the workdir), checked writable up front."""
    directory = out_dir or workdir
    reason = workdir_lib.unwritable(directory)
    if reason:
        key, fix = ('--out_dir', '') if out_dir else ('--workdir', '; pass --out_dir=DIR')
        raise ConfigError(key, directory, f'cannot hold the result ({reason}){fix}')
    return directory


def _write(directory: str, name: str, result: dict) -> str:
    path = os.path.join(directory, name)
    if jax.process_index() == 0:
        with open(path + '.tmp', 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(path + '.tmp', path)
    return path


def evaluate_checkpoint(cfg, workdir: str, split: str, step: int | None = None,
                        out_dir: str | None = None) -> dict:
    """Evaluate a saved step (default: the latest) on `split`; write eval_<split>_<step>.json.
    The result holds its path as 'file'."""
    saved_run.check_workdir(workdir, needs_config=False)
    directory = result_dir(workdir, out_dir)
    run = loop.prepare(cfg, workdir, for_training=False)
    saved = saved_run.open_run(workdir, step, cfg=run.setup.cfg)
    result = evaluate_lib.evaluate(run.eval_step, saved.params, saved.extra,
                                   loop.load_eval_batches(run, split), run.byte_lengths)
    result = {'step': saved.step, 'split': split, **result}
    run.checkpointer.close()
    return dict(result, file=_write(directory, f'eval_{split}_{saved.step}.json', result))


def evaluate_tokens(workdir: str, tokens: str, step: int | None = None,
                    out_dir: str | None = None) -> dict:
    """Loss and perplexity of the token ids [B, T] in a .npy file, each row one whole document
    whose every token after the first is predicted (bits per byte need a tokenizer: None);
    written to eval_tokens_<step>.json, whose path the result holds as 'file'."""
    saved_run.check_workdir(workdir)
    directory = result_dir(workdir, out_dir)
    cfg = saved_run.run_config(workdir)
    ids_BT = saved_run.check_tokens(saved_run.read_tokens(tokens), cfg)
    if ids_BT.shape[1] < 2:
        raise ConfigError('--tokens', tokens, 'rows need 2 or more tokens: the first predicts '
                          'the second')
    run = saved_run.open_run(workdir, step, cfg=cfg)
    logits_BTV = saved_run.forward_logits(run, ids_BT).astype(np.float64)
    logits_BTV, targets_BT = logits_BTV[:, :-1], ids_BT[:, 1:]
    top_BT = logits_BTV.max(-1)
    logz_BT = top_BT + np.log(np.exp(logits_BTV - top_BT[..., None]).sum(-1))
    nll_BT = logz_BT - np.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
    loss = float(nll_BT.mean())
    result = {'step': run.step, 'tokens_file': tokens, 'loss': loss,
              'perplexity': math.exp(min(loss, 700.0)), 'bits_per_byte': None,
              'tokens': int(nll_BT.size)}
    return dict(result, file=_write(directory, f'eval_tokens_{run.step}.json', result))


def describe(result: dict) -> str:
    """eval's console line: what was evaluated, the training run's summary, and the file."""
    what = result.get('split') or result['tokens_file']
    return f'eval at step {result["step"]} on {what}: {evaluate_lib.summary(result)} ' \
           f'(written to {result["file"]})'
