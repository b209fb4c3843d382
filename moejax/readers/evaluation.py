"""Evaluate a saved checkpoint on a split: the run's own data and eval step, the step's params.

The weights come from saved_run.open_run (parameters only, never the optimizer state).
"""
import json
import os

import jax

from moejax.readers import saved_run
from moejax.run import evaluate as evaluate_lib
from moejax.run import loop


def evaluate_checkpoint(cfg, workdir: str, split: str, step: int | None = None) -> dict:
    """Evaluate a saved step (default: the latest) on `split`; write eval_<split>_<step>.json."""
    saved_run.check_workdir(workdir, needs_config=False)
    run = loop.prepare(cfg, workdir, for_training=False)
    saved = saved_run.open_run(workdir, step, cfg=run.setup.cfg)
    result = evaluate_lib.evaluate(run.eval_step, saved.params, saved.extra,
                                   loop.load_eval_batches(run, split), run.byte_lengths)
    result = {'step': saved.step, 'split': split, **result}
    if jax.process_index() == 0:
        path = os.path.join(workdir, f'eval_{split}_{saved.step}.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(path + '.tmp', path)
    run.checkpointer.close()
    return result
