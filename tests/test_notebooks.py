"""Execute every notebook in notebooks/ so they never rot; any cell error fails the test.

The kernel is this interpreter (a kernelspec written to a temporary Jupyter path), so the test
works from a fresh `pip install -e .[test]` with no kernel installed. train_and_inspect runs the
`tiny` variant for its own 10 steps on the session's prepared corpus (conftest's data_dir), in a
command's environment (8 CPU devices, helpers.cli_env): its programs are trained_tiny_run's,
which the session's XLA cache holds for whichever of the two compiles second.
"""
import glob
import os

import pytest

from tests.helpers import cli_env

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
kernelspec = pytest.importorskip('ipykernel.kernelspec')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, 'notebooks')
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))
KERNEL = 'moejax-test'


@pytest.fixture(scope='module')
def kernel_env(tmp_path_factory, data_dir):
    """A kernelspec running sys.executable, and the environment the notebooks read."""
    root = tmp_path_factory.mktemp('jupyter')
    kernelspec.install(kernel_name=KERNEL, prefix=str(root))
    (root / 'tmp').mkdir()
    env = {'JUPYTER_PATH': str(root / 'share' / 'jupyter'), 'TMPDIR': str(root / 'tmp'),
           'MOEJAX_NOTEBOOK_VARIANT': 'tiny', 'MOEJAX_NOTEBOOK_STEPS': '10',
           'MOEJAX_DATA_DIR': data_dir, 'XLA_FLAGS': cli_env()['XLA_FLAGS'],
           'JAX_PLATFORMS': 'cpu', 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_the_notebooks_exist():
    assert {'moe_layer_walkthrough.ipynb', 'train_and_inspect.ipynb',
            'classic_mixture_1d.ipynb', 'classic_mixture_em.ipynb'} <= set(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_executes_without_errors(name, kernel_env):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, startup_timeout=120,
                                     resources={'metadata': {'path': NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    images = [o for o in outputs if 'image/png' in o.get('data', {})]
    assert images, f'{name} should draw its plots'
