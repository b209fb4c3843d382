"""A Hugging Face model directory read as untrusted input (moejax/hf/tensors.py; issue 24,
findings 1 and 8): every file an index names must be a regular file inside the directory, a
safetensors header and every tensor's byte range must fit the file, and all of it is checked
before a byte of weights is read. The truth for what may be read: the safetensors library."""
import json
import os
import shutil
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from moejax.errors import ConfigError
from moejax.hf import tensors

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf', 'mixtral')
INDEX = 'model.safetensors.index.json'
FIRST_SHARD = 'model-00001-of-00004.safetensors'


def copy_of(tmp_path, layout: str = 'sharded'):
    out = tmp_path / layout
    shutil.copytree(os.path.join(FIXTURES, layout), out)
    return out


def edit_index(hf_dir, edit) -> None:
    path = hf_dir / INDEX
    index = json.loads(path.read_text())
    path.write_text(json.dumps(edit(index) or index))


def point_first_tensor_at(hf_dir, name: str) -> None:
    """The index names `name` as the file of its first tensor."""
    def edit(index):
        first = sorted(index['weight_map'])[0]
        index['weight_map'][first] = name
    edit_index(hf_dir, edit)


def refusal(hf_dir) -> str:
    """The one-line ConfigError opening the directory raises."""
    with pytest.raises(ConfigError) as err:
        tensors.Tensors(str(hf_dir))
    message = str(err.value)
    assert '\n' not in message and '--from_hf' in message, message
    return message


def test_an_index_naming_a_file_outside_the_directory_is_refused(tmp_path):
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    shutil.copy(os.path.join(FIXTURES, 'sharded', FIRST_SHARD), elsewhere / 'x.safetensors')
    for name in ('../elsewhere/x.safetensors', str(elsewhere / 'x.safetensors'), '/dev/zero'):
        hf_dir = copy_of(tmp_path / name.replace('/', '_'))
        point_first_tensor_at(hf_dir, name)
        assert 'lies outside the model directory' in refusal(hf_dir), name


def test_a_fifo_or_a_device_is_refused_without_being_opened(tmp_path):
    hf_dir = copy_of(tmp_path)
    os.remove(hf_dir / FIRST_SHARD)
    os.mkfifo(hf_dir / FIRST_SHARD)  # opening it for reading would wait for a writer forever
    found = []
    opener = threading.Thread(target=lambda: found.append(refusal(hf_dir)), daemon=True)
    opener.start()
    opener.join(timeout=20)
    if opener.is_alive():  # unblock the reader, so the failure is reported, not a hang
        os.close(os.open(hf_dir / FIRST_SHARD, os.O_WRONLY | os.O_NONBLOCK))
    assert found and 'is not a regular file' in found[0], found
    device = copy_of(tmp_path / 'device')
    os.symlink('/dev/zero', device / 'zeros.safetensors')
    point_first_tensor_at(device, 'zeros.safetensors')
    assert 'zeros.safetensors is not a regular file' in refusal(device)


def test_symlinked_shards_inside_the_directory_are_read(tmp_path):
    """The Hugging Face cache's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    source = os.path.join(FIXTURES, 'sharded')
    snapshot, blobs = tmp_path / 'snapshots' / 'rev', tmp_path / 'blobs'
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(source))):
        shutil.copy(os.path.join(source, name), blobs / f'blob{i}')
        os.symlink(f'../../blobs/blob{i}', snapshot / name)
    found = tensors.Tensors(str(snapshot))
    expected = {}
    for name in os.listdir(source):
        if name.endswith('.safetensors'):
            expected.update(load_file(os.path.join(source, name)))
    assert found.names() == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(found.get(name), tensor, err_msg=name)


def truncate(path, size: int) -> None:
    with open(path, 'r+b') as f:
        f.truncate(size)


def overwrite_start(path, data: bytes) -> None:
    with open(path, 'r+b') as f:
        f.write(data)


DAMAGED_FILES = {
    'truncated': (lambda p: truncate(p, os.path.getsize(p) // 2), 'outside the file'),
    'cut inside the header': (lambda p: truncate(p, 100), 'does not fit the file'),
    'oversized header': (lambda p: overwrite_start(p, (2**60).to_bytes(8, 'little')),
                         'does not fit the file'),
    'header not JSON': (lambda p: overwrite_start(p, (16).to_bytes(8, 'little') + b'\xff' * 16),
                        'header is not JSON'),
    'empty file': (lambda p: truncate(p, 0), 'does not fit the file'),
}


@pytest.mark.parametrize('case', list(DAMAGED_FILES))
def test_a_damaged_safetensors_file_is_refused_in_one_line(tmp_path, case):
    damage, phrase = DAMAGED_FILES[case]
    hf_dir = copy_of(tmp_path, 'single')
    damage(hf_dir / 'model.safetensors')
    assert 'model.safetensors' in refusal(hf_dir) and phrase in refusal(hf_dir)


BAD_INDEXES = {
    'missing shard': (lambda d: os.remove(d / FIRST_SHARD), f'{FIRST_SHARD} is missing'),
    'stale': (lambda d: edit_index(d, lambda i: i['weight_map'].update(
        {'lm_head.weight': 'model-00004-of-00004.safetensors'})), 'is stale'),
    'garbage': (lambda d: (d / INDEX).write_bytes(b'\x00{not json'), 'not readable JSON'),
    'no weight_map': (lambda d: edit_index(d, lambda i: {'metadata': i['metadata']}),
                      'no weight_map'),
    'a list': (lambda d: (d / INDEX).write_text('[1, 2]'), 'no weight_map'),
}


@pytest.mark.parametrize('case', list(BAD_INDEXES))
def test_a_bad_index_is_refused_in_one_line(tmp_path, case):
    damage, phrase = BAD_INDEXES[case]
    hf_dir = copy_of(tmp_path)
    damage(hf_dir)
    assert phrase in refusal(hf_dir)
