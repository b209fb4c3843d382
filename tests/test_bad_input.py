"""Bad input through the command line: exit 2 and one stderr line naming what is wrong, never a
traceback (issue 12, findings 5 and 6); and the data and capacity fixes that came with them."""
import hashlib
import json
import os
import time

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import validate
from moejax.data import corpus, sources, stdlib_corpus
from moejax.errors import ConfigError
from moejax.moe.block import MoEBlock
from moejax.run import metrics
from tests.helpers import run_cli, tiny_config

TINY = '--config=configs/default.py:tiny'


def assert_usage_error(proc, *shown, seconds=None):
    """Exit 2, exactly one stderr line `moejax: error: ...` holding each of `shown`."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, f'exit {proc.returncode}\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith('moejax: error: '), lines
    for text in shown:
        assert text in lines[0], (text, lines[0])
    if seconds is not None:
        assert seconds < 30, f'took {seconds:.0f}s'


def timed(script, *args):
    start = time.time()
    proc = run_cli(script, *args, timeout=120)
    return proc, time.time() - start


def fake_run(path, config_text: str | None = None):
    """A workdir shaped like a run (config.json, checkpoints/, metrics.jsonl), nothing trained:
    the errors below must come before anything is restored."""
    os.makedirs(path / 'checkpoints')
    if config_text is not None:
        (path / 'config.json').write_text(config_text)
    write_metrics(path / 'metrics.jsonl', load_records(3))
    return path


def load_records(num: int) -> list[dict]:
    rng = np.random.default_rng(num)
    return [{'step': 10 * (i + 1), 'loss': 3.0 - i,
             'expert_load': rng.dirichlet(np.ones(4), size=2).tolist()} for i in range(num)]


def write_metrics(path, records, tail: str = '') -> None:
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
        f.write(tail)


# ------------------------------------------------------------------ finding 5: tracebacks


@pytest.mark.parametrize('text', ['{"model": {"d_model": 3', '', '[1, 2]', '\xff\xfe garbage'])
@pytest.mark.parametrize('script,args', [('eval', ()), ('generate', ('--prompt=x',)),
                                         ('analyze', ('--text=x',))])
def test_corrupt_config_json_is_one_line(tmp_path, script, args, text):
    workdir = fake_run(tmp_path / 'run', text)
    proc, seconds = timed(script, f'--workdir={workdir}', *args)
    assert_usage_error(proc, '--workdir', 'config.json', seconds=seconds)


def test_metrics_reader_skips_a_partial_last_line(tmp_path, capsys):
    records = load_records(4)
    path = tmp_path / 'metrics.jsonl'
    write_metrics(path, records, tail='{"step": 50, "loss": 1.5, "expert_lo')  # as kill -9 leaves
    assert metrics.read_jsonl(str(path)) == records
    assert capsys.readouterr().err == ''  # expected after a kill: no warning
    # A damaged line inside the file is skipped too, with one warning naming it.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(''.join(lines[:2] + ['{"step": 2\n'] + lines[2:]))
    assert metrics.read_jsonl(str(path)) == records
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and 'skipped 1 unreadable line' in err[0] and 'line 3' in err[0]


def test_analyze_tolerates_a_partial_last_line(tmp_path):
    workdir = fake_run(tmp_path / 'run')
    records = load_records(5)
    write_metrics(workdir / 'metrics.jsonl', records, tail='{"step": 60, "loss": 0.')
    proc = run_cli('analyze', f'--workdir={workdir}', timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])['expert_load']
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    from moejax.readers import analysis  # what was plotted: exactly the complete records
    steps_N, load_NLE = analysis.expert_load_history(str(workdir / 'metrics.jsonl'))
    np.testing.assert_array_equal(steps_N, [r['step'] for r in records])
    np.testing.assert_allclose(load_NLE, [r['expert_load'] for r in records])


@pytest.mark.parametrize('flag,shown', [
    ('--top_k=-3', ['--top_k=-3', '>= 0']),
    ('--temperature=-1', ['--temperature=-1', 'finite number >= 0']),
    ('--temperature=nan', ['--temperature=nan', 'finite number >= 0']),
    ('--temperature=inf', ['--temperature=inf', 'finite number >= 0']),
    ('--max_new_tokens=-1', ['--max_new_tokens=-1', '>= 1']),
    ('--num_samples=0', ['--num_samples=0', '>= 1']),
])
def test_bad_generate_flags_are_one_line(tmp_path, flag, shown):
    """Checked before a checkpoint is read (so this workdir needs none), within seconds."""
    proc, seconds = timed('generate', f'--workdir={tmp_path}', '--prompt=x', flag)
    assert_usage_error(proc, *shown, seconds=seconds)


def test_odd_head_size_is_refused_by_validation(tmp_path):
    proc, seconds = timed('train', TINY, f'--workdir={tmp_path / "run"}',
                          f'--config.data.data_dir={tmp_path / "data"}',
                          '--config.model.d_model=6', '--config.model.num_heads=2')
    assert_usage_error(proc, 'model.d_model=6', 'd_model/num_heads=3', 'even', seconds=seconds)
    assert not os.path.exists(tmp_path / 'data'), 'nothing may be prepared for a bad config'


def test_analyze_on_a_read_only_workdir(tmp_path):
    """One line naming the directory and the way out (--out_dir), before any work is done."""
    workdir = fake_run(tmp_path / 'run')
    if os.geteuid() == 0:  # permission bits do not bind root: block the plots path instead
        (workdir / 'plots').write_text('')
    else:
        os.chmod(workdir, 0o555)
    try:
        proc, seconds = timed('analyze', f'--workdir={workdir}')
        assert_usage_error(proc, '--workdir', 'plots', 'cannot be written', '--out_dir',
                           seconds=seconds)
        elsewhere = tmp_path / 'elsewhere'
        proc = run_cli('analyze', f'--workdir={workdir}', f'--out_dir={elsewhere}', timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert os.path.isfile(elsewhere / 'expert_load.png')
    finally:
        os.chmod(workdir, 0o755)


# ------------------------------------------------------------------ finding 6: smaller ones


@pytest.mark.parametrize('flag,shown', [('--bogus=1', "'bogus'"),
                                        ('--step=abc', '--step=abc'),
                                        ('--config.model.d_model=3', '--config=FILE')])
def test_eval_without_config_names_the_bad_flag(tmp_path, flag, shown):
    workdir = fake_run(tmp_path / 'run', '{}')
    proc, seconds = timed('eval', f'--workdir={workdir}', flag)
    assert_usage_error(proc, shown, seconds=seconds)
    assert 'is required' not in proc.stderr


@pytest.mark.parametrize('flags,shown', [
    (('--simulated_devices=0',), '--simulated_devices=0'),  # was: silently the real devices
    (('--num_processes=2', '--process_id=5', '--coordinator=localhost:1'), '--process_id=5'),
    (('--num_processes=0',), '--num_processes=0'),
])
def test_bad_device_and_process_flags(tmp_path, flags, shown):
    proc, seconds = timed('train', TINY, f'--workdir={tmp_path / "run"}', *flags)
    assert_usage_error(proc, shown, seconds=seconds)
    assert not os.path.exists(tmp_path / 'run')


def test_stray_positional_argument_is_refused(tmp_path):
    proc, seconds = timed('eval', f'--workdir={tmp_path}', 'validation')
    assert_usage_error(proc, "['validation']", seconds=seconds)


def test_capacity_factor_zero_drops_nothing():
    """capacity_factor <= 0 means capacity = the group size: the block then equals the
    dropless engine (an independent path without capacity), and reports no drops, while a
    small factor on the same tokens does drop."""
    x_BTD = jax.random.normal(jax.random.key(1), (2, 16, 32))
    seg_BT = np.ones((2, 16), np.int32)
    outputs = {}
    for name, (dispatch_name, cf) in {'zero': ('einsum', 0.0), 'negative': ('sort', -1.0),
                                      'dropless': ('dropless', 1.0),
                                      'small': ('einsum', 0.25)}.items():
        cfg = tiny_config(d_model=32, d_ff=64, num_experts=4, top_k=2, dispatch=dispatch_name,
                          capacity_factor=cf, eval_capacity_factor=cf)
        block = MoEBlock(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
        outputs[name] = [block(x_BTD, seg_BT, train=t) for t in (True, False)]
    for name in ('zero', 'negative'):
        for (y, stats), (y_ref, _) in zip(outputs[name], outputs['dropless']):
            assert float(stats['dropped_fraction']) == 0.0
            np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert float(outputs['small'][0][1]['dropped_fraction']) > 0.1


@pytest.mark.parametrize('key', ['moe.capacity_factor', 'moe.eval_capacity_factor'])
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), 'auto', None])
def test_capacity_factor_must_still_be_a_finite_number(key, bad):
    import ml_collections

    values = tiny_config().to_dict()
    group, name = key.split('.')
    values[group][name] = bad
    with pytest.raises(ConfigError, match=key):
        validate.check(ml_collections.ConfigDict(values), num_devices=8)


# --------------------------------------------------------------------------- text corpora


def small_corpus(directory, num: int) -> list[str]:
    """num one-line documents that all hash into train as files and as lines (the case that
    was refused)."""
    os.makedirs(directory, exist_ok=True)
    names = [n for n in (f'doc{i}.txt' for i in range(10 * num))
             if not corpus.is_validation(n) and not corpus.is_validation(f'{n}:0')][:num]
    for i, name in enumerate(names):
        (directory / name).write_text(f'document number {i} says hello\n')
    return names


def corpus_cfg(tmp_path, glob, text_format='files'):
    import ml_collections
    return ml_collections.ConfigDict(dict(data=dict(
        name='text_files', text_glob=glob, text_format=text_format,
        data_dir=str(tmp_path / 'tfds'))))


@pytest.mark.parametrize('num', [17, 41])
@pytest.mark.parametrize('text_format', ['files', 'lines'])
def test_small_corpus_gets_a_validation_document(tmp_path, num, text_format):
    names = small_corpus(tmp_path / 'corpus', num)
    cfg = corpus_cfg(tmp_path, str(tmp_path / 'corpus/*.txt'), text_format)
    splits = {s: sources.open_split(cfg, s) for s in corpus.TEXT_SPLITS}
    got = {s: docs.get(range(len(docs))) for s, docs in splits.items()}
    assert len(got['validation']) == 1 and len(got['train']) == num - 1
    every = [f'document number {i} says hello' for i in range(num)]  # as small_corpus wrote
    assert sorted(t.strip() for t in got['train'] + got['validation']) == sorted(every)
    # The moved document is the one of smallest sha256 (of its path, or 'path:line').
    keys = names if text_format == 'files' else [f'{n}:0' for n in names]
    smallest = min(range(num), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
    assert got['validation'][0].strip() == every[smallest]
    again = sources.open_split(cfg, 'validation')  # stable: the same document every time
    assert again.get([0]) == got['validation'] and again.key == splits['validation'].key


def test_large_corpus_split_is_the_plain_hash():
    """python_stdlib (prepared, cached) keeps its split: the fallback never applies to it."""
    relative = [r for r, _ in stdlib_corpus.stdlib_sources()]
    assert corpus.validation_flags(relative) == [corpus.is_validation(r) for r in relative]


def test_binary_files_skipped_and_undecodable_counted(tmp_path, capsys):
    directory = tmp_path / 'corpus'
    small_corpus(directory, 30)
    (directory / 'blob.txt').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' * 10)
    (directory / 'latin1.txt').write_bytes('café crème brûlée\n'.encode('latin-1'))
    cfg = corpus_cfg(tmp_path, str(directory / '*.txt'))
    texts = []
    for split in corpus.TEXT_SPLITS:
        docs = sources.open_split(cfg, split)
        texts += docs.get(range(len(docs)))
    assert len(texts) == 31 and not any('IHDR' in t for t in texts)
    assert 'caf\ufffd cr\ufffdme br\ufffdl\ufffde\n' in texts  # read, with replacements
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('moejax: warning: ')
    assert 'skipped 1 binary file' in err[0] and '1 file(s) are not valid UTF-8' in err[0]


# ----------------------------------------------------------- end to end, one trained tiny run


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run trained with capacity factors 0 (no drops), for the checks that need one."""
    root = tmp_path_factory.mktemp('trained')
    workdir = root / 'run'
    proc = run_cli('train', TINY, f'--workdir={workdir}', f'--config.data.data_dir={root / "d"}',
                   '--config.train.num_steps=4', '--config.train.log_every=1',
                   '--config.train.eval_every=0', '--config.moe.capacity_factor=0',
                   '--config.moe.eval_capacity_factor=0')
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_capacity_factor_zero_trains_without_drops(trained):
    records = [r for r in metrics.read_jsonl(str(trained / 'metrics.jsonl')) if 'loss' in r]
    assert len(records) == 4
    assert all(r['dropped_fraction'] == 0.0 for r in records)


