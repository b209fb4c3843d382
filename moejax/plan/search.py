"""Layout planner: which mesh, remat policy and micro-batch fit a device, and which is fastest.

For each candidate (mesh layout over data/fsdp/expert/tensor, model.remat, opt.grad_accum) the
train step is compiled ahead of time on N CPU-simulated devices with the dry run's own code
(moejax.plan.dry_run), so the bytes per device here are the dry run's. The step time is an
ESTIMATE from the compiled program: matmul FLOPs, bytes accessed and collective bytes counted
from its HLO (loop bodies times their trip counts) against a chip's peak numbers, assuming no
overlap of communication with compute. It ranks layouts; it does not predict MFU.

    python launch/plan.py --config=configs/mixtral_8x7b.py --devices=64 --device_memory=80GB
"""
import math
import re
import time

from moejax import config as config_lib
from moejax.errors import ConfigError

# Peak numbers per chip: dense bf16 FLOP/s, HBM bytes/s, interconnect bytes/s per chip.
CHIPS = {
    'h100': {'flops': 989e12, 'hbm': 3.35e12, 'link': 450e9},    # SXM, NVLink 4
    'h200': {'flops': 989e12, 'hbm': 4.8e12, 'link': 450e9},
    'a100': {'flops': 312e12, 'hbm': 2.04e12, 'link': 300e9},    # SXM 80 GB, NVLink 3
    'tpu_v5p': {'flops': 459e12, 'hbm': 2.76e12, 'link': 600e9},
    'tpu_v5e': {'flops': 197e12, 'hbm': 0.82e12, 'link': 200e9},
}
# Least memory first: the search finds a micro-batch for the first, then tries the others.
REMATS_BY_MEMORY = ('block', 'minimal', 'none')
UNITS = {'': 1, 'B': 1, 'KB': 1e3, 'MB': 1e6, 'GB': 1e9, 'TB': 1e12, 'KIB': 2**10,
         'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9 bytes (GB = 1e9, GiB = 2**30)."""
    match = re.fullmatch(r'\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*', str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise ConfigError('--device_memory', text, 'must be a size like 80GB, 80GiB or 8e10')
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


# --- What the compiled program does: HLO walked with loop trip counts --------------------------

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
               'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
               'c64': 8, 'c128': 16}
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'ragged-all-to-all')
ARRAY = re.compile(r'([a-z0-9]+)\[([0-9,]*)\]')


def _arrays(shape: str):
    """(dtype, dims) of each array in an HLO shape string (a tuple has several)."""
    return [(t, [int(d) for d in dims.split(',') if d]) for t, dims in ARRAY.findall(shape)]


def _nbytes(shape: str) -> int:
    return sum(DTYPE_BYTES.get(t, 4) * math.prod(dims) for t, dims in _arrays(shape))


def _parse_hlo(text: str):
    """{computation: [(name, shape, opcode, operands, attributes)]}, {instruction: shape}."""
    computations, shapes, current = {}, {}, None
    for line in text.splitlines():
        if line and not line.startswith(' ') and line.rstrip().endswith('{'):
            header = line.split()
            name = header[1] if header[0] == 'ENTRY' else header[0]
            current = computations.setdefault(name.lstrip('%'), [])
            continue
        body = line.strip().removeprefix('ROOT ')
        if current is None or ' = ' not in body or not body.startswith('%'):
            continue
        name, rhs = body.split(' = ', 1)
        depth, cut = 0, len(rhs)
        for i, ch in enumerate(rhs):  # the shape ends at the first space outside parentheses
            depth += (ch in '([{') - (ch in ')]}')
            if ch == ' ' and depth == 0:
                cut = i
                break
        shape, rest = rhs[:cut], rhs[cut + 1:]
        opcode, _, args = rest.partition('(')
        operands = re.findall(r'%([\w.\-]+)', args.split(')', 1)[0])
        shapes[name[1:]] = shape
        current.append((name[1:], shape, opcode, operands, args))
    return computations, shapes


