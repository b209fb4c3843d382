"""Metric writers: a console progress line, metrics.jsonl and TensorBoard; and MFU.

Only process 0 writes. metrics.jsonl holds one JSON object per logged step (and eval records
with eval_* keys); on resume it is cut back to the restored step so curves never repeat.
"""
import json
import os
import sys
import time

import jax
import numpy as np

from moejax import target


def peak_flops(device) -> float | None:
    """The device's dense bf16 FLOP/s from its spec sheet (moejax.target.CHIPS), for MFU; None
    where unknown (CPU: MFU is then not reported)."""
    chip = target.chip_of(getattr(device, 'device_kind', ''))
    return chip.peak_flops if chip else None


def to_python(value):
    """Arrays -> numbers/lists. Float32 (or narrower) scalars keep their shortest exact repr,
    so logged losses compare bit for bit; other floats are rounded to stay readable."""
    arr = np.asarray(value)
    if arr.ndim == 0 and arr.dtype.kind == 'f' and arr.dtype.itemsize <= 4:
        return float(str(arr.astype(np.float32)[()]))
    if arr.ndim == 0:
        return round(float(arr), 6) if arr.dtype.kind == 'f' else arr.item()
    return np.round(arr.astype(np.float64), 5).tolist()


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, 'metrics.jsonl')
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: slow to import
            self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def _lines(self) -> list[str]:
        if not (self.enabled and os.path.exists(self.path)):
            return []
        with open(self.path, encoding='utf-8', errors='replace') as f:
            return f.readlines()

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (they will be recomputed, identically, after a resume),
        and any line cut short by a killed process."""
        if self.enabled and os.path.exists(self.path):
            _write_atomically(self.path, [line for line in self._lines()
                                          if _record_step(line) <= step])

    def copy_after(self, step: int, path: str) -> int:
        """Copy the records past `step` to the file `path`: the steps of a run that diverged,
        which a resumed run cuts from metrics.jsonl and will not recompute alike; they show
        what went wrong. Returns how many were copied."""
        later = [line for line in self._lines() if _record_step(line) > step]
        if later:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_atomically(path, later)
        return len(later)

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {'step': int(step), **{k: to_python(v) for k, v in record.items()}}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.tb is not None:
            for key, value in record.items():
                if key != 'step' and np.ndim(value) == 0:
                    if np.isfinite(value):  # non-finite values: in metrics.jsonl only
                        self.tb.add_scalar(key, value, step)
                elif key == 'expert_load':
                    for layer, load in enumerate(value):
                        self.tb.add_histogram(f'expert_load/layer{layer}', np.asarray(load), step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics.jsonl, in order, tolerating a writer killed mid-line.

    A partial last line (what kill -9 leaves) is skipped without a word; any other line that is
    not a JSON object with an integer step (a damaged file) is skipped with one warning line
    naming the first.
    """
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.readlines()
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and _is_step(record.get('step')):
            records.append(record)
        elif number < len(lines) or line.endswith('\n'):  # not the partial last line
            bad.append(number)
    if bad:
        print(f'moejax: warning: {path}: skipped {len(bad)} unreadable line(s), the first is '
              f'line {bad[0]}', file=sys.stderr, flush=True)
    return records


def _write_atomically(path: str, lines: list[str]) -> None:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(lines)
    os.replace(path + '.tmp', path)


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a partial or unreadable one (no
    integer step)."""
    try:
        step = json.loads(line)['step'] if line.endswith('\n') else None
    except (ValueError, KeyError, TypeError):
        return float('inf')
    return step if _is_step(step) else float('inf')


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Throughput:
    """Tokens/s (and MFU where the chip's peak is known) over the steps since the last read.

    The first step (compilation) and pauses for evaluation or checkpointing are excluded.
    """

    def __init__(self, flops_per_token: float):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(jax.devices()[0])
        self.start, self.tokens, self.steps = None, 0.0, 0

    def step(self, tokens) -> None:
        if self.start is None:
            jax.block_until_ready(tokens)
            self.pause()
        else:
            self.tokens += float(tokens)
            self.steps += 1

    def pause(self) -> None:
        self.start, self.tokens, self.steps = time.time(), 0.0, 0

    def read(self) -> dict:
        elapsed = max(time.time() - (self.start or time.time()), 1e-9)
        rate = self.tokens / elapsed if self.steps else 0.0
        out = {'tokens_per_sec': rate}
        if self.peak:
            out['mfu'] = rate * self.flops_per_token / (self.peak * jax.device_count())
        self.pause()
        return out


class Progress:
    """One console line per logged step: loss, tokens/s, ETA and a routing summary."""

    def __init__(self, num_steps: int, enabled: bool = True):
        self.num_steps, self.enabled = num_steps, enabled
        self.start = time.time()

    def line(self, step: int, rec: dict, steps_done: int) -> str:
        elapsed = time.time() - self.start
        eta = elapsed / max(steps_done, 1) * (self.num_steps - step)
        text = (f'step {step:>6}/{self.num_steps} | loss {rec["loss"]:.4f} | '
                f'{rec["tokens_per_sec"]:,.0f} tok/s | ETA {_hms(eta)}')
        if 'expert_load' in rec:
            load = np.asarray(rec['expert_load'])
            text += (f' | drop {100 * rec["dropped_fraction"]:.1f}% | '
                     f'load max/mean {load.max(-1).mean() * load.shape[-1]:.2f}')
        return text

    def log(self, step, rec, steps_done):
        if self.enabled:
            print(self.line(step, rec, steps_done), flush=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s' if seconds >= 3600 \
        else f'{seconds // 60}m{seconds % 60:02d}s'
