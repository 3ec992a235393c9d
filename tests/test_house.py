"""The house plan: a lazy public API, a torch-free core, no import cycles.

Imports are checked in fresh interpreters (subprocesses), since this test session has long
since imported torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import attn_harness

PACKAGE = Path(attn_harness.__file__).parent
ROOT = PACKAGE.parent

# A meta-path finder that makes `import torch` (and its submodules) fail, as on a machine without it.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_importing_the_package_does_not_import_torch() -> None:
    run = python("import attn_harness, sys; print('torch' in sys.modules or 'diffusers' in sys.modules)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_every_public_name_resolves_lazily_to_its_module() -> None:
    run = python(
        "import json, sys, attn_harness\n"
        "before = 'torch' in sys.modules\n"
        "values = {n: getattr(attn_harness, n) for n in attn_harness.__all__}\n"
        "names = {n: v.__module__ for n, v in values.items() if hasattr(v, '__module__')}\n"
        "print(json.dumps({'before': before, 'after': 'torch' in sys.modules, 'names': names}))"
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["before"] is False and found["after"] is True  # extract, frame_stats ... need torch
    for name, module in attn_harness._EXPORTS.items():
        assert found["names"].get(name, module) == module, name
    for wanted in ("load_model", "Probe", "extract", "read_dataset", "write_dataset", "run_check",
                   "frame_stats", "capture", "import_legacy"):
        assert wanted in attn_harness.__all__


def test_all_lists_exactly_the_lazy_exports() -> None:
    assert sorted(attn_harness.__all__) == sorted(["__version__", *attn_harness._EXPORTS])


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        attn_harness.nonesuch  # noqa: B018
    assert "extract" in dir(attn_harness)


def torch_free_modules() -> list[str]:
    names = ["attn_harness", "attn_harness.accessor"]
    for sub in ("core", "report"):
        names += [f"attn_harness.{sub}.{p.stem}" for p in sorted((PACKAGE / sub).glob("*.py")) if p.stem != "__init__"]
    return names


def test_the_torch_free_core_imports_and_works_without_torch() -> None:
    modules = torch_free_modules()
    assert "attn_harness.core.store" in modules and "attn_harness.report.figures" in modules
    code = BLOCK_TORCH + (
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "try:\n"
        "    import torch\n"
        "except ModuleNotFoundError:\n"
        "    print('blocked')\n"
    )
    run = python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "blocked"  # the blocker works, so the imports above really ran without torch


def test_the_torch_blocker_catches_a_module_that_needs_torch() -> None:
    run = python(BLOCK_TORCH + "import attn_harness.model.capture")
    assert run.returncode != 0 and "blocked by the test" in run.stderr


# --------------------------------------------------------------------------- import graph


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (function bodies included).

    ``TYPE_CHECKING`` blocks are skipped (they never run); ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at ``pkg``.
    """
    modules = {module_name(p, package.parent): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        edges: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


# The extract <-> rollout cycle is broken on the issue-16 branch; this entry goes when that lands.


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "attn_harness.core.store" in graph["attn_harness.core.checks"] | graph["attn_harness.model.legacy"]
    found = cycles(graph)
    assert found == []


def test_core_and_report_import_nothing_from_the_torch_layers() -> None:
    graph = import_graph()
    torch_layers = ("attn_harness.model", "attn_harness.sampling", "attn_harness.pytest", "attn_harness.cli")
    for name in torch_free_modules():
        bad = sorted(e for e in graph[name] if e.startswith(torch_layers))
        assert not bad, f"{name} imports {bad}"


def calls_and_imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules imported, dotted names called) in one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    called = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    return imported, called


def test_hashing_and_torch_load_each_live_in_one_module() -> None:
    hashing, loading = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        imported, called = calls_and_imports(path)
        if "hashlib" in imported:
            hashing.append(module_name(path, ROOT))
        if {"torch.load", "load"} & called and "torch" in imported:
            loading.append(module_name(path, ROOT))
    assert hashing == ["attn_harness.core.fingerprint"]
    assert loading == ["attn_harness.model.torchfile"]


# Layers in order (docs/design.md, "Layering"); a module may import its own layer and those before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("attn_harness.core",)),
    ("report", ("attn_harness.report",)),
    ("model", ("attn_harness.model", "attn_harness.fixtures.videos")),
    ("sampling", ("attn_harness.sampling",)),
    ("pytest", ("attn_harness.pytest",)),
    ("faces", ("attn_harness.accessor", "attn_harness.testing", "attn_harness.cli", "attn_harness.fixtures", "attn_harness")),
]


def layer_of(module: str) -> int:
    """Index in LAYERS by the longest matching prefix."""
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{module} belongs to no layer: add it to LAYERS and to docs/design.md"
    return rank


def test_no_module_imports_from_a_later_layer() -> None:
    breaches = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in import_graph().items()
        for target in targets
        if target != "attn_harness" and layer_of(target) > layer_of(module)  # the root only for __version__
    ]
    assert breaches == []
