"""Run a command as N cooperating JAX processes on this machine: a cluster in miniature.

python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
    python launch/train.py --config=configs/default.py:tiny --workdir=/tmp/run

Each process gets M CPU devices and the loopback coordinator 127.0.0.1:<free port> through
MOEJAX_COORDINATOR / MOEJAX_NUM_PROCESSES / MOEJAX_PROCESS_ID (moejax.mesh.init_distributed
reads them and uses gloo for CPU collectives). Output lines are prefixed with [pN]. If any
process fails, the others are stopped and this exits with the failing process's code.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 10


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, devices: int, port: int) -> dict:
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={devices}']),
                MOEJAX_COORDINATOR=f'127.0.0.1:{port}', MOEJAX_NUM_PROCESSES=str(num_processes),
                MOEJAX_PROCESS_ID=str(process_id))


def stream(prefix: str, pipe, lock: threading.Lock) -> None:
    """Copy a child's output line by line, each line prefixed."""
    for line in iter(pipe.readline, b''):
        with lock:
            sys.stdout.buffer.write(prefix.encode() + line)
            sys.stdout.buffer.flush()
    pipe.close()


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the processes still running (their own process groups), then SIGKILL."""
    def signal_all(sig):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
    signal_all(signal.SIGTERM)
    deadline = time.time() + GRACE_SECONDS
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    signal_all(signal.SIGKILL)
    for p in procs:
        p.wait()


def run(command: list[str], num_processes: int, devices_per_process: int) -> int:
    """Start the processes, wait for all; the first failure stops the rest. Returns an exit code."""
    port = free_port()
    lock = threading.Lock()
    procs, threads = [], []
    for i in range(num_processes):
        # Own session: a failure elsewhere stops this process and everything it started.
        p = subprocess.Popen(command, env=child_env(i, num_processes, devices_per_process, port),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=stream, args=(f'[p{i}] ', p.stdout, lock), daemon=True)
        t.start()
        threads.append(t)
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, c = failed[0]
                print(f'[local_cluster] process {i} exited with {c}; stopping the others',
                      file=sys.stderr, flush=True)
                code = c if c > 0 else 128 - c
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        code = 130
    finally:
        stop(procs)
        for t in threads:
            t.join(timeout=5)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index('--') if '--' in argv else len(argv)
    parser = argparse.ArgumentParser(
        usage='local_cluster.py --num_processes=N --devices_per_process=M -- CMD ...',
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num_processes', type=int, default=2, help='processes to start')
    parser.add_argument('--devices_per_process', type=int, default=4,
                        help='CPU-simulated devices of each process')
    own = ['--help' if a == '--helpfull' else a for a in argv[:split]]
    args = parser.parse_args(own)  # --help prints the flags and exits 0
    command = argv[split + 1:]
    if not command or args.num_processes < 1 or args.devices_per_process < 1:
        parser.error('need a command after --, and --num_processes, --devices_per_process >= 1')
    return run(command, args.num_processes, args.devices_per_process)


if __name__ == '__main__':
    sys.exit(main())
