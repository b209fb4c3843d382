"""Routing plots of a training run:
python launch/analyze.py --workdir=DIR [--text='for i in range(10):'] [--step=N]
    [--out_dir=DIR/plots]

Writes expert_load.png (expert load per MoE layer over training, from metrics.jsonl) and, given
--text, token_experts.png (the top-1 expert of each token of the text, per MoE layer, from a
checkpoint). Prints the paths as JSON. Exit codes: 0 done; 2 a usage error; 1 anything else.
"""
import json
import sys

from absl import flags

flags.DEFINE_string('workdir', None, 'A training run\'s directory (metrics.jsonl, checkpoints/).')
flags.DEFINE_string('text', None, 'Text whose tokens\' experts to plot (needs a checkpoint).')
flags.DEFINE_integer('step', None, 'Checkpoint step for --text; default: the latest.')
flags.DEFINE_string('out_dir', None, 'Where the PNGs go; default: WORKDIR/plots.')
FLAGS = flags.FLAGS


def usage_error(message: str):
    print(f'moejax: error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    try:
        extra = FLAGS(argv)[1:]
    except flags.Error as err:
        usage_error(str(err).splitlines()[0])
    if extra:
        usage_error(f'unexpected arguments: {extra}')
    from moejax import analysis
    from moejax.errors import ConfigError
    try:
        if not FLAGS.workdir:
            raise ConfigError('--workdir', None, 'is required: the directory of a training run')
        paths = analysis.analyze(FLAGS.workdir, text=FLAGS.text, step=FLAGS.step,
                                 out_dir=FLAGS.out_dir)
    except ConfigError as err:
        usage_error(str(err))
    print(json.dumps(paths), flush=True)


if __name__ == '__main__':
    main(sys.argv)
