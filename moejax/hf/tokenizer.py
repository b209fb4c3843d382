"""A Hugging Face model directory's tokenizer in and out of a workdir.

Import keeps the tokenizer moejax runs (tokenizer.json or tokenizer.model, with the bos/eos/pad
ids it will use) and sets the directory's tokenizer_config.json and chat template aside for export.
"""
import json
import os
import shutil

from moejax import data as data_lib
from moejax.data import corpus, hf_tokenizer

EXTRAS = 'hf_tokenizer'  # workdir folder: an imported model's tokenizer_config.json etc.
EXTRA_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja',
               'chat_template.json')


def _copy_files(src_dir: str, dst_dir: str, names) -> None:
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, name))


def import_tokenizer(hf_dir: str, workdir: str) -> str | None:
    """Save a HF model directory's tokenizer in workdir with its bos/eos/pad ids: tokenizer.json
    if it has one (what transformers loads first), else tokenizer.model. Its tokenizer_config.json
    and chat template are kept aside (workdir/hf_tokenizer/) for export. The kind saved, or None
    when hf_dir holds no tokenizer."""
    if os.path.isfile(os.path.join(hf_dir, data_lib.HFTokenizer.filename)):
        kind, tokenizer = 'hf', data_lib.HFTokenizer.from_path(hf_dir)
    elif os.path.isfile(os.path.join(hf_dir, data_lib.SentencePieceTokenizer.filename)):
        kind, tokenizer = 'sentencepiece', data_lib.SentencePieceTokenizer.from_path(hf_dir)
    else:
        return None
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(workdir)
    _copy_files(hf_dir, os.path.join(workdir, EXTRAS), EXTRA_FILES)
    return kind


def export_tokenizer(workdir: str, out_dir: str) -> str | None:
    """Write workdir's tokenizer as HF files in out_dir: tokenizer.json ('hf'; 'byte' as an
    equivalent byte-fallback BPE) or tokenizer.model, and a tokenizer_config.json naming
    bos/eos/pad (an imported model's own config and chat template carried back; ids moejax
    derived rather than found stay as that config had them). The kind, or None if none saved."""
    kind = data_lib.saved_kind(workdir)
    if kind is None:
        return None
    os.makedirs(out_dir, exist_ok=True)
    _copy_files(os.path.join(workdir, EXTRAS), out_dir, EXTRA_FILES)
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
