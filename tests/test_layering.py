"""The import layering: no module-level import cycle; data_prep below xmedjax.

data_prep writes and reads the prepared-dataset format (data_prep.dataset_format) and never
imports xmedjax; xmedjax.names, xmedjax.errors and xmedjax.config_checks import no project
module that loads JAX (tests/test_configs.py checks the last at run time).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("xmedjax", "data_prep", "configs")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                    dotted = rel.replace(os.sep, ".")
                    out[dotted.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def _import_nodes(node: ast.AST, top_level_only: bool):
    """Import statements under `node`; with top_level_only, none inside a function body."""
    for child in ast.iter_child_nodes(node):
        if top_level_only and isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        ):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _import_nodes(child, top_level_only)


def _imports(path: str, module: str, known: set[str], top_level_only: bool) -> set[str]:
    """Project modules a file imports (`from pkg import name` counts as pkg.name if a module)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in _import_nodes(tree, top_level_only):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package
            anchor = module.split(".")
            if not path.endswith("__init__.py"):
                anchor = anchor[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            out.add(full if full in known else base)
    return {m for m in out if m in known} - {module}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, set(modules), top_level_only) for m, p in modules.items()}


def test_data_prep_never_imports_xmedjax():
    graph = _graph(top_level_only=False)  # lazy imports inside functions too
    bad = {
        m: sorted(t for t in targets if t.split(".")[0] == "xmedjax")
        for m, targets in graph.items()
        if m.split(".")[0] == "data_prep"
    }
    assert not {m: t for m, t in bad.items() if t}, bad


def test_no_module_level_import_cycle():
    graph = _graph(top_level_only=True)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    # the light modules stay light: no project module that loads JAX behind them
    for light in ("xmedjax.names", "xmedjax.errors", "data_prep.dataset_format"):
        assert not graph[light], (light, graph[light])
    assert graph["xmedjax.config_checks"] <= {"configs.default", "xmedjax.errors", "xmedjax.names"}


def test_importing_data_prep_and_config_checks_loads_no_xmedjax_beyond_them():
    modules = sorted(m for m in _modules() if m.split(".")[0] == "data_prep")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'xmedjax')\n"
        "assert not loaded, loaded\n"
        "import xmedjax.config_checks\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'xmedjax')\n"
        "print(' '.join(loaded))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [
        "xmedjax",
        "xmedjax.config_checks",
        "xmedjax.errors",
        "xmedjax.host_memory",  # the package's __init__: glibc options, no JAX
        "xmedjax.names",
    ]
