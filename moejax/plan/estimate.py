"""The step time of a compiled program, ESTIMATED from its HLO against a chip's peak numbers.

Matmul FLOPs, bytes accessed and collective bytes are counted from the optimized HLO (loop
bodies times their trip counts), assuming no overlap of communication with compute. It ranks
layouts; it does not predict MFU.
"""
import math
import re

from moejax import target

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


def _conv_flops(shape, operands, attrs, shapes) -> float:
    """2 x output elements x what each sums over: the kernel's input features (per feature
    group) times its window, read from the kernel's dim_labels (o: output features)."""
    rhs = _arrays(shapes.get(operands[1], '')) if len(operands) > 1 else []
    labels = re.search(r'dim_labels=\w+_(\w+)->', attrs)
    if not rhs or not labels or len(labels.group(1)) != len(rhs[0][1]):
        return 0.0
    k = math.prod(d for label, d in zip(labels.group(1), rhs[0][1]) if label != 'o')
    return 2.0 * k * sum(math.prod(d) for _, d in _arrays(shape))


def _trip_count(attrs: str, computations) -> int:
    """A while loop's trips: XLA's known_trip_count where the compiler records it (CPU, GPU),
    else the bound N of a condition `counter < N` on a constant (the TPU compiler's loops from
    scans, whose counters start at 0); 1 when neither is there."""
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    if found:
        return int(found.group(1))
    condition = re.search(r'condition=%([\w.\-]+)', attrs)
    body = computations.get(condition.group(1), []) if condition else []
    constants = {name: re.match(r'(\d+)\)', args) for name, _, opcode, _, args in body
                 if opcode == 'constant'}
    for _, _, opcode, operands, args in body:
        if opcode == 'compare' and 'direction=LT' in args and len(operands) == 2:
            bound = constants.get(operands[1])
            if bound:
                return int(bound.group(1))
    return 1


def _gemm_flops(shape, operands, attrs, shapes) -> float:
    """A cuBLAS matmul custom call: its result is the first array of its tuple shape; the
    contracted dims are in its backend config's dot_dimension_numbers."""
    lhs = _arrays(shapes.get(operands[0], '')) if operands else []
    found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
    out = _arrays(shape)
    if not lhs or not found or not out:
        return 0.0
    dims = [int(d) for d in re.findall(r'\d+', found.group(1))]
    return 2.0 * math.prod(lhs[0][1][d] for d in dims) * math.prod(out[0][1])


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
            if opcode == 'dot':
                flops += _dot_flops(shape, operands, attrs, shapes)
            elif opcode == 'convolution':  # how the TPU compiler writes most matmuls
                flops += _conv_flops(shape, operands, attrs, shapes)
            elif opcode == 'custom-call' and '"gemm_backend_config"' in attrs:  # cuBLAS (GPU)
                flops += _gemm_flops(shape, operands, attrs, shapes)
            elif opcode.removesuffix('-start') in COLLECTIVES:
                coll += _nbytes(shape)
            trips = 1
            if opcode == 'while' and with_trips:
                trips = _trip_count(attrs, computations)
            for callee in _callees(attrs):
                f, c = cost(callee, with_trips)
                flops, coll = flops + trips * f, coll + trips * c
        memo[key] = (flops, coll)
        return memo[key]
    entry = next((c for c in computations if c.startswith('main')), None) or list(computations)[-1]
    flops, coll = cost(entry, True)
    return {'dot_flops': flops, 'dot_flops_once': cost(entry, False)[0], 'collective_bytes': coll}


def estimate(compiled, chip: target.Chip) -> dict | None:
    """Estimated seconds per step on `chip`: max(compute, memory traffic) + collectives (None
    for a program that was only lowered)."""
    if compiled is None:
        return None
    costs = hlo_costs(compiled.as_text())
    analysis = compiled.cost_analysis()  # None for GPU programs: traffic then counts as 0
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis or {}
    # cost_analysis counts each loop body once: scale its bytes like the matmul FLOPs scale.
    loops = costs['dot_flops'] / costs['dot_flops_once'] if costs['dot_flops_once'] else 1.0
    accessed = float(analysis.get('bytes accessed', 0.0)) * loops
    compute, traffic = costs['dot_flops'] / chip.peak_flops, accessed / chip.hbm_bytes_per_s
    seconds = max(compute, traffic) + costs['collective_bytes'] / chip.link_bytes_per_s
    return {'step_seconds': float(f'{seconds:.4g}'), 'flops_per_device': costs['dot_flops'],
            'bytes_accessed_per_device': accessed,
            'collective_bytes_per_device': costs['collective_bytes'], 'chip': chip.name,
            'basis': 'estimate: HLO matmul FLOPs, bytes accessed and collective bytes against '
                     'peak numbers, no overlap'}