def _dot_flops(shape, operands, attrs, shapes) -> float:
    lhs = _arrays(shapes.get(operands[0], ''))
    contracting = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', attrs)
    if not lhs or not contracting:
        return 0.0
    dims = lhs[0][1]
    k = math.prod(dims[int(i)] for i in contracting.group(1).split(',') if i)
    return 2.0 * k * sum(math.prod(d) for _, d in _arrays(shape))


def _callees(attrs: str) -> list[str]:
    """Computations an instruction runs (fusions, loop bodies, branches); not reducers."""
    names = re.findall(r'(?:calls|body|condition)=%([\w.\-]+)', attrs)
    for branches in re.findall(r'branch_computations=\{([^}]*)\}', attrs):
        names += re.findall(r'%([\w.\-]+)', branches)
    return names


def hlo_costs(text: str) -> dict:
    """Matmul FLOPs and collective bytes of one device's program, loops counted trip times
    (`_once`: every loop body counted once, as XLA's cost_analysis does)."""
    computations, shapes = _parse_hlo(text)
    memo = {}

    def cost(comp: str, with_trips: bool):
        key = (comp, with_trips)
        if key in memo:
            return memo[key]
        memo[key] = (0.0, 0.0)  # guards against (impossible) recursion
        flops = coll = 0.0
        for _, shape, opcode, operands, attrs in computations.get(comp, []):
            if opcode in ('dot', 'convolution'):
                flops += _dot_flops(shape, operands, attrs, shapes)
            elif opcode.removesuffix('-start') in COLLECTIVES:
                coll += _nbytes(shape)
            trips = 1
            if opcode == 'while' and with_trips:
                found = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
                trips = int(found.group(1)) if found else 1
            for callee in _callees(attrs):
                f, c = cost(callee, with_trips)
                flops, coll = flops + trips * f, coll + trips * c
        memo[key] = (flops, coll)
        return memo[key]
    entry = next((c for c in computations if c.startswith('main')), None) or list(computations)[-1]
    flops, coll = cost(entry, True)
    return {'dot_flops': flops, 'dot_flops_once': cost(entry, False)[0], 'collective_bytes': coll}


def estimate(compiled, chip: str) -> dict:
    """Estimated seconds per step on `chip`: max(compute, memory traffic) + collectives."""
    peak = CHIPS[chip]
    costs = hlo_costs(compiled.as_text())
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis or {}
    # cost_analysis counts each loop body once: scale its bytes like the matmul FLOPs scale.
    loops = costs['dot_flops'] / costs['dot_flops_once'] if costs['dot_flops_once'] else 1.0
    accessed = float(analysis.get('bytes accessed', 0.0)) * loops
    compute, traffic = costs['dot_flops'] / peak['flops'], accessed / peak['hbm']
    seconds = max(compute, traffic) + costs['collective_bytes'] / peak['link']
    return {'step_seconds': float(f'{seconds:.4g}'), 'flops_per_device': costs['dot_flops'],
            'bytes_accessed_per_device': accessed,
            'collective_bytes_per_device': costs['collective_bytes'], 'chip': chip,
            'basis': 'estimate: HLO matmul FLOPs, bytes accessed and collective bytes against '
                     'peak numbers, no overlap'}


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
        config_lib.validate(variant(cfg, layout, cfg.model.remat, grad_accum), devices)
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

