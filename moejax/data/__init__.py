"""The data pipeline: corpora (TFDS, text files), tokenizers, packing, and batches by index.

Typical use: `check_data(cfg)` before compiling; `tok = get_tokenizer(cfg, workdir)`;
`train = train_batches(cfg, tok, process_index=p, process_count=P)`; then `train[step]`.
"""
from moejax.data.pipeline import BatchSource
from moejax.data.pipeline import check_data
from moejax.data.pipeline import eval_batches
from moejax.data.pipeline import train_batches
from moejax.data.tokenizer import ByteTokenizer
from moejax.data.tokenizer import SentencePieceTokenizer
from moejax.data.tokenizer import Tokenizer
from moejax.data.tokenizer import get_tokenizer

__all__ = ['BatchSource', 'ByteTokenizer', 'SentencePieceTokenizer', 'Tokenizer', 'check_data',
           'eval_batches', 'get_tokenizer', 'train_batches']
