"""Orbax checkpoints of the whole run: train state (params, optimizer, step, RNG) + data position.

Saves are asynchronous (training does not wait on disk) and atomic (Orbax writes to a temporary
directory and renames it when complete, so a write cut short is never taken for a checkpoint;
the training run removes such leftovers when it starts again). Each checkpoint also
holds a digest (size and CRC32 of every file), written before the rename, so a file truncated
or corrupted later is caught before Orbax reads it: TensorStore would otherwise restore
flipped bits silently. A latest checkpoint that fails to restore is reported in one line,
moved aside (not deleted) and the previous one is used.
"""
import glob
import json
import os
import shutil
import sys
import time
import zlib

import jax
import orbax.checkpoint as ocp

from moejax.errors import ConfigError

DIGEST = 'moejax_digest.json'
# Rewritten by Orbax after the digest is taken, and not needed to restore: left out of it.
UNDIGESTED = (DIGEST, '_CHECKPOINT_METADATA')


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files do not match the digest written with them."""


def file_digests(step_dir: str) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} for every file a checkpoint needs."""
    digests = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel in UNDIGESTED:
                continue
            crc = 0
            with open(path, 'rb') as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            digests[rel] = [os.path.getsize(path), crc]
    return digests


def write_digest(step_dir: str) -> None:
    """Record the files of a just-written checkpoint (atomically: a cut write leaves none)."""
    digests, path = file_digests(step_dir), os.path.join(step_dir, DIGEST)
    with open(path + '.tmp', 'w') as f:
        json.dump(digests, f, sort_keys=True)
    os.replace(path + '.tmp', path)


def verify_digest(step_dir: str) -> bool:
    """Raise CorruptCheckpointError on a missing, truncated or altered file.

    Returns False (nothing checked) for a checkpoint written without a digest.
    """
    path = os.path.join(step_dir, DIGEST)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        expected = json.load(f)
    actual = file_digests(step_dir)
    for rel, (size, crc) in sorted(expected.items()):
        if rel not in actual:
            raise CorruptCheckpointError(f'{rel} is missing')
        if actual[rel][0] != size:
            raise CorruptCheckpointError(f'{rel} has {actual[rel][0]} bytes, expected {size}')
        if actual[rel][1] != crc:
            raise CorruptCheckpointError(f'{rel} has a wrong checksum (corrupted)')
    return True


def _one_line(err: Exception, limit: int = 200) -> str:
    text = ' '.join(str(err).split())
    return f'{type(err).__name__}: {text[:limit]}'


class Checkpointer:
    """Save/restore (state, data position) by step.

    Only the training run that owns the directory passes cleanup_tmp (removing saves cut short
    by a crash); a reader of a live run's directory passes read_only and changes nothing.
    """

    def __init__(self, workdir: str, keep: int, *, async_save: bool = True,
                 read_only: bool = False, cleanup_tmp: bool = False):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
        self.read_only, self.async_save = read_only, async_save
        self._saving = None  # the step whose asynchronous save is in flight
        async_options = ocp.AsyncOptions(post_finalization_callback=self._before_commit) \
            if async_save else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=cleanup_tmp and not read_only,
            enable_async_checkpointing=async_save, async_options=async_options)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> bool:
        """Start an asynchronous save; a step that is already saved is left untouched."""
        if step in self.manager.all_steps():
            return False
        self.manager.wait_until_finished()  # one save in flight: _saving names it
        self._saving = step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        saved = self.manager.save(step, args=args)
        if saved and not self.async_save:
            self._write_digest(os.path.join(self.directory, str(step)))
        return saved

    def _before_commit(self) -> None:
        """Orbax calls this when a save's files are complete, before the rename commits it."""
        step, self._saving = self._saving, None
        tmp = glob.glob(os.path.join(self.directory, f'{step}.orbax-checkpoint-tmp*'))
        self._write_digest(tmp[0] if len(tmp) == 1 else os.path.join(self.directory, str(step)))

    def _write_digest(self, step_dir: str) -> None:
        if jax.process_index() == 0 and os.path.isdir(step_dir):
            write_digest(step_dir)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, step) from `step` or the newest restorable one; None if none."""
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            try:
                return self._restore(abstract_state, s)
            except Exception as err:  # noqa: BLE001 - any failure means: not restorable
                if step is not None:
                    raise
                where = self._set_aside(s)
                print(f'WARNING: checkpoint {s} could not be restored ({_one_line(err)}); '
                      f'{where}, trying the previous one', file=sys.stderr, flush=True)
        return None

    def read(self, abstract_state, step: int | None = None):
        """(state, step) of a saved step (default: the newest restorable) for a reader of a run;
        a step that was never saved, or no restorable checkpoint, is a ConfigError."""
        steps = self.steps()
        if step is not None and step not in steps:
            raise ConfigError('--step', step, f'no such checkpoint; saved steps: {steps}')
        restored = self.restore(abstract_state, step)
        if restored is None:
            raise ConfigError('--workdir', self.workdir, 'holds no restorable checkpoint')
        state, _, saved_step = restored
        return state, saved_step

    def _restore(self, abstract_state, step: int):
        verify_digest(os.path.join(self.directory, str(step)))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored['state'], dict(restored['data']), step

    def _set_aside(self, step: int) -> str:
        """Move an unreadable checkpoint out of the manager's way, keeping it for inspection."""
        if self.read_only:
            return 'left in place (read-only)'
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.workdir, 'unreadable_checkpoints', f'{step}-{int(time.time())}')
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
        self.manager.reload()
        return f'moved to {dst}'

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
