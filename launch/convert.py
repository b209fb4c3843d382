"""Hugging Face import/export and upcycling: python launch/convert.py --from_hf=HF_DIR --workdir=W
| --to_hf=OUT_DIR --workdir=W [--step=N] | --upcycle_from=DENSE_WORKDIR --workdir=W --config=FILE"""
from moejax import cli

if __name__ == '__main__':
    cli.convert_main()