def evaluate(cfg, layout: dict, remat: str, grad_accum: int, memory_limit: int,
             chip: str = 'h100') -> dict:
    """Compile one candidate with the dry run's code; its bytes per device, fit and estimate.
    Never raises for a layout that is invalid, too big or fails to compile: it says so."""
    from moejax.plan import dry_run  # imports the training stack: only once planning starts
    c = variant(cfg, layout, remat, grad_accum)
    micro = cfg.data.batch_size // grad_accum
    row = {'mesh': dict(layout), 'remat': remat, 'grad_accum': grad_accum, 'micro_batch': micro,
           'rows_per_device': micro // (layout['data'] * layout['fsdp'] * layout['expert']),
           'fits': False, 'bytes_per_device': None, 'estimate': None}
    try:
        setup = dry_run.make_setup(c)
    except ConfigError as err:
        return dict(row, status=f'invalid: {err}')
    state = dry_run.state_bytes(setup)
    if sum(state.values()) > memory_limit:
        row['bytes_per_device'] = _bytes(dict(state, temp_bytes_per_device=None,
                                              total_bytes_per_device=None))
        return dict(row, status='params + optimizer state alone exceed the memory')
    try:
        compiled = dry_run.compile_step(setup)
    except Exception as err:  # noqa: BLE001 - a layout XLA cannot compile is a result, not a crash
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return dict(row, status=f'compile failed: {type(err).__name__}: {first[:200]}')
    figures = dry_run.memory(setup, compiled)
    fits = figures['total_bytes_per_device'] is not None and (
        figures['total_bytes_per_device'] <= memory_limit)
    return dict(row, fits=fits, bytes_per_device=_bytes(figures),
                status='fits' if fits else 'exceeds the memory', estimate=estimate(compiled, chip))


def _bytes(figures: dict) -> dict:
    return {'params': figures['params_bytes_per_device'],
            'opt': figures['opt_state_bytes_per_device'],
            'temp': figures['temp_bytes_per_device'], 'total': figures['total_bytes_per_device']}


# --- The search ---------------------------------------------------------------------------------

def search_layout(cfg, layout, devices, memory_limit, *, remats, accums=None, chip='h100',
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
            row = evaluate_with_progress(cfg, layout, remat, choices[index], memory_limit, chip,
                                         progress)
            rows.append(row)
            if row['fits']:
                found = index
                break
            if not row['bytes_per_device'] or row['bytes_per_device']['temp'] is None:
                break  # invalid, failed, or the state alone is too big: no micro-batch helps
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


def evaluate_with_progress(cfg, layout, remat, grad_accum, memory_limit, chip, progress):
    if progress:
        progress(f'compiling {layout_name(layout)} remat={remat} grad_accum={grad_accum}')
    start = time.time()
    row = evaluate(cfg, layout, remat, grad_accum, memory_limit, chip)
    row['compile_seconds'] = round(time.time() - start, 1)
    if progress:
        total = row['bytes_per_device'] and row['bytes_per_device']['total']
        progress(f'  -> {row["status"]}' + (f', {total / 1e9:.1f} GB/device' if total else '')
                 + f' ({row["compile_seconds"]}s)')
    return row


def plan_layouts(cfg, devices, memory_limit, *, remats=REMATS_BY_MEMORY, layouts=None,
                 accums=None, chip='h100', progress=None) -> list[dict]:
    """Every candidate tried, ranked: fitting first, then by estimated step time, then fewer
    micro-batches."""
    layouts = layouts or mesh_candidates(cfg, devices)
    rows = []
    for i, layout in enumerate(layouts):
        if progress:
            progress(f'layout {i + 1}/{len(layouts)}: {layout_name(layout)}')
        found = search_layout(cfg, layout, devices, memory_limit, remats=remats, accums=accums,
                              chip=chip, progress=progress)
        rows += found or [dict(mesh=dict(layout), remat=None, grad_accum=None, micro_batch=None,
                               rows_per_device=None, fits=False, bytes_per_device=None,
                               estimate=None, status='invalid for every grad_accum tried')]
    return sorted(rows, key=_rank)


def _rank(row):
    seconds = row['estimate']['step_seconds'] if row['estimate'] else math.inf
    total = (row['bytes_per_device'] or {}).get('total') or math.inf
    return (not row['fits'], seconds if row['fits'] else total, row['grad_accum'] or 0)


def layout_name(layout: dict) -> str:
    return ' '.join(f'{axis}={size}' for axis, size in layout.items())


def table(rows: list[dict], memory_limit: int, chip: str) -> str:
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
