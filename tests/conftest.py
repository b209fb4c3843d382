"""Every test sees 8 CPU-simulated devices, so mesh layouts are tested without accelerators."""
import os

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)


def pytest_addoption(parser):
    parser.addoption('--router_ulps', type=int, default=0,
                     help='nudge the router logits of every layout compared with a reference '
                     'by this many ulps (tests/decisions.py): verdicts must not change')


def pytest_configure(config):
    from tests import decisions
    decisions.LAYOUT_ULPS = config.getoption('router_ulps')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """python_stdlib and its packed rows, prepared once (~10 s) for every process to share."""
    path = tmp_path_factory.getbasetemp() / 'moejax_data'
    from moejax import data as data_lib
    from tests.helpers import tiny_config
    cfg = tiny_config()
    cfg.data.data_dir = str(path)
    tokenizer = data_lib.get_tokenizer(cfg)
    data_lib.train_batches(cfg, tokenizer)
    data_lib.eval_batches(cfg, tokenizer, 'validation')
    return str(path)
