"""One command for an accelerator: attention, the MoE layer and the moe_1b train step.

COMMAND: python benchmarks/accelerator.py [--smoke] [--out_dir=benchmarks/results]
On whatever accelerator is present (in under 8 minutes on an H100): attention.py (XLA's path and
the fused kernel, bfloat16), moe_layer.py (dense FFN; capacity engines; dropless with each
grouped matmul: ragged_dot, tokamax) and train_step.py on configs/moe_1b.py (dense, capacity,
dropless), each writing its own JSON (TFLOP/s, MFU against the chip's spec, ratios to dense) as
<name>_<platform>.json; then one summary, accelerator_<platform>.json, with the device kind and
the jax, jaxlib and tokamax versions. --smoke runs tiny shapes on the CPU into a temporary
folder (CI runs it, so the command never rots).
"""
import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {  # name -> (script, full arguments, smoke arguments)
    'attention': ('attention.py',
                  ['--dtype=bfloat16', '--shapes=4x2048x16x128,1x8192x16x128', '--kv_heads=4',
                   '--impls=xla,flash'],
                  ['--shapes=1x64x2x16', '--kv_heads=1', '--impls=xla,chunked', '--repeats=1']),
    'moe_layer': ('moe_layer.py',
                  ['--dtype=bfloat16', '--tokens=65536', '--d_model=1024', '--d_ff=2048',
                   '--experts=8', '--top_k=2', '--grouped_matmul=ragged_dot,tokamax'],
                  ['--tokens=256', '--d_model=32', '--d_ff=64', '--experts=4', '--repeats=1',
                   '--no_scaling', '--engines=sort,dropless', '--grouped_matmul=blocks']),
    'train_step': ('train_step.py',
                   ['--config=configs/moe_1b.py', '--engines=sort,dropless', '--steps=8'],
                   ['--config=configs/default.py:tiny', '--engines=dropless', '--steps=1',
                    '--warmup=1', '--peak_n=256']),
}


def versions() -> dict:
    found = {}
    for package in ('jax', 'jaxlib', 'tokamax', 'flax'):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def run(name: str, smoke: bool, out_dir: str, platform: str) -> dict:
    script, full, tiny = RUNS[name]
    out = os.path.join(out_dir, f'{name}_{platform}.json')
    cmd = [sys.executable, os.path.join(HERE, script), *(tiny if smoke else full), f'--out={out}']
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    seconds = round(time.time() - start, 1)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {'ok': False, 'seconds': seconds, 'error': ' | '.join(tail)}
    with open(out) as f:
        return {'ok': True, 'seconds': seconds, 'result': json.load(f)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--smoke', action='store_true', help='tiny shapes on the CPU')
    p.add_argument('--out_dir', default=None, help='default: benchmarks/results (smoke: a '
                   'temporary folder)')
    args = p.parse_args()
    if args.smoke:
        os.environ['JAX_PLATFORMS'] = 'cpu'
    import jax
    platform = jax.default_backend()
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix='moejax_accelerator_') if args.smoke
                               else os.path.join(HERE, 'results'))
    os.makedirs(out_dir, exist_ok=True)
    summary = {'benchmark': 'accelerator', 'smoke': args.smoke, 'platform': platform,
               'device_kind': jax.devices()[0].device_kind, 'devices': jax.device_count(),
               'versions': versions(),
               'runs': {name: run(name, args.smoke, out_dir, platform) for name in RUNS}}
    path = os.path.join(out_dir, f'accelerator_{platform}.json')
    with open(path, 'w') as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != 'runs'} | {
        'runs': {n: {'ok': r['ok'], 'seconds': r['seconds']} for n, r in summary['runs'].items()},
        'out': path}), flush=True)
    if not all(r['ok'] for r in summary['runs'].values()):
        sys.exit(1)


if __name__ == '__main__':
    main()