@pytest.mark.slow
def test_prompt_longer_than_max_len_names_the_prompt(trained):
    max_len = json.loads((trained / 'config.json').read_text())['model']['max_len']
    proc = run_cli('generate', f'--workdir={trained}', '--prompt=' + 'a' * (2 * max_len),
                   timeout=120)
    bos_and_bytes = 2 * max_len + 1  # the tiny run's byte tokenizer: one token per byte
    assert_usage_error(proc, '--prompt', f'{bos_and_bytes} tokens', f'model.max_len={max_len}')
    assert '--max_new_tokens' not in proc.stderr
    fits = run_cli('generate', f'--workdir={trained}', '--prompt=ab', '--max_new_tokens=64',
                   timeout=120)
    assert_usage_error(fits, '--max_new_tokens=64', f'use at most {max_len - 3}')


@pytest.mark.slow
@pytest.mark.parametrize('args,shown', [
    (('--split=nonexistent',), ["split='nonexistent'", 'train, validation']),
    (('--step=99',), ['--step=99', 'saved steps: [4]']),
])
def test_eval_bad_split_or_step(trained, args, shown):
    proc = run_cli('eval', f'--workdir={trained}', *args, timeout=120)
    assert_usage_error(proc, *shown)


@pytest.mark.slow
def test_generate_missing_step(trained):
    proc = run_cli('generate', f'--workdir={trained}', '--prompt=x', '--max_new_tokens=4',
                   '--step=7', timeout=120)
    assert_usage_error(proc, '--step=7', 'saved steps: [4]')


@pytest.mark.slow
def test_small_text_corpus_with_binary_files_trains(tmp_path):
    """17 files that all hash into train, a binary file and a Latin-1 one: the run trains, and
    says once what it skipped and what it decoded with replacements."""
    directory = tmp_path / 'corpus'
    small_corpus(directory, 17)
    (directory / 'blob.txt').write_bytes(bytes(range(256)) * 4)
    (directory / 'latin1.txt').write_bytes('naïve café\n'.encode('latin-1'))
    proc = run_cli('train', TINY, f'--workdir={tmp_path / "run"}',
                   f'--config.data.data_dir={tmp_path / "data"}', '--config.data.name=text_files',
                   f'--config.data.text_glob={directory}/*.txt', '--config.data.seq_len=16',
                   '--config.train.num_steps=2', '--config.train.eval_every=2', timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith('moejax: warning')]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert 'skipped 1 binary' in warnings[0] and '1 file(s) are not valid UTF-8' in warnings[0]
    assert 'eval at step 2' in proc.stdout
