"""The package's shape: imports only point down the layers, no module imports itself through others, no private
name crosses a module boundary, no function is longer than a screen, and `alpaca --help` imports nothing heavy
(test_cli.py).

Layers, lowest first (a module may import its own layer or lower ones, never a higher one):
  0  errors, io, seal                            no alpaca imports but each other
  1  config, distributed, logs, console,         settings, processes, logging, terminal output, newer JAX,
     compat, interrupts                          Ctrl-C
  2  records, options, lease                     typed stage records; the commands' shared flag aliases; the
                                                 run directory's one-writer lease
  3  rundir, train_config                        the run directory; the Levanter-backed train config
  4  core.*                                      the work (no Typer, no printing)
  5  commands.*                                  flags in, core called, results printed
  6  main                                       the Typer app and the one error boundary
"""

from __future__ import annotations

import ast
import os

PACKAGE = "alpaca_cli"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

LAYERS = {
    "alpaca_cli": 0,
    "alpaca_cli.errors": 0,
    "alpaca_cli.io": 0,
    "alpaca_cli.seal": 0,
    "alpaca_cli.config": 1,
    "alpaca_cli.distributed": 1,
    "alpaca_cli.logs": 1,
    "alpaca_cli.console": 1,
    "alpaca_cli.compat": 1,
    "alpaca_cli.interrupts": 1,
    "alpaca_cli.records": 2,
    "alpaca_cli.lease": 2,
    "alpaca_cli.options": 2,
    "alpaca_cli.rundir": 3,
    "alpaca_cli.train_config": 3,
    "alpaca_cli.main": 6,
}


def layer(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    if module == "alpaca_cli.core" or module.startswith("alpaca_cli.core."):
        return 4
    if module == "alpaca_cli.commands" or module.startswith("alpaca_cli.commands."):
        return 5
    raise AssertionError(f"{module} has no layer: add it to LAYERS in this test (and to the docstring)")


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(path: str, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every alpaca import in the file, lazy ones included."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub, []) if sub in known else (node.module, [a.name]))
    return found


def graph():
    mods = modules()
    return mods, {m: imports(path, set(mods)) for m, path in mods.items()}


def test_imports_point_down_and_take_no_private_names():
    mods, edges = graph()
    problems = []
    for m, deps in edges.items():
        for dep, names in deps:
            if dep == m:
                continue
            if layer(dep) > layer(m):
                problems.append(f"{m} (layer {layer(m)}) imports {dep} (layer {layer(dep)}): upward")
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                problems.append(f"{m} imports private {', '.join(private)} from {dep}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    mods, edges = graph()
    adj = {m: sorted({d for d, _ in deps if d != m and d in mods}) for m, deps in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in adj[m]:
            if d == "alpaca_cli":  # the package's __init__ holds only __version__
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(adj):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_imports_and_would_flag_a_cycle(tmp_path):
    """The walk above must be able to fail: a lazy (function-level) upward import is an import too."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from alpaca_cli.commands import train\n    from alpaca_cli.core.mesh import _x\n")
    found = imports(str(src), set(modules()))
    assert ("alpaca_cli.commands.train", []) in found and ("alpaca_cli.core.mesh", ["_x"]) in found


MAX_FUNCTION_LINES = 70


def long_functions(path: str) -> list[str]:
    """Functions (methods and nested ones included) longer than MAX_FUNCTION_LINES, docstring and all."""
    tree = ast.parse(open(path).read(), path)
    return [f"{path}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_longer_than_a_screen():
    """A function a reader cannot see whole is cut along its seams (a setup object, named steps) instead."""
    problems = [line for path in modules().values() for line in long_functions(path)]
    assert not problems, "\n".join(problems)


def test_the_length_check_counts_a_long_function(tmp_path):
    src = tmp_path / "x.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    src.write_text("def short():\n    pass\n\n\ndef long():\n" + body)
    assert long_functions(str(src)) == [f"{src}:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
