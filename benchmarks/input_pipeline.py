"""Input-pipeline throughput: train batches per second from the packed cache, as one JSON line.

COMMAND: python benchmarks/input_pipeline.py [--config=configs/default.py[:VARIANT]]
             [--num_batches=500] [--data.KEY=VALUE ...]
Preparing the corpus, tokenizer and packed cache (first run only) is timed apart as prepare_s.
Next to it, `train_tokens_per_sec` is what the config's train step consumes on this machine
(measured in the same run on the same batches), and `headroom` is the ratio of the two.
"""
import argparse
import ast
import json
import os
import time

import numpy as np

import common  # puts the repository on sys.path
from moejax import data

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'default.py')


def apply_overrides(cfg, overrides: list[str]) -> None:
    """--data.seq_len=256 style flags; values are Python literals, or strings if not."""
    for flag in overrides:
        key, _, text = flag.lstrip('-').partition('=')
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        group, name = key.split('.')
        cfg[group][name] = value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--num_batches', type=int, default=500)
    parser.add_argument('--train_steps', type=int, default=10, help='0 skips the train side')
    args, overrides = parser.parse_known_args()
    cfg = common.load_config(args.config)
    apply_overrides(cfg, overrides)

    start = time.perf_counter()
    data.check_data(cfg)
    tokenizer = data.get_tokenizer(cfg)
    source = data.train_batches(cfg, tokenizer)
    prepare_s = time.perf_counter() - start

    real_tokens = 0
    start = time.perf_counter()
    for i, batch in enumerate(source):
        real_tokens += int(np.count_nonzero(batch['segment_ids']))
        if i + 1 == args.num_batches:
            break
    seconds = time.perf_counter() - start
    slots = args.num_batches * cfg.data.batch_size * cfg.data.seq_len
    train_rate = train_tokens_per_sec(cfg, source, args.train_steps) if args.train_steps else None
    print(json.dumps({
        'benchmark': 'input_pipeline', 'dataset': cfg.data.name, 'tokenizer': cfg.data.tokenizer,
        'vocab_size': cfg.data.vocab_size, 'seq_len': cfg.data.seq_len,
        'batch_size': cfg.data.batch_size, 'num_batches': args.num_batches,
        'tokens_per_sec': round(slots / seconds),
        'real_tokens_per_sec': round(real_tokens / seconds),
        'pad_fraction': round(1 - real_tokens / slots, 4), 'prepare_s': round(prepare_s, 2),
        'packed_rows': source.num_rows, 'train_tokens_per_sec': train_rate,
        'headroom': round(slots / seconds / train_rate, 1) if train_rate else None}))


def train_tokens_per_sec(cfg, source, steps: int) -> float:
    """Tokens/s the config's jitted train step consumes (after 2 warm-up steps)."""
    import jax
    from moejax import mesh
    from moejax.run import state as state_lib
    from moejax.run import step as step_lib
    setup = state_lib.make_setup(cfg, mesh.make_mesh(cfg.mesh))
    state = state_lib.init_state(setup, cfg.train.seed)
    step_fn, _ = step_lib.compile_steps(setup)
    batches = [state_lib.global_batch(setup, source[i]) for i in range(steps + 2)]
    for batch in batches[:2]:
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in batches[2:]:
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    return round(steps * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - start))


if __name__ == '__main__':
    main()
