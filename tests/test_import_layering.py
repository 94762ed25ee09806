"""Import layering of the package: kernels -> ops -> models/encoders -> data, pipeline -> train, cli.

:data:`LAYERS` places every top-level module and subpackage of ``semanticgen`` in one layer; a module may import
its own layer and the layers below it, never one above. Three checks:

* in a fresh interpreter per top-level module, importing it imports no module of a higher layer (and works on its
  own: an import cycle that depends on import order shows up there as a "partially initialized module" error, not
  in a test process that has imported everything already);
* a static read of every source file, imports inside functions included (they run too, only later), finds no
  import of a higher layer;
* the static import graph between modules has no cycle: from module-level imports (those that run at import time),
  and from all imports.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import require_extension

import semanticgen

PACKAGE = Path(semanticgen.__file__).parent
TOP_LEVEL = sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE)]))

# Lowest first. A module may import its own layer and those below it.
LAYERS: list[tuple[str, frozenset[str]]] = [
    # Imported by everything: the package itself (its __init__ loads the extension), checks, errors, file and
    # frame helpers, thread settings, and where checkpoints sit in a run directory.
    (
        "base",
        frozenset(
            {
                "",  # semanticgen/__init__.py
                "_C",
                "_checks",
                "_extension",
                "_files",
                "_procstatus",
                "checkpoint_layout",
                "environment",
                "errors",
                "frames",
                "threads",
                "timing",
                "video",
            }
        ),
    ),
    ("kernels", frozenset({"kernels"})),
    ("ops", frozenset({"ops", "parallel", "rectified_flow"})),
    ("models, encoders", frozenset({"models", "encoders", "integrations", "planning"})),
    ("data, pipeline, exports", frozenset({"data", "pipeline", "exports"})),
    # Reading a finished run and sampling from it: nothing from train.
    ("inference", frozenset({"runs", "generate", "evaluation"})),
    ("train", frozenset({"train"})),
    ("tools", frozenset({"cli", "bench", "benchmarks", "selftest", "kernel_report"})),
]
LAYER_OF = {unit: index for index, (_, units) in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """The top-level unit of a module name: ``semanticgen.train.loop`` -> ``train``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer_name(unit: str) -> str:
    return LAYERS[LAYER_OF[unit]][0]


def test_every_top_level_module_has_one_layer():
    placed = [unit for _, units in LAYERS for unit in units]
    assert len(placed) == len(set(placed)), "a module is placed in two layers"
    missing = sorted(set(TOP_LEVEL) - set(LAYER_OF))
    assert not missing, f"place these modules in a layer of LAYERS: {missing}"
    assert {"kernels", "ops", "models", "encoders", "data", "pipeline", "train", "cli"} <= set(TOP_LEVEL)
    order = ["kernels", "ops", "models", "data", "train", "cli"]  # the order
    assert [LAYER_OF[u] for u in order] == sorted(LAYER_OF[u] for u in order)
    assert LAYER_OF["encoders"] == LAYER_OF["models"] and LAYER_OF["pipeline"] == LAYER_OF["data"]


# ----------------------------------------------------------------------------- fresh interpreters


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, subprocess.CompletedProcess]:
    """``importlib.import_module("semanticgen.<m>")`` in its own interpreter, for every top-level module; each
    prints the ``semanticgen`` modules it then holds as JSON.

    A few at a time (each mostly waits on importing torch), not all at once: 20 torch imports side by
    side would need gigabytes."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(name):
        script = (
            "import importlib, json, sys\n"
            f"importlib.import_module('semanticgen.{name}')\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'semanticgen' or m.startswith('semanticgen.'))))\n"
        )
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(zip(TOP_LEVEL, pool.map(run, TOP_LEVEL)))


def _higher_layer_modules(name: str, loaded: list[str]) -> list[str]:
    """The modules of ``loaded`` whose layer is above that of top-level module ``name``."""
    return [m for m in loaded if LAYER_OF.get(_unit(m), len(LAYERS)) > LAYER_OF[name]]


def test_higher_layer_modules_are_found():
    loaded = ["semanticgen", "semanticgen.errors", "semanticgen.runs", "semanticgen.train", "semanticgen.train.export"]
    assert _higher_layer_modules("runs", loaded) == ["semanticgen.train", "semanticgen.train.export"]
    assert _higher_layer_modules("ops", ["semanticgen.ops", "semanticgen.models.blocks"]) == [
        "semanticgen.models.blocks"
    ]
    assert _higher_layer_modules("cli", loaded) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", TOP_LEVEL)
def test_module_imports_alone_and_no_higher_layer(fresh_imports, name):
    if name == "_C":
        require_extension()  # the compiled extension: a skip, or a failure in CI, when it is not built
    proc = fresh_imports[name]
    assert proc.returncode == 0, f"import semanticgen.{name} failed:\n{proc.stderr[-3000:]}"
    assert "partially initialized module" not in proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"semanticgen.{name}" in loaded
    higher = _higher_layer_modules(name, loaded)
    assert not higher, (
        f"importing semanticgen.{name} (layer {_layer_name(name)!r}) imported modules of higher layers: {higher}"
    )


# ----------------------------------------------------------------------------- static import graph


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``; with ``module_level``, only those that run when the module is imported
    (not inside a function, not under ``if TYPE_CHECKING:``)."""
    if not module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found = []

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        visit(children)

    visit(tree.body)
    return found


def _imports(name: str, path: Path, modules: dict[str, Path], module_level: bool = False) -> set[str]:
    """Modules of the package that ``name`` imports, resolved to modules: ``from a import b`` counts as ``a.b``
    when that is a module, else as ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), module_level):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names
            ]
        for target in targets:
            # `import a.b.c` names a module; keep the longest prefix that is one of ours.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph(module_level: bool = False, root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(name, path, modules, module_level) for name, path in modules.items()}


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan),
    ignoring a module's imports of its own parent packages: a package's ``__init__`` importing its submodules is
    how packages are built."""
    edges = {m: {t for t in ts if not _is_ancestor(t, m)} for m, ts in graph.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_through(min(c), c, edges) for c in components]


def _cycle_through(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest import path from ``start`` back to itself inside one strongly connected component."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")  # pragma: no cover


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "p"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_import_reader_sees_relative_imports_and_tells_module_level_ones(tmp_path):
    root = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import os\nimport p.c.d\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.e\n"
            "try:\n    from . import c\nexcept ImportError:\n    pass\n\n\ndef f():\n    from .b import thing\n",
            "b.py": "",
            "c/__init__.py": "",
            "e.py": "",
        },
    )
    modules = _modules(root)
    assert _imports("p.a", root / "a.py", modules) == {"p.b", "p.c", "p.e"}
    assert _imports("p.a", root / "a.py", modules, module_level=True) == {"p.c"}


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "p": {"p.c"}, "p.c": {"p"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]  # p.c importing its parent package p is no cycle
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _cycle_report(cycles: list[list[str]]) -> str:
    return "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level-imports", "all-imports"])
def test_no_import_cycles(module_level):
    cycles = _cycles(_graph(module_level))
    assert not cycles, _cycle_report(cycles)


def test_no_module_imports_a_higher_layer_even_inside_a_function():
    bad = []
    for module, targets in sorted(_graph().items()):
        layer = LAYER_OF.get(_unit(module))
        if layer is None:
            continue  # test_every_top_level_module_has_one_layer names it
        for target in sorted(targets):
            if LAYER_OF.get(_unit(target), -1) > layer:
                bad.append(f"{module} ({_layer_name(_unit(module))}) imports {target} ({_layer_name(_unit(target))})")
    assert not bad, "\n".join(bad)
