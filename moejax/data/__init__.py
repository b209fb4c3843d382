"""The data pipeline: corpora (TFDS, text files), tokenizers, packing, and batches by index.

Typical use: `check_data(cfg)` before compiling; `tok = get_tokenizer(cfg, workdir)`;
`train = train_batches(cfg, tok, process_index=p, process_count=P)`; then `train[step]`.
"""
from moejax.data.hf_tokenizer import HFTokenizer
from moejax.data.pipeline import BatchSource, check_data, eval_batches, train_batches
from moejax.data.sources import describe
from moejax.data.tokenizer import (
           ByteTokenizer,
           SentencePieceTokenizer,
           Tokenizer,
           get_tokenizer,
           load_tokenizer,
           saved_kind,
)

__all__ = ['BatchSource', 'ByteTokenizer', 'HFTokenizer', 'SentencePieceTokenizer', 'Tokenizer',
           'check_data', 'describe', 'eval_batches', 'get_tokenizer', 'load_tokenizer',
           'saved_kind', 'train_batches']
