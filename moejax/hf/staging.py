"""Conversions that leave either nothing or a whole result: build aside, then rename.

An import, upcycle or export is built in a temporary sibling of its target,
`.moejax-partial.<host>.<pid>.<hash of the target's name>`, and renamed onto the target (new, or
an empty directory) only when complete. A failure, Ctrl-C or SIGTERM removes the temporary; one
left by a killed process (kill -9) of this host is removed by the next conversion to the same
target. A new workdir is held under the trainers' lock (train.lock) meanwhile, so neither a
second conversion nor a trainer can start in it; the lock moves into the result just before the
final rename, and is released after it.
"""
import contextlib
import errno
import hashlib
import os
import shutil
import signal
import socket
import sys
import time

from moejax.errors import ConfigError
from moejax.run import workdir as workdir_lib

PREFIX = '.moejax-partial.'
QUIET_SECONDS = 0.5


def _name_digest(target: str) -> str:
    """Names the target in a temporary's name whatever its length (names have a limit)."""
    return hashlib.sha256(os.path.basename(target).encode()).hexdigest()[:12]


def partial_path(target: str) -> str:
    """This process's temporary sibling for building target."""
    name = f'{PREFIX}{socket.gethostname()}.{os.getpid()}.{_name_digest(target)}'
    return os.path.join(os.path.dirname(target), name)


def remove_stale(target: str) -> None:
    """Remove the temporaries for target that processes of this host, now gone, left behind."""
    parent = os.path.dirname(target)
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        host_pid, _, digest = entry[len(PREFIX):].rpartition('.')
        host, _, pid = host_pid.rpartition('.')
        if (entry.startswith(PREFIX) and digest == _name_digest(target) and pid.isdigit() and
                host == socket.gethostname() and not workdir_lib.process_alive(int(pid))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            print(f'Removed {entry}, a partial conversion to {target} left by pid {pid} (killed).',
                  flush=True)


def _contents(target: str) -> list[str]:
    """What a directory holds besides a trainer's lock (a workdir that holds only a lock is
    still empty: the lock's holder is checked when it is taken)."""
    return [e for e in os.listdir(target) if e != workdir_lib.LOCK and
            not e.startswith(workdir_lib.LOCK + '.')]


def check_target(target: str, key: str) -> None:
    """ConfigError (one line) unless target can become the result: missing or an empty
    directory, with a name the filesystem takes, in a directory that can be written."""
    if os.path.lexists(target) and not os.path.isdir(target):
        kind = 'a dangling symlink' if os.path.islink(target) else 'a file'
        raise ConfigError(key, target, f'is {kind}, not a directory; give a new directory')
    if os.path.isdir(target) and _contents(target):
        raise ConfigError(key, target, f'already holds {sorted(_contents(target))[0]} (not '
                          'empty); nothing was changed: give a new or empty directory')
    parent = os.path.dirname(target)
    reason = workdir_lib.unwritable(parent)
    if reason:
        raise ConfigError(key, target, f'cannot be written in {parent} ({reason})')
    if len(os.path.basename(target).encode()) > os.pathconf(parent, 'PC_NAME_MAX'):
        raise ConfigError(key, target, f'its name is longer than {parent} allows '
                          f'({os.pathconf(parent, "PC_NAME_MAX")} bytes)')


def _discard(path: str) -> None:
    """Remove a partial build. The last writes of a failed save (TensorStore's, in threads of
    its own) can land just after a removal and make the path again: remove it until it stays
    gone for QUIET_SECONDS."""
    for _ in range(10):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(QUIET_SECONDS)
        if not os.path.lexists(path):
            return


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f'signal {signum}')


@contextlib.contextmanager
def staged(target: str, key: str, *, lock: bool):
    """Yield a new temporary directory to build target in; when the block ends normally,
    rename it onto target. With `lock`, target (a workdir) is held under its lock meanwhile.
    On any failure or signal the temporary is removed, and a target this created is too."""
    target = os.path.abspath(target)
    check_target(target, key)
    created = not os.path.exists(target)
    holder = workdir_lib.WorkdirLock(target, purpose='conversion') if lock else None
    if holder:
        os.makedirs(target, exist_ok=True)
        holder.acquire()
    tmp = partial_path(target)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGINT raises KeyboardInterrupt
    try:
        check_target(target, key)  # again under the lock: nobody else writes there now
        remove_stale(target)
        os.mkdir(tmp)
        yield tmp
        _commit(tmp, target, key, holder)
    except BaseException as err:
        _discard(tmp)
        if holder:
            holder.release()
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(target)  # only if empty: never anyone else's files
        if isinstance(err, KeyboardInterrupt):
            print(f'moejax: interrupted: nothing was written to {target}', file=sys.stderr,
                  flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ordinary_permissions(root: str) -> None:
    """Modes as the umask gives new files (libraries write some files private: 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def _commit(tmp: str, target: str, key: str, holder) -> None:
    """Rename the finished temporary onto target (the lock, if held, moves in with it)."""
    _ordinary_permissions(tmp)
    if holder:
        os.rename(holder.path, os.path.join(tmp, workdir_lib.LOCK))
    try:
        os.rename(tmp, target)  # atomic: target is missing or an empty directory
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise ConfigError(key, target, 'was written by another process meanwhile; this '
                          'conversion was discarded') from None
    if holder:
        holder.release()  # the lock is at its old path again, now inside the result
