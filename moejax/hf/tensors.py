"""The files of a Hugging Face model directory, read as untrusted input.

Nothing in the directory is trusted before it is checked: a file the index names must be a
regular file inside the directory (a symlink inside it, as the Hugging Face cache makes, may
point anywhere: it is followed, but a device or FIFO is refused); a safetensors header must fit
its file; every tensor's dtype, shape and byte range must agree with each other and with the
file's size. Only then are bytes read, memory-mapped, so reading a tensor reads only its bytes.
Every refusal is one ConfigError line naming --from_hf and the file.
"""
import json
import math
import os
import stat

import ml_dtypes
import numpy as np

from moejax.errors import ConfigError

INDEX = 'model.safetensors.index.json'
MAX_HEADER_BYTES = 100 << 20   # the safetensors library's own limit
MAX_JSON_BYTES = {'config.json': 1 << 20, 'generation_config.json': 1 << 20, INDEX: 64 << 20}
ITEM_BYTES = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E4M3': 1, 'F8_E5M2': 1, 'I16': 2, 'U16': 2,
              'F16': 2, 'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}
# Weights moejax imports: floating point, converted to float32. Integer, boolean and 8-bit float
# tensors are quantized or not weights at all; read as floats they would be garbage.
FLOAT_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                'BF16': ml_dtypes.bfloat16}
# 8-bit floats are read only beside their block scales (DeepSeek-V3's FP8: moejax/hf/deepseek.py).
FP8_DTYPES = {'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2}


def _refuse(hf_dir: str, why: str):
    raise ConfigError('--from_hf', hf_dir, why)


def member(hf_dir: str, name, what: str) -> str:
    """The path of the regular file `name` inside hf_dir (lexically: a symlink inside may point
    anywhere); refused if it leaves the directory, is missing or is not a regular file."""
    parts = name.replace('\\', '/').split('/') if isinstance(name, str) else ['..']
    if not name or os.path.isabs(name) or '..' in parts:
        _refuse(hf_dir, f'{what} {name!r} lies outside the model directory; only files inside '
                'it are read')
    path = os.path.join(hf_dir, name)
    try:
        mode = os.stat(path).st_mode  # follows symlinks: the file that would be read
    except OSError as err:
        _refuse(hf_dir, f'{what} {name} is missing or unreadable ({err.strerror})')
    if not stat.S_ISREG(mode):
        _refuse(hf_dir, f'{what} {name} is not a regular file (a device, FIFO or directory)')
    return path


def read_json(hf_dir: str, name: str):
    """The JSON in hf_dir/name, a regular file of bounded size; None if there is no such file."""
    if not os.path.lexists(os.path.join(hf_dir, name)):
        return None
    path = member(hf_dir, name, 'file')
    limit = MAX_JSON_BYTES.get(name, 16 << 20)
    if os.path.getsize(path) > limit:
        _refuse(hf_dir, f'{name} is larger than {limit >> 20} MB; not a Hugging Face file')
    try:
        with open(path, 'rb') as f:
            return json.loads(f.read())
    except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
        reason = getattr(err, 'strerror', None) or str(err).splitlines()[0][:100]
        _refuse(hf_dir, f'{name} is not readable JSON ({reason})')


class SafetensorsFile:
    """One safetensors file whose header was checked against its size: `specs` maps each
    tensor's name to (dtype, shape, start, end) with byte offsets into the file."""

    def __init__(self, hf_dir: str, name: str):
        self.hf_dir, self.name = hf_dir, name
        self.path = member(hf_dir, name, 'weights file')
        size = os.path.getsize(self.path)
        with open(self.path, 'rb') as f:
            declared = int.from_bytes(f.read(8), 'little') if size >= 8 else -1
            if not 0 < declared <= min(size - 8, MAX_HEADER_BYTES):
                self._refuse(f'its header length ({declared} bytes) does not fit the file '
                             f'({size} bytes): truncated or not safetensors')
            header = self._header(f.read(declared))
        start, data_bytes = 8 + declared, size - 8 - declared
        self.specs = {key: self._spec(key, spec, start, data_bytes)
                      for key, spec in header.items() if key != '__metadata__'}
        self._bytes = None

    def _refuse(self, why: str):
        _refuse(self.hf_dir, f'{self.name}: {why}')

    def _header(self, raw: bytes) -> dict:
        try:
            header = json.loads(raw)
        except ValueError as err:
            self._refuse(f'its header is not JSON ({str(err)[:80]})')
        if not isinstance(header, dict):
            self._refuse('its header is not a JSON object')
        return header

    def _spec(self, key: str, spec, start: int, data_bytes: int) -> tuple:
        """(dtype, shape, first byte, end byte) of one tensor, or a refusal saying why not."""
        spec = spec if isinstance(spec, dict) else {}
        dtype, shape, offsets = spec.get('dtype'), spec.get('shape'), spec.get('data_offsets')
        if dtype not in ITEM_BYTES:
            self._refuse(f'tensor {key} has an unknown dtype {dtype!r}')
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            self._refuse(f'tensor {key} has a malformed shape {shape!r}')
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1] <= data_bytes):
            self._refuse(f'tensor {key} has byte range {offsets!r} outside the file\'s '
                         f'{data_bytes} data bytes (truncated?)')
        if offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]:
            self._refuse(f'tensor {key}: byte range {offsets} does not hold {dtype} {shape}')
        return dtype, tuple(shape), start + offsets[0], start + offsets[1]

    def read(self, key: str) -> np.ndarray:
        """The tensor, memory-mapped (float weights only: check_dtype first)."""
        dtype, shape, begin, end = self.specs[key]
        if self._bytes is None:
            self._bytes = np.memmap(self.path, np.uint8, mode='r')
        np_dtype = FLOAT_DTYPES.get(dtype) or FP8_DTYPES[dtype]
        return self._bytes[begin:end].view(np_dtype).reshape(shape)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Tensors:
    """The tensors of a safetensors checkpoint directory: one file, or shards with an index.

    Every file is opened and its header checked here, before any tensor is read."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        weight_map = self._weight_map()
        files = sorted(set(weight_map.values())) if weight_map is not None else sorted(
            name for name in os.listdir(hf_dir) if name.endswith('.safetensors'))
        self._files = {name: SafetensorsFile(hf_dir, name) for name in files}
        self._where = weight_map if weight_map is not None else self._locate()
        for key, name in self._where.items():
            if key not in self._files[name].specs:
                _refuse(hf_dir, f'{INDEX} is stale: it puts tensor {key} in {name}, which does '
                        'not hold it')
        if not self._where:
            _refuse(hf_dir, 'holds no *.safetensors weights (PyTorch .bin checkpoints: re-save '
                    'them with save_pretrained)')

    def _weight_map(self) -> dict | None:
        """The index's {tensor: file}, checked to be one; None without an index."""
        index = read_json(self.hf_dir, INDEX)
        if index is None:
            return None
        weight_map = index.get('weight_map') if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            _refuse(self.hf_dir, f'{INDEX} has no weight_map of tensor names to file names')
        return weight_map

    def _locate(self) -> dict:
        """{tensor: file} from the files' own headers (no index); a name in two files is
        ambiguous and refused."""
        where = {}
        for name, file in self._files.items():
            for key in file.specs:
                if key in where:
                    _refuse(self.hf_dir, f'tensor {key} is in both {where[key]} and {name}; '
                            f'which one is meant is unclear (add an {INDEX})')
                where[key] = name
        return where

    def _spec(self, key: str) -> tuple:
        if key not in self._where:
            _refuse(self.hf_dir, f'tensor {key} is missing')
        return self._files[self._where[key]].specs[key]

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple:
        return self._spec(key)[1]

    def dtype(self, key: str) -> str:
        return self._spec(key)[0]

    def get(self, key: str) -> np.ndarray:
        self._spec(key)
        return self._files[self._where[key]].read(key)


def check_dtype(tensors: Tensors, key: str) -> None:
    """Refuse a tensor that is not floating point (int8, bool, fp8: quantized or not weights)."""
    dtype = tensors.dtype(key)
    if dtype not in FLOAT_DTYPES:
        _refuse(tensors.hf_dir, f'tensor {key} is {dtype}; moejax imports floating-point weights '
                f'({", ".join(FLOAT_DTYPES)}): quantized checkpoints are not supported')
