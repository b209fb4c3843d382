"""The data pipeline: corpora (TFDS, text files), tokenizers, packing, and batches by index.

Typical use: `check_data(cfg)` before compiling; `tok = get_tokenizer(cfg, workdir)`;
`train = train_batches(cfg, tok, process_index=p, process_count=P)`; then `train[step]`.
"""
from moejax.data.pipeline import BatchSource
from moejax.data.pipeline import check_data
from moejax.data.pipeline import eval_batches
from moejax.data.pipeline import train_batches
from moejax.data.hf_tokenizer import HFTokenizer
from moejax.data.tokenizer import ByteTokenizer
from moejax.data.tokenizer import SentencePieceTokenizer
from moejax.data.tokenizer import Tokenizer
from moejax.data.tokenizer import export_hf_tokenizer
from moejax.data.tokenizer import get_tokenizer
from moejax.data.tokenizer import import_hf_tokenizer
from moejax.data.tokenizer import load_tokenizer
from moejax.data.tokenizer import saved_kind

__all__ = ['BatchSource', 'ByteTokenizer', 'HFTokenizer', 'SentencePieceTokenizer', 'Tokenizer',
           'check_data', 'eval_batches', 'export_hf_tokenizer', 'get_tokenizer',
           'import_hf_tokenizer', 'load_tokenizer', 'saved_kind', 'train_batches']
