"""--help (-h) and --helpfull for every command: what it does, how it is called, and its flags,
one line each; --helpfull adds absl's own flags and every --config.KEY with its value.

absl answers --help only under app.run, and exits 1 there; moejax's commands parse their flags
themselves, so they answer a request for help here, before parsing: it must not fail on a
missing --workdir or --config, and it exits 0.
"""
import os
import sys

from absl import flags

HELP = ('--help', '-h', '--helpshort', '-?')
HELPFULL = ('--helpfull',)
OWN_MODULES = ('moejax.startup', 'moejax.cli')  # where the commands define their flags
DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'default.py')

# command: (what it does, how it is called)
COMMANDS = {
    'train': ('Pretrain a model, or resume the run in --workdir from its newest checkpoint.',
              '--config=configs/default.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...] '
              '[--restart] [--dry_run] [--simulated_devices=N]'),
    'eval': ('Evaluate a checkpoint: loss, perplexity and bits per byte on a split (or on '
             'token ids); prints one line, writes eval_<split>_<step>.json.',
             '--workdir=DIR [--config=...] [--split=validation] [--step=N] [--tokens=IDS.npy] '
             '[--out_dir=DIR]'),
    'generate': ('Continue a prompt with a trained model.',
                 '--workdir=DIR --prompt=TEXT [--max_new_tokens --temperature --top_k --seed]'),
    'analyze': ('Plot expert load over training, and which expert each token of a text takes.',
                '--workdir=DIR [--text=TEXT] [--step=N] [--out_dir=DIR/plots]'),
    'forward': ('Logits of token ids: a .npy of ids [B, T] in, float32 logits [B, T, V] out.',
                '--workdir=DIR [--step=N] --tokens=IDS.npy --out=LOGITS.npy'),
    'convert': ('Import a Hugging Face MoE, export a run to one, or upcycle a dense run.',
                '--from_hf=HF_DIR --workdir=NEW [--config=BASE] | --to_hf=OUT_DIR --workdir=DIR '
                '[--step=N] [--max_shard_mb=5000] | --upcycle_from=DENSE_DIR --workdir=NEW '
                '--config=MOE_CONFIG [--step=N]'),
    'plan': ('Rank mesh layouts, remat policies and micro-batches that fit --devices of '
             '--device_memory: compiled for --target (a TPU slice through libtpu, GPUs through the '
             'CUDA plugin; else lowered for it), or on CPU-simulated devices without one.',
             '--config=... --devices=N [--target=tpu-v5p] [--device_memory=80GB] [--remat '
             '--grad_accum --meshes]'),
}


def command_name(program: str) -> str:
    """'train' from launch/train.py or moejax-train."""
    return os.path.basename(program).removesuffix('.py').removeprefix('moejax-')


def exit_if_help(argv, load_config=None) -> None:
    """Print the help asked for in argv (if any) and exit 0. load_config(path) -> (config,
    problem) lists the --config.KEY overrides under --helpfull."""
    asked = [a for a in argv[1:] if a in HELP + HELPFULL]
    if not asked:
        return
    command = command_name(argv[0])
    what, how = COMMANDS.get(command, ('', ''))
    print('\n\n'.join(part for part in (f'usage: {argv[0]} {how}', what, 'flags:') if part))
    by_module = flags.FLAGS.flags_by_module_dict()
    for flag in [f for module in OWN_MODULES for f in by_module.get(module, [])]:
        print(_line(flag))
    if any(a in HELPFULL for a in asked):
        for module, found in sorted(by_module.items()):
            if module not in OWN_MODULES:
                print(f'\n{module} flags:')
                print('\n'.join(_line(flag) for flag in found))
        if load_config is not None and 'config' in flags.FLAGS:
            _print_config_keys(argv, load_config)
    else:
        print('\nTry --helpfull for every flag, and every --config.KEY with its value.')
    sys.stdout.flush()
    sys.exit(0)


def _line(flag) -> str:
    default = 'none' if flag.default is None else flag.default_as_str
    return f'  --{flag.name}: {flag.help} (default: {default})'


def _print_config_keys(argv, load_config) -> None:
    """Every key of the config given (or configs/default.py) as a --config.KEY override."""
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), DEFAULT_RECIPE)
    config, problem = load_config(path)
    print(f'\nconfig keys of {path} (override with --config.KEY=VALUE):')
    if problem:
        print(f'  ({problem})')
        return
    for group in sorted(config.keys()):
        for key, value in sorted(config[group].items()):
            print(f'  --config.{group}.{key}={value!r}')
