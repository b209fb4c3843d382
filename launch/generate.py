"""Sample text from a checkpoint with a KV cache:
python launch/generate.py --workdir=DIR --prompt='def main(' [--max_new_tokens=64]
    [--temperature=0.8] [--top_k=40] [--seed=0] [--num_samples=1] [--step=N]

Prints each continuation after the prompt. Temperature 0 is greedy decoding. Exit codes: 0 done;
2 a usage error, printed as one line; 1 anything else.
"""
from moejax import cli

if __name__ == '__main__':
    cli.generate_main()
