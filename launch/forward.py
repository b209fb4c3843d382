"""Logits of a checkpoint for parity checks (float32, evaluation mode):
python launch/forward.py --workdir=DIR [--step=N] --tokens=IDS.npy --out=LOGITS.npy

IDS.npy holds integer token ids [B, T] (or [T]), each row one whole document; LOGITS.npy gets the
float32 logits [B, T, V]. Prints {"step", "shape", "out"} as one JSON line. Exit codes: 0 done;
2 a usage error, printed as one line; 1 anything else.
"""
from moejax import cli

if __name__ == '__main__':
    cli.forward_main()
