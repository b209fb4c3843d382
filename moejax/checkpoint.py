"""Orbax checkpoints of the whole run: train state (params, optimizer, step, RNG) + data position.

Saves are asynchronous (training does not wait on disk) and atomic (Orbax writes to a temporary
directory and renames it when complete, so a write cut short is never taken for a checkpoint).
A latest checkpoint that fails to restore is reported in one line, moved aside (not deleted)
and the previous one is used.
"""
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> bool:
        """Start an asynchronous save; a step that is already saved is left untouched."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, step) from `step` or the newest restorable one; None if none."""
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore())
                restored = self.manager.restore(s, args=args)
                return restored['state'], dict(restored['data']), s
            except Exception as err:  # noqa: BLE001 - any failure means: not restorable
                if step is not None:
                    raise
                print(f'WARNING: checkpoint {s} could not be restored '
                      f'({type(err).__name__}: {str(err)[:200]}); trying the previous one',
                      file=sys.stderr, flush=True)
                self._set_aside(s)
        return None

    def _set_aside(self, step: int) -> None:
        """Move an unreadable checkpoint out of the manager's way, keeping it for inspection."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(self.workdir, 'unreadable_checkpoints', f'{step}-{int(time.time())}')
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(src):
                shutil.move(src, dst)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
