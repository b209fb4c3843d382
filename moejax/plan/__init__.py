"""Plans before accelerator hours: the dry run (an ahead-of-time compile, bytes per device) and
the layout planner that ranks meshes, remat policies and micro-batches."""
