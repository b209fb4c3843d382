"""A training run: the train state and its shardings (state), the pure step (step), the loop
(loop), and what keeps a run safe: checkpoints, the workdir and its lock, guards, metrics."""
