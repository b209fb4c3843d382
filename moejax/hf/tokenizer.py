"""A Hugging Face model directory's tokenizer in and out of a workdir.

Import keeps the tokenizer moejax runs (tokenizer.json or tokenizer.model, with the bos/eos/pad
ids it will use) and sets the directory's tokenizer_config.json, chat template and
generation_config.json aside for export.
"""
import json
import os
import shutil

from moejax import data as data_lib
from moejax.data import corpus, hf_tokenizer
from moejax.errors import ConfigError
from moejax.hf import tensors

EXTRAS = 'hf_tokenizer'  # workdir folder: an imported model's tokenizer_config.json etc.
EXTRA_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja',
               'chat_template.json', 'generation_config.json')


def _copy_files(src_dir: str, dst_dir: str, names) -> None:
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, name))


def find_tokenizer(hf_dir: str, vocab_size: int) -> tuple[str | None, object]:
    """(data.tokenizer kind, tokenizer) of a HF model directory: tokenizer.json if it has one
    (what transformers loads first), else tokenizer.model, with the bos/eos/pad ids its files
    name; (None, None) if it has neither. A tokenizer with more tokens than the model's
    vocabulary is refused: the model has no embedding for the rest."""
    for kind, cls in (('hf', data_lib.HFTokenizer), ('sentencepiece',
                                                     data_lib.SentencePieceTokenizer)):
        if not os.path.lexists(os.path.join(hf_dir, cls.filename)):
            continue
        tensors.member(hf_dir, cls.filename, 'tokenizer file')
        try:
            tokenizer = cls.from_path(hf_dir)
        except ConfigError as err:
            raise ConfigError('--from_hf', hf_dir, f'{cls.filename}: {err.allowed}') from None
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError('--from_hf', hf_dir, f'{cls.filename} has {tokenizer.vocab_size} '
                              f'tokens, more than config.json vocab_size={vocab_size}: the model '
                              'has no embedding for the rest')
        return kind, tokenizer
    return None, None


def import_tokenizer(hf_dir: str, workdir: str, tokenizer) -> None:
    """Save find_tokenizer's tokenizer (if any) in workdir with its ids, and keep the
    directory's tokenizer_config.json, chat template and generation_config.json aside
    (workdir/hf_tokenizer/) for export."""
    if tokenizer is not None:
        tokenizer.save(workdir)
    _copy_files(hf_dir, os.path.join(workdir, EXTRAS), EXTRA_FILES)


def export_tokenizer(workdir: str, out_dir: str) -> str | None:
    """Write workdir's tokenizer as HF files in out_dir: tokenizer.json ('hf'; 'byte' as an
    equivalent byte-fallback BPE) or tokenizer.model, and a tokenizer_config.json naming
    bos/eos/pad (an imported model's own config, chat template and generation_config.json
    carried back; ids moejax derived rather than found stay as that config had them). The kind,
    or None if none saved (the imported model's files are carried back all the same)."""
    _copy_files(os.path.join(workdir, EXTRAS), out_dir, EXTRA_FILES)
    kind = data_lib.saved_kind(workdir)
    if kind is None:
        return None
    config_path = os.path.join(out_dir, 'tokenizer_config.json')
    config = hf_tokenizer.read_json(config_path, '--workdir')
    tokenizer = data_lib.HFTokenizer(hf_tokenizer.byte_tokenizer_json()) if kind == 'byte' else data_lib.load_tokenizer(
        workdir)
    if kind == 'sentencepiece':
        corpus.atomic_write(os.path.join(out_dir, tokenizer.filename), tokenizer.model_proto)
        config.setdefault('tokenizer_class', 'LlamaTokenizer')
    else:
        corpus.atomic_write(os.path.join(out_dir, tokenizer.filename), tokenizer.file_bytes)
        config.setdefault('tokenizer_class', 'PreTrainedTokenizerFast')
    for name in hf_tokenizer.ID_NAMES:
        if name in tokenizer.ids['derived']:
            config.setdefault(f'{name}_token', None)
        else:
            config[f'{name}_token'] = tokenizer.token_text(tokenizer.ids[f'{name}_id'])
    corpus.atomic_write(config_path, json.dumps(config, indent=2, ensure_ascii=False).encode())
    return kind
