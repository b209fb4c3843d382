"""The tests' commands (python launch/<command>.py ...) forked from a process that has already
imported moejax and its dependencies, instead of each importing them afresh (~2 CPU s apiece,
~200 commands a session).

Each command still runs in a process of its own, with its own pid, environment, working
directory, stdio, signal handlers and exit status: a multiprocessing fork server (one per
xdist worker) imports the packages once, and forks a child per command that sets these up
and runs the script as `__main__`, ending as the interpreter would (its threads joined, its
atexit handlers run). `run` and `Popen` take the arguments of subprocess.run and
subprocess.Popen that the tests use.

Whatever a fork could not reproduce goes to a fresh interpreter, by subprocess, as before: a
command that is not a launch script, an environment that changes what Python or JAX read
while they were imported (PYTHON*, TF_CPP_*, or a JAX_* variable that JAX's config cannot take
back), or arguments the fork does not support (preexec_fn, stdin). Startup itself (what a
command prints or costs before it runs) is tested with fresh interpreters (test_startup,
test_usage).
"""
import atexit
import builtins
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import traceback
import types
from multiprocessing import forkserver, reduction

PRELOAD = ['tests.launcher', 'moejax.cli', 'moejax.run.loop', 'moejax.run.guards',
           'moejax.readers.evaluation', 'moejax.readers.sampling', 'moejax.readers.analysis',
           'moejax.hf.convert', 'moejax.plan.dry_run', 'moejax.plan.search', 'orbax.checkpoint',
           'tensorflow_datasets', 'tensorboardX']
LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'launch')
_server = {}  # the fork server of this process: its context, environment and fresh sys.path
# Read by Python at startup, or by C++ libraries when the packages were imported.
_STARTUP_VARS = ('PYTHON', 'TF_CPP_', 'LD_', 'OMP_', 'OPENBLAS_', 'MKL_')


def _context():
    """The fork server's context, started with this process's environment (once)."""
    if 'context' not in _server:
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
        # A fresh interpreter's sys.path (a script's own directory first), not pytest's.
        path = subprocess.run([sys.executable, '-c', 'import json, sys; print(json.dumps('
                               'sys.path[1:]))'], capture_output=True, text=True, check=True)
        _server.update(context=context, env=dict(os.environ), path=json.loads(path.stdout))
    return _server['context']


def _forkable(cmd, cwd, env, kwargs) -> bool:
    """Whether a fork of the server runs cmd as a fresh interpreter would."""
    if kwargs or len(cmd) < 2 or cmd[0] != sys.executable:
        return False
    script = os.path.join(cwd or os.getcwd(), cmd[1])
    if not (os.path.dirname(os.path.abspath(script)) == LAUNCH_DIR and os.path.isfile(script)):
        return False
    _context()
    server_env = _server['env']
    for name in set(env) | set(server_env):
        if env.get(name) == server_env.get(name) or name == 'PYTHONUNBUFFERED':
            continue
        if name.startswith(_STARTUP_VARS) or (name.startswith('JAX_') and (
                name not in env or _jax_value(name, env[name]) is None)):
            return False
    return True


def _jax_value(name: str, text: str):
    """JAX's value for its environment variable `name` = text (parsed as JAX does when it is
    imported), or None where the variable is not a config option of a known type."""
    import jax
    try:
        current = getattr(jax.config, name.lower())
    except AttributeError:
        return None
    if isinstance(current, bool):
        return text.lower() in ('1', 'true', 'yes', 'on', 't', 'y')
    for kind in (int, float, str):
        if isinstance(current, kind):
            return kind(text)
    return text if current is None else None


