"""Metric writers and readers (moejax/run/metrics.py): logged float32 values are exact,
metrics.jsonl is cut back to a resumed checkpoint, and a reader skips lines a kill cut short or
that hold no integer step, with one warning."""
import json

import numpy as np

from moejax.run import metrics
from moejax.run import metrics as metrics_lib
from tests.helpers import load_records, write_records
from tests.runs import records


def test_metrics_log_is_cut_back_to_the_checkpoint(tmp_path):
    writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {'loss': np.float32(1 / 3) * step})
    with open(writer.path, 'a') as f:
        f.write('{"step": 4, "lo')  # a line cut short by SIGKILL
    writer.truncate_after(2)
    assert [r['step'] for r in records(str(tmp_path))] == [1, 2]
    writer.truncate_after(0)
    assert records(str(tmp_path)) == []


def test_logged_float32_values_are_exact():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 10.0 ** \
        np.arange(-20, 20, 0.04, dtype=np.float32)
    for value in values:
        logged = json.loads(json.dumps(metrics_lib.to_python(value)))
        assert np.float32(logged) == value


def test_metrics_reader_skips_a_partial_last_line(tmp_path, capsys):
    records = load_records(4)
    path = tmp_path / 'metrics.jsonl'
    write_records(path, records, tail='{"step": 50, "loss": 1.5, "expert_lo')  # as kill -9 leaves
    assert metrics.read_jsonl(str(path)) == records
    assert capsys.readouterr().err == ''  # expected after a kill: no warning
    # A damaged line inside the file is skipped too, with one warning naming it.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(''.join(lines[:2] + ['{"step": 2\n'] + lines[2:]))
    assert metrics.read_jsonl(str(path)) == records
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and 'skipped 1 unreadable line' in err[0] and 'line 3' in err[0]


def test_metrics_lines_without_an_integer_step_are_skipped_not_a_traceback(tmp_path, capsys):
    records = [{'step': 1, 'loss': 3.0}, {'step': 'abc', 'loss': 2.0}, {'step': 2, 'loss': 1.0},
               {'step': [3], 'loss': 0.5}]
    path = tmp_path / 'metrics.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert metrics.read_jsonl(str(path)) == [records[0], records[2]]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and 'skipped 2 unreadable line(s), the first is line 2' in err[0]
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.truncate_after(1)  # a resume from step 1
    assert path.read_text() == json.dumps(records[0]) + '\n'
