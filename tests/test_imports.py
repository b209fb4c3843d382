"""The house's shape: no import cycle, no module imports from a layer above its own, and no
module or function past the size limits.

Read from the source with `ast` (function-level imports included: a cycle hidden inside a
function is still a cycle), so the test needs no import to succeed.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'moejax'

# Lowest first. A module may import modules of its own layer or below (DESIGN.md section 1).
LAYERS = (
    ('moejax', 'moejax.errors', 'moejax.config', 'moejax.sharding', 'moejax.target',
     'moejax.xla_flags', 'moejax.optim', 'moejax.mesh'),
    ('moejax.moe',),
    ('moejax.model',),
    ('moejax.data',),
    ('moejax.validate',),
    ('moejax.run',),
    ('moejax.readers',),
    ('moejax.plan',),
    ('moejax.hf',),
    ('moejax.cli', 'moejax.startup', 'moejax.usage'),
)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in ROOT.rglob('*.py')}


def imports_of(name: str) -> set[str]:
    """The moejax modules a module imports (a name imported from a package is its module when
    it is one, else the package)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith('moejax')}
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('moejax'):
            for alias in node.names:
                full = f'{node.module}.{alias.name}'
                found.add(full if full in MODULES else node.module)
    return found - {name}


def layer(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if name in prefixes or any(name.startswith(p + '.') for p in prefixes if p != 'moejax'):
            return rank
    raise AssertionError(f'{name} is in no layer: add it to LAYERS and DESIGN.md')


GRAPH = {name: imports_of(name) for name in MODULES}


@pytest.mark.parametrize('name', sorted(MODULES))
def test_no_upward_import(name):
    upward = sorted(dep for dep in GRAPH[name] if layer(dep) > layer(name))
    assert not upward, f'{name} (layer {layer(name)}) imports from above: {upward}'


def test_no_import_cycle():
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(GRAPH[name]):
            visit(dep)
        path.pop()
        done.add(name)
    for name in sorted(GRAPH):
        visit(name)


def test_the_check_sees_a_cycle_and_an_upward_import():
    """The checks above are not vacuous: the graph has edges, and a made-up edge from the MoE
    core up to the run, and back, is caught by both."""
    assert sum(map(len, GRAPH.values())) > 50
    assert layer('moejax.moe.routing') < layer('moejax.run.loop')
    saved = dict(GRAPH)
    try:
        GRAPH['moejax.errors'] = GRAPH['moejax.errors'] | {'moejax.run.loop'}
        with pytest.raises(AssertionError, match='import cycle'):
            test_no_import_cycle()
        with pytest.raises(AssertionError, match='imports from above'):
            test_no_upward_import('moejax.errors')
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 50  # the house's size limits (docs/design.md)


def too_long(path: pathlib.Path) -> list[str]:
    """A module past MAX_MODULE_LINES, and each function in it past MAX_FUNCTION_LINES."""
    source = path.read_text()
    lines = source.count('\n')
    found = [f'{path.name}: {lines} lines'] if lines > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f'{path.name}: {node.name} has {length} lines')
    return found


def test_modules_and_functions_stay_small():
    assert [problem for path in MODULES.values() for problem in too_long(path)] == []


def test_the_size_check_sees_a_long_module_and_function(tmp_path):
    body = '\n'.join(f'    x{i} = {i}' for i in range(MAX_FUNCTION_LINES))
    long = tmp_path / 'long.py'
    long.write_text(f'def f():\n{body}\n' + '\n' * MAX_MODULE_LINES)
    assert too_long(long) == [f'long.py: {MAX_MODULE_LINES + MAX_FUNCTION_LINES + 1} lines',
                              f'long.py: f has {MAX_FUNCTION_LINES + 1} lines']