class _Fd:
    """A file descriptor handed to the forked child (multiprocessing passes it over the fork
    server's socket); the child receives the plain int."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received, (reduction.DupFd(self.fd),)


def _received(dup) -> int:
    return dup.detach()


def _child(argv: list, env: dict, cwd: str, fds: list, path: list) -> None:
    """In the forked child: become `python argv[1:]` in cwd with env, the stdio fds and a
    fresh interpreter's sys.path."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    server_env = dict(os.environ)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    import jax
    for name in env:
        if name.startswith('JAX_') and env[name] != server_env.get(name):
            jax.config.update(name.lower(), _jax_value(name, env[name]))
    # stdout buffered as PYTHONUNBUFFERED says; stderr is line-buffered either way, and the
    # server's sys.stderr (which logging handlers made at import hold) writes to fd 2 already.
    unbuffered = bool(env.get('PYTHONUNBUFFERED'))
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(io.open(1, 'wb', buffering=0 if unbuffered else -1,
                                          closefd=False), write_through=unbuffered)
    script = os.path.abspath(argv[1])
    sys.argv = list(argv[1:])  # as given; __file__ and sys.path[0] absolute, as Python has them
    sys.path[:] = [os.path.dirname(script), *path]
    os._exit(_run_as_main(script))


def _run_as_main(script: str) -> int:
    """Run script as __main__ and end as the interpreter does; the exit status."""
    code = 0
    main = types.ModuleType('__main__')
    main.__file__, main.__builtins__ = script, builtins
    sys.modules['__main__'] = main
    try:
        with open(script, 'rb') as f:
            exec(compile(f.read(), script, 'exec'), main.__dict__)
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            code = err.code or 0
        else:
            print(err.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - the interpreter's own last resort
        traceback.print_exc()
        code = 1
    threading._shutdown()  # non-daemon threads, then atexit: the interpreter's order
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code == -signal.SIGINT:  # as Python does: die of the signal, its default action
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code & 0xFF


def _stdio_fds(target: int, spec) -> tuple:
    """(our read end or None, the child's fd) for its stdio fd `target`, as subprocess takes
    `spec`: PIPE, DEVNULL, None (ours), an fd or a file."""
    if spec == subprocess.PIPE:
        return os.pipe()
    if spec == subprocess.DEVNULL:
        return None, os.open(os.devnull, os.O_RDWR)
    return None, os.dup(target if spec is None else spec if isinstance(spec, int)
                        else spec.fileno())


class Forked:
    """The part of subprocess.Popen the tests use, for a command forked from the server."""

    def __init__(self, args, *, cwd=None, env=None, stdout=None, stderr=None, text=False):
        self.args = args
        opened, fds = [], []
        for target, spec in ((0, subprocess.DEVNULL), (1, stdout), (2, stderr)):
            read, write = _stdio_fds(target, spec)
            opened.append(os.fdopen(read, 'r' if text else 'rb') if read is not None else None)
            fds.append(write)
        _, self.stdout, self.stderr = opened
        # daemon: a command a failed test left running is ended when the worker ends, rather
        # than waited for (multiprocessing joins its other children at exit).
        self.process = _context().Process(target=_child, args=(
            list(args), dict(os.environ if env is None else env), cwd or os.getcwd(),
            [_Fd(fd) for fd in fds], _server['path']), daemon=True)
        try:
            self.process.start()
        finally:
            for fd in fds:
                os.close(fd)
        self.pid = self.process.pid

    @property
    def returncode(self):
        return self.process.exitcode

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def send_signal(self, signum):
        if self.process.exitcode is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        """Everything the command writes to its pipes, once it has exited."""
        results = {}
        readers = [threading.Thread(target=lambda s=stream: results.__setitem__(s, s.read()))
                   for stream in (self.stdout, self.stderr) if stream is not None]
        for reader in readers:
            reader.start()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        finally:
            for reader in readers:
                reader.join()
            for stream in (self.stdout, self.stderr):
                if stream is not None:
                    stream.close()
        return results.get(self.stdout), results.get(self.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


def Popen(args, *, cwd=None, env=None, stdout=None, stderr=None, text=False, **kwargs):
    """subprocess.Popen(args, ...), forked from the server where it can be."""
    if not _forkable(args, cwd, os.environ if env is None else env, kwargs):
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                **kwargs)
    return Forked(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text)


def run(args, *, cwd=None, env=None, capture_output=False, text=False, timeout=None,
        **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(args, ...), forked from the server where it can be."""
    pipe = subprocess.PIPE if capture_output else None
    if not _forkable(args, cwd, os.environ if env is None else env, kwargs):
        return subprocess.run(args, cwd=cwd, env=env, capture_output=capture_output, text=text,
                              timeout=timeout, **kwargs)
    proc = Forked(args, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
    stdout, stderr = proc.communicate(timeout)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
