"""Plans before accelerator hours: the dry run (an ahead-of-time compile, bytes per device) and
the layout planner that ranks meshes, remat policies and micro-batches."""

# Least memory first: the search finds a micro-batch for the first, then tries the others.
# Here, not in search.py, so that `plan --help` shows the default without importing JAX.
REMATS_BY_MEMORY = ('block', 'minimal', 'none')
