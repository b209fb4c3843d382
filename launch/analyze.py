"""Routing plots of a training run:
python launch/analyze.py --workdir=DIR [--text='for i in range(10):'] [--step=N]
    [--out_dir=DIR/plots]

Writes expert_load.png (expert load per MoE layer over training, from metrics.jsonl) and, given
--text, token_experts.png (the top-1 expert of each token of the text, per MoE layer, from a
checkpoint). Prints the paths as JSON. Exit codes: 0 done; 2 a usage error; 1 anything else.
"""
from moejax import cli

if __name__ == '__main__':
    cli.analyze_main()
