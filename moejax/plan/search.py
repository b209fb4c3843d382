"""Layout planner: which mesh, remat policy and micro-batch fit a device, and which is fastest.

For each candidate (mesh layout over data/fsdp/expert/tensor, model.remat, opt.grad_accum) the
train step is built with the dry run's own code (moejax.plan.dry_run): compiled for the target's
devices (a TPU slice through libtpu, GPUs through the CUDA plugin) or, without a target, for N
CPU-simulated devices, so the bytes per device here are the dry run's. The step time is an
ESTIMATE (moejax.plan.estimate) against the target chip's peak numbers. A target this host
cannot compile for is lowered only: kernels are named, but nothing is measured.

    python launch/plan.py --config=configs/mixtral_8x7b.py --target=tpu-v5p --devices=64
"""
import math
import re
import time

from moejax import config as config_lib
from moejax import target, validate
from moejax.errors import ConfigError
from moejax.plan import REMATS_BY_MEMORY, estimate, targets

UNITS = {'': 1, 'B': 1, 'KB': 1e3, 'MB': 1e6, 'GB': 1e9, 'TB': 1e12, 'KIB': 2**10,
         'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9 bytes (GB = 1e9, GiB = 2**30)."""
    match = re.fullmatch(r'\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*', str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise ConfigError('--device_memory', text, 'must be a size like 80GB, 80GiB or 8e10')
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


# --- Candidates -------------------------------------------------------------------------------

def mesh_candidates(cfg, devices: int) -> list[dict]:
    """A small set of layouts: experts over the largest axis that divides them (or none),
    tensor parallelism over 8 (or none), the rest fully sharded (fsdp), data parallel, or
    data x fsdp 8; the config's own layout first. Invalid ones are dropped by validate."""
    experts = cfg.moe.num_experts if cfg.model.moe_every else 1
    expert_sizes = {1, math.gcd(experts, devices)}
    tensor_sizes = {1} | ({8} if devices % 8 == 0 and devices >= 8 else set())
    layouts = []
    try:
        layouts.append(config_lib.mesh_shape(cfg.mesh, devices))
    except ConfigError:
        pass
    for expert in sorted(expert_sizes, reverse=True):
        for tensor in sorted(tensor_sizes):
            rest, left = divmod(devices, expert * tensor)
            if left:
                continue
            splits = [(1, rest), (rest, 1)]
            splits += [(rest // 8, 8)] if rest > 8 and rest % 8 == 0 else []
            layouts += [dict(data=d, fsdp=f, expert=expert, tensor=tensor) for d, f in splits]
    unique = []
    for layout in layouts:
        if layout not in unique and accum_choices(cfg, layout, devices):
            unique.append(layout)
    return unique


def _valid(cfg, layout: dict, devices: int, grad_accum: int) -> bool:
    try:
        validate.check(variant(cfg, layout, cfg.model.remat, grad_accum), devices)
        return True
    except ConfigError:
        return False


def variant(cfg, layout: dict, remat: str, grad_accum: int):
    """cfg with this mesh, remat policy and number of micro-batches."""
    out = cfg.copy_and_resolve_references()
    out.mesh.update(**layout)
    out.model.remat = remat
    out.opt.grad_accum = grad_accum
    return out


def accum_choices(cfg, layout: dict, devices: int) -> list[int]:
    """The opt.grad_accum values validate accepts for this layout, ascending."""
    return [g for g in range(1, cfg.data.batch_size + 1)
            if cfg.data.batch_size % g == 0 and _valid(cfg, layout, devices, g)]


# --- Evaluating one candidate -------------------------------------------------------------------

def evaluate(cfg, layout: dict, remat: str, grad_accum: int, memory_limit: int, at=None,
             chip: target.Chip | None = None) -> dict:
    """Build one candidate with the dry run's code where `at` says (a dry_run.Where; default
    the devices present); its bytes per device, fit and estimate (for `chip`, default an H100).
    Never raises for a layout that is invalid, too big or fails to compile: it says so."""
    from moejax.plan import dry_run  # imports the training stack: only once planning starts
    at, chip = at or dry_run.where(), chip or target.CHIPS['gpu-h100']
    c = variant(cfg, layout, remat, grad_accum)
    micro = cfg.data.batch_size // grad_accum
    row = {'mesh': dict(layout), 'remat': remat, 'grad_accum': grad_accum, 'micro_batch': micro,
           'rows_per_device': micro // (layout['data'] * layout['fsdp'] * layout['expert']),
           'fits': False, 'bytes_per_device': None, 'estimate': None}
    try:
        setup = dry_run.make_setup(c, at)
    except ConfigError as err:
        return dict(row, status=f'invalid: {err}')
    state = dry_run.state_bytes(setup)
    if sum(state.values()) > memory_limit:
        row['bytes_per_device'] = _bytes(dict(state, temp_bytes_per_device=None,
                                              total_bytes_per_device=None))
        return dict(row, status='params + optimizer state alone exceed the memory')
    try:
        built = dry_run.build_step(setup, at)
    except Exception as err:  # noqa: BLE001 - a layout XLA cannot compile is a result, not a crash
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return dict(row, status=f'compile failed: {type(err).__name__}: {first[:200]}')
    figures = dry_run.memory(setup, built.compiled)
    if built.compiled is None:
        return dict(row, bytes_per_device=_bytes(figures), status='lowered only: no memory '
                    'figures (' + ', '.join(targets.kernels_in(built.text)) + ')')
    fits = figures['total_bytes_per_device'] <= memory_limit
    kernels = targets.kernels_in(built.text)
    return dict(row, fits=fits, bytes_per_device=_bytes(figures), kernels=kernels,
                status=('fits' if fits else 'exceeds the memory') + ''.join(
                    f'; {k}' for k in kernels), estimate=estimate.estimate(built.compiled, chip))


def _bytes(figures: dict) -> dict:
    return {'params': figures['params_bytes_per_device'],
            'opt': figures['opt_state_bytes_per_device'],
            'temp': figures['temp_bytes_per_device'], 'total': figures['total_bytes_per_device']}


# --- The search ---------------------------------------------------------------------------------

def search_layout(cfg, layout, devices, memory_limit, *, remats, at, chip, accums=None,
                  progress=None) -> list[dict]:
    """Candidates for one mesh: the smallest micro-batch count at which the least-memory remat
    fits, then lighter remats from there; a count predicted from temp ~ 1/grad_accum is tried
    next instead of every value. Stops early where more memory would not fit either."""
    choices = [g for g in accum_choices(cfg, layout, devices) if accums is None or g in accums]
    ordered = [r for r in REMATS_BY_MEMORY if r in remats]
    rows, start = [], 0
    for remat in ordered:
        found = None
        index = start
        while index < len(choices):
            row = evaluate_with_progress(cfg, layout, remat, choices[index], memory_limit, at,
                                         chip, progress)
            rows.append(row)
            if row['fits']:
                found = index
                break
            if not row['bytes_per_device'] or row['bytes_per_device']['temp'] is None:
                break  # invalid, failed, too big, or not compiled: no micro-batch tells more
            index = _next_accum(choices, index, row, memory_limit)
        if found is None:
            break  # lighter remats need more memory still
        start = found
    return rows


def _next_accum(choices, index, row, memory_limit) -> int:
    """The index of the smallest grad_accum predicted to fit, if temporaries scale as 1/accum."""
    b = row['bytes_per_device']
    room = memory_limit - b['params'] - b['opt']
    if room <= 0:
        return len(choices)
    needed = choices[index] * b['temp'] / room
    for i in range(index + 1, len(choices)):
        if choices[i] >= needed:
            return i
    return len(choices) - 1 if index < len(choices) - 1 else len(choices)


def evaluate_with_progress(cfg, layout, remat, grad_accum, memory_limit, at, chip, progress):
    if progress:
        progress(f'compiling {layout_name(layout)} remat={remat} grad_accum={grad_accum}')
    start = time.time()
    row = evaluate(cfg, layout, remat, grad_accum, memory_limit, at, chip)
    row['compile_seconds'] = round(time.time() - start, 1)
    if progress:
        total = row['bytes_per_device'] and row['bytes_per_device']['total']
        progress(f'  -> {row["status"]}' + (f', {total / 1e9:.1f} GB/device' if total else '')
                 + f' ({row["compile_seconds"]}s)')
    return row


def plan_layouts(cfg, devices, memory_limit, *, remats=REMATS_BY_MEMORY, layouts=None,
                 accums=None, target_name: str | None = None, progress=None) -> list[dict]:
    """Every candidate tried, ranked: fitting first, then by estimated step time, then fewer
    micro-batches. target_name: build for that accelerator (else the devices present), and
    estimate for it (else for an H100)."""
    from moejax.plan import dry_run  # imports the training stack: only once planning starts
    at = dry_run.where(target_name, devices)
    chip = target.CHIPS[target_name or 'gpu-h100']
    layouts = layouts or mesh_candidates(cfg, devices)
    if progress:
        progress(f'{target_name or "simulated devices"}: {at.how}')
    rows, start = [], time.time()
    for i, layout in enumerate(layouts):
        if progress:
            progress(f'layout {i + 1}/{len(layouts)}: {layout_name(layout)}'
                     + _time_left(start, i, len(layouts)))
        found = search_layout(cfg, layout, devices, memory_limit, remats=remats, at=at,
                              chip=chip, accums=accums, progress=progress)
        rows += found or [dict(mesh=dict(layout), remat=None, grad_accum=None, micro_batch=None,
                               rows_per_device=None, fits=False, bytes_per_device=None,
                               estimate=None, status=_why_none(cfg, layout, devices))]
    return sorted(rows, key=_rank)


def _time_left(start: float, done: int, total: int) -> str:
    """', about Nm left' from the mean time of the layouts planned so far."""
    if not done:
        return ''
    left = (time.time() - start) / done * (total - done)
    return f' (about {left / 60:.0f} min left)' if left >= 60 else f' (about {left:.0f} s left)'


def _why_none(cfg, layout: dict, devices: int) -> str:
    """Why no micro-batch count gives this layout a valid config: validate's own words."""
    try:
        validate.check(variant(cfg, layout, cfg.model.remat, 1), devices)
    except ConfigError as err:
        return f'invalid for every grad_accum: {err}'
    return 'invalid for every grad_accum tried'


def _rank(row):
    seconds = row['estimate']['step_seconds'] if row['estimate'] else math.inf
    total = (row['bytes_per_device'] or {}).get('total') or math.inf
    return (not row['fits'], seconds if row['fits'] else total, row['grad_accum'] or 0)


def layout_name(layout: dict) -> str:
    return ' '.join(f'{axis}={size}' for axis, size in layout.items())


def table(rows: list[dict], memory_limit: int, chip: str) -> str:  # chip: its name
    """The ranked candidates as a fixed-width table."""
    gb = lambda x: '-' if x is None else f'{x / 1e9:.1f}'
    lines = [f'Candidates, best first (device memory {memory_limit / 1e9:.1f} GB; step time is an '
             f'ESTIMATE for {chip} from the compiled HLO, not a measurement):',
             f'{"#":>3} {"data":>4} {"fsdp":>4} {"exp":>4} {"tp":>3} {"remat":>7} {"accum":>5} '
             f'{"params":>7} {"opt":>7} {"temp":>7} {"total":>7} {"fits":>4} {"est s":>8}  status']
    for i, r in enumerate(rows, 1):
        m, b = r['mesh'], r['bytes_per_device'] or {}
        est = f'{r["estimate"]["step_seconds"]:.3g}' if r['estimate'] else '-'
        lines.append(f'{i:>3} {m["data"]:>4} {m["fsdp"]:>4} {m["expert"]:>4} {m["tensor"]:>3} '
                     f'{r["remat"] or "-":>7} {r["grad_accum"] or "-":>5} {gb(b.get("params")):>7} '
                     f'{gb(b.get("opt")):>7} {gb(b.get("temp")):>7} {gb(b.get("total")):>7} '
                     f'{"yes" if r["fits"] else "no":>4} {est:>8}  {r["status"]}')
    return '\n'.join(lines)


# --- Command line -------------------------------------------------------------------------------

def parse_layouts(text: str | None) -> list[dict] | None:
    """'data=1,fsdp=8,expert=8,tensor=1;...' -> layouts (axes left out are 1)."""
    if not text:
        return None
    layouts = []
    for part in text.split(';'):
        layout = dict(data=1, fsdp=1, expert=1, tensor=1)
        for item in filter(None, part.split(',')):
            axis, _, size = item.partition('=')
            if axis.strip() not in layout or not size.strip().isdigit():
                raise ConfigError('--meshes', text, 'must look like data=1,fsdp=8,expert=8,'
                                  'tensor=1;... (axes data, fsdp, expert, tensor)')
            layout[axis.strip()] = int(size)
        layouts.append(layout)
    return layouts
