"""Sample text from a checkpoint with a KV cache:
python launch/generate.py --workdir=DIR --prompt='def main(' [--max_new_tokens=64]
    [--temperature=0.8] [--top_k=40] [--seed=0] [--num_samples=1] [--step=N]

Prints each continuation after the prompt. Temperature 0 is greedy decoding. Exit codes: 0 done;
2 a usage error, printed as one line; 1 anything else.
"""
import sys

from absl import flags

flags.DEFINE_string('workdir', None, 'A training run\'s directory (config.json, checkpoints/).')
flags.DEFINE_string('prompt', '', 'Text to continue (the model sees bos + its tokens).')
flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate (prompt + these <= model.max_len).')
flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 = greedy.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only; 0 = all.')
flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
flags.DEFINE_integer('num_samples', 1, 'Independent continuations of the prompt.')
flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
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
    from moejax import sampling
    from moejax.errors import ConfigError
    try:
        if not FLAGS.workdir:
            raise ConfigError('--workdir', None, 'is required: the directory of a training run')
        loaded = sampling.load(FLAGS.workdir, FLAGS.step)
        texts = sampling.generate_text(loaded, FLAGS.prompt, FLAGS.max_new_tokens,
                                       temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                       seed=FLAGS.seed, num_samples=FLAGS.num_samples)
    except ConfigError as err:
        usage_error(str(err))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f'--- sample {i} (step {loaded.step}) ---')
        print(FLAGS.prompt + text, flush=True)


if __name__ == '__main__':
    main(sys.argv)
