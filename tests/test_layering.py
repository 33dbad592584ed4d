"""Import layering of the package, held by two kinds of check.

* ``sys.modules`` (one fresh interpreter per core module): importing the core -- graph, manifest, the pass
  manager, compile's driver, the registries, the target data model, lowering -- loads no concrete pass, target
  or strategy, not ``hetcomp.builtins`` (registered on the first registry lookup) nor the CLI, and none of the
  heavy optional back ends (aihwkit, pymoo).
* ``ast`` over every ``hetcomp/**/*.py``: targets never import passes; nothing but ``__main__`` imports the CLI;
  the package-level import graph is acyclic; there is exactly one Hutchinson/HVP implementation
  (``hetcomp/analysis/hessian.py``).

Each failure names the file and line that broke the rule.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hetcomp"

# --------------------------------------------------------------------------------------------------------------
# The modules the core must not load.

CONCRETE_PASSES = sorted(
    f"hetcomp.passes.{p.stem}" for p in (PKG / "passes").glob("*.py") if p.stem not in ("__init__", "base")
)
CONCRETE_TARGETS = [f"hetcomp.targets.{n}" for n in ("digital", "pcm", "sram", "reram", "photonic", "crossbar")]
FORBIDDEN_IN_CORE = [*CONCRETE_PASSES, *CONCRETE_TARGETS, "hetcomp.strategies", "hetcomp.builtins", "hetcomp.cli"]
FORBIDDEN_PACKAGES = ["aihwkit", "pymoo"]  # and their submodules

CORE_MODULES = [
    "hetcomp.graph",
    "hetcomp.manifest",
    "hetcomp.passes.base",
    "hetcomp.compiler",
    "hetcomp.registry",
    "hetcomp.targets",  # the package: base + registry
    "hetcomp.lower",
]

# Run in a clean interpreter: a meta-path spy records, for the first import of each forbidden module, the
# hetcomp frames (file:line) that asked for it, so a failure names the import that pulled it in.
_PROBE = textwrap.dedent(
    """
    import json, sys, traceback
    sys.path.insert(0, {root!r})
    FORBIDDEN, PACKAGES = set({forbidden!r}), tuple({packages!r})

    def forbidden(name):
        return name in FORBIDDEN or name.split(".")[0] in PACKAGES

    class Spy:
        chains = {{}}

        def find_spec(self, name, path=None, target=None):
            if forbidden(name) and name not in self.chains:
                self.chains[name] = [f"{{f.filename}}:{{f.lineno}}" for f in traceback.extract_stack()
                                     if "/hetcomp/" in f.filename.replace("\\\\", "/")]
            return None  # let the real finders load it

    sys.meta_path.insert(0, Spy())
    import importlib
    importlib.import_module({module!r})
    loaded = sorted(name for name in sys.modules if forbidden(name))
    print(json.dumps({{"loaded": loaded, "chains": Spy.chains}}))
    """
)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_loads_no_concrete_pass_target_strategy_or_backend(module):
    assert CONCRETE_PASSES, "no concrete pass found under hetcomp/passes/: the forbidden list is empty"
    script = _PROBE.format(root=str(ROOT), forbidden=FORBIDDEN_IN_CORE, packages=FORBIDDEN_PACKAGES, module=module)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"`import {module}` failed in a fresh interpreter:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = result["loaded"]
    chains = result["chains"]
    details = "\n".join(
        f"  {name}: imported via " + (" -> ".join(_relative(f) for f in chains.get(name, [])) or "(no hetcomp frame)")
        for name in loaded
    )
    assert not loaded, f"`import {module}` loaded modules the core must not load:\n{details}"


def _relative(frame: str) -> str:
    try:
        return str(Path(frame).relative_to(ROOT))
    except ValueError:
        return frame


# --------------------------------------------------------------------------------------------------------------
# AST: every import statement of the package, resolved to an absolute module name.


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES: dict[str, Path] = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "hetcomp.passes.hni"
    target: str  # imported module, e.g. "hetcomp.analysis.layer_hessian"
    path: Path
    line: int
    module_level: bool  # False: inside a function (lazy)
    type_only: bool  # under ``if TYPE_CHECKING:``

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Collects ``import x``, ``from x import y`` (relative ones resolved) and ``importlib.import_module("x")``
    with a literal name, noting whether each runs at import time (module or class body) or in a function."""

    def __init__(self, module: str, path: Path, modules: set[str]) -> None:
        self.module, self.path, self.modules = module, path, modules
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.depth = 0  # function nesting
        self.type_only = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.AST) -> None:
        self.found.append(Import(self.module, target, self.path, node.lineno, self.depth == 0, self.type_only > 0))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_only += 1
            for child in node.body:
                self.visit(child)
            self.type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            self._add(sub if sub in self.modules else module, node)  # ``from pkg import submodule``

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str):
                self._add(node.args[0].value, node)
        self.generic_visit(node)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def collect_imports(module: str, path: Path, modules: set[str]) -> list[Import]:
    collector = _ImportCollector(module, path, modules)
    collector.visit(_parse(path))
    return collector.found


IMPORTS: list[Import] = [
    imp for module, path in SOURCES.items() for imp in collect_imports(module, path, set(SOURCES))
]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_import_collector_sees_relative_and_function_level_imports():
    """The rules below are only as good as the collector: it must resolve relative imports and see lazy ones."""
    src = textwrap.dedent(
        """
        from . import base
        from .. import errors
        import hetcomp.graph.layers

        def f():
            from hetcomp.targets import digital
            import importlib
            importlib.import_module("hetcomp.cli")
        """
    )
    path = PKG / "passes" / "x.py"
    modules = {"hetcomp", "hetcomp.passes", "hetcomp.passes.base", "hetcomp.errors", "hetcomp.targets",
               "hetcomp.targets.digital", "hetcomp.cli"}
    collector = _ImportCollector("hetcomp.passes.x", path, modules)
    collector.visit(ast.parse(src))
    got = {(i.target, i.module_level) for i in collector.found}
    assert got == {("hetcomp.passes.base", True), ("hetcomp.errors", True), ("hetcomp.graph.layers", True),
                   ("hetcomp.targets.digital", False), ("importlib", False), ("hetcomp.cli", False)}
    # and on the real package: builtins registers the concrete targets lazily
    lazy = {i.target for i in IMPORTS if i.source == "hetcomp.builtins" and not i.module_level}
    assert set(CONCRETE_TARGETS) - {"hetcomp.targets.crossbar"} <= lazy


def test_targets_never_import_passes():
    """No module under hetcomp/targets/ imports hetcomp.passes or anything under it (at any level, lazily or not):
    a target is data plus its cost model; passes consume targets, never the other way round."""
    bad = [i for i in IMPORTS if _under(i.source, "hetcomp.targets") and _under(i.target, "hetcomp.passes")]
    assert not bad, "targets import passes:\n" + "\n".join(f"  {i.where}: {i.source} imports {i.target}" for i in bad)


def test_nothing_imports_the_cli():
    """Only ``python -m hetcomp`` (hetcomp/__main__.py) imports hetcomp.cli: the library never depends on it."""
    allowed = ("hetcomp.__main__", "hetcomp.cli")
    bad = [i for i in IMPORTS if _under(i.target, "hetcomp.cli") and i.source not in allowed]
    assert not bad, "hetcomp.cli imported by:\n" + "\n".join(f"  {i.where}: {i.source}" for i in bad)


def _node(module: str) -> str:
    """hetcomp.x.y -> x (a top-level subpackage or module); hetcomp itself -> "hetcomp"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(imports: list[Import]) -> nx.DiGraph:
    """Package-level graph from the imports that run at import time (module or class body, not TYPE_CHECKING).
    Each edge keeps the file:line of the imports behind it."""
    graph = nx.DiGraph()
    for i in imports:
        if not i.module_level or i.type_only or not _under(i.target, "hetcomp"):
            continue
        src, dst = _node(i.source), _node(i.target)
        if src == dst:
            continue
        if not graph.has_edge(src, dst):
            graph.add_edge(src, dst, where=[])
        where = f"{i.where} ({i.source} -> {i.target})"
        if where not in graph[src][dst]["where"]:  # ``from x import a, b``: one entry
            graph[src][dst]["where"].append(where)
    return graph


def test_no_import_cycles_between_packages():
    """The graph of the top-level subpackages/modules of hetcomp (graph, analysis, passes, partition, lower,
    targets, finetune, curvature, export, storage, manifest, compiler, ...; hetcomp.x.y counts as x), built from
    MODULE-LEVEL imports, is acyclic.

    Function-level (lazy) imports are excluded by design: they are how the core defers to what is registered
    later -- ``hetcomp.registry.load_builtins`` imports ``hetcomp.builtins``, which imports the concrete targets,
    passes and strategies, on the first lookup -- and they run only when called, so they cannot form an
    import-time cycle. ``TYPE_CHECKING`` imports never run and are excluded too. No module is left out of the
    graph: the package root (only ``errors`` at import time) and the leaf utilities (errors, checks, progress,
    memory) cause no spurious cycle, so they stay in.
    """
    graph = package_graph(IMPORTS)
    assert "passes" in graph and "graph" in graph, "the package graph is unexpectedly empty"
    cycles = sorted(nx.simple_cycles(graph), key=len)
    if not cycles:
        return
    lines = []
    for cycle in cycles[:10]:
        lines.append("  cycle: " + " -> ".join([*cycle, cycle[0]]))
        for a, b in zip(cycle, [*cycle[1:], cycle[0]]):
            lines.extend(f"    {a} -> {b}: {w}" for w in graph[a][b]["where"])
    found = nx.find_cycle(graph)
    pytest.fail(f"import cycles between packages (e.g. {found}):\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------------------
# Exactly one Hutchinson / HVP implementation: hetcomp/analysis/hessian.py.

HESSIAN = PKG / "analysis" / "hessian.py"
DOUBLE_BACKWARD = PKG / "analysis" / "double_backward.py"  # autograd Functions with cheaper double backwards
CURVATURE_NAME = re.compile(r"hutchinson|hvp|rademacher|lanczos|power_iter", re.IGNORECASE)


def _call_name(node: ast.Call) -> str:
    """Dotted name of the called function (``torch.autograd.grad``), or its last attribute if not dotted."""
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _imports_hessian(path: Path, tree: ast.Module) -> bool:
    collector = _ImportCollector(_module_name(path), path, set(SOURCES))
    collector.visit(tree)
    return any(i.target == "hetcomp.analysis.hessian" for i in collector.found)


def curvature_definitions(path: Path, tree: ast.Module) -> list[str]:
    """Functions/methods named like a Hutchinson/HVP/Lanczos/power-iteration implementation outside hessian.py.

    A function of such a name is allowed only as a thin entry point that delegates to hessian.py: its module
    imports ``hetcomp.analysis.hessian`` and its body calls a function or method of the same family
    (``layer_hessian.hutchinson`` caches ``HessianOperator.hutchinson``). The machinery itself (double backward,
    Rademacher probes) is held separately by ``curvature_machinery``."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and CURVATURE_NAME.search(node.name):
            delegates = any(
                isinstance(c, ast.Call) and CURVATURE_NAME.search(_call_name(c).rpartition(".")[2])
                for c in ast.walk(node)
            )
            if not (delegates and _imports_hessian(path, tree)):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: defines {node.name}() "
                           "(not a delegation to hetcomp.analysis.hessian)")
    return bad


def _is_rademacher_randint(node: ast.Call, name: str) -> bool:
    if name not in ("randint", "integers"):
        return False
    args = node.args
    const = [a.value if isinstance(a, ast.Constant) else None for a in args]
    kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
    if const[:2] == [0, 2] or (kw.get("low", const[0] if const else None) == 0 and kw.get("high") == 2):
        return True
    return len(args) >= 2 and const[0] == 2 and isinstance(args[1], ast.Tuple | ast.List)  # randint(2, size)


def curvature_machinery(path: Path, tree: ast.Module) -> list[str]:
    """Double-backward and probe machinery outside hessian.py: ``create_graph=True`` (any call; only hessian.py
    and double_backward.py may), ``torch.autograd.functional``/``torch.func`` Hessian products, and Rademacher
    draws (``randint(0, 2, ...)``, ``bernoulli``; only hessian.py may)."""
    rel = path.relative_to(ROOT)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch.autograd.functional", "torch.func"):
            names = {a.name for a in node.names} & {"hvp", "vhp", "hessian"}
            if names and path != HESSIAN:
                bad.append(f"{rel}:{node.lineno}: imports {', '.join(sorted(names))} from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        dotted = _call_name(node)
        name = dotted.rpartition(".")[2]
        for kw in node.keywords:
            if kw.arg == "create_graph" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                if path not in (HESSIAN, DOUBLE_BACKWARD):
                    bad.append(f"{rel}:{node.lineno}: {dotted}(..., create_graph=...) -- double backward")
        if path == HESSIAN:
            continue
        if name in ("hvp", "vhp", "hessian") and ("autograd.functional" in dotted or dotted.startswith("func.")
                                                  or ".func." in dotted):
            bad.append(f"{rel}:{node.lineno}: {dotted}() -- a second Hessian-vector product")
        if _is_rademacher_randint(node, name):
            bad.append(f"{rel}:{node.lineno}: {dotted}(0, 2, ...) -- Rademacher signs")
        if name in ("bernoulli", "bernoulli_"):
            bad.append(f"{rel}:{node.lineno}: {dotted}() -- random signs")
    return bad


def test_the_curvature_checks_can_fail():
    """Both checks flag a stand-alone second implementation (so passing below means something)."""
    src = textwrap.dedent(
        """
        import torch

        def my_hvp(loss, params, v):
            grads = torch.autograd.grad(loss, params, create_graph=True)
            return torch.autograd.grad(grads, params, v)

        def probe(p):
            return torch.randint(0, 2, p.shape) * 2 - 1, torch.bernoulli(p), torch.randint(2, (3,))
        """
    )
    path = PKG / "passes" / "x.py"
    tree = ast.parse(src)
    assert [b.split(": ", 1)[1] for b in curvature_definitions(path, tree)] == [
        "defines my_hvp() (not a delegation to hetcomp.analysis.hessian)"]
    assert len(curvature_machinery(path, tree)) == 4
    assert not curvature_machinery(HESSIAN, tree)  # hessian.py may build double backward and draw signs


def test_exactly_one_hutchinson_hvp_implementation():
    """hetcomp/analysis/hessian.py is the one implementation of Hutchinson, HVPs (hvp, hvp_many, block_hvp),
    Rademacher probes, Lanczos and power iteration: (a) no other module defines a function or method of such a
    name unless it only delegates there; (b) no other module builds double-backward graphs
    (``create_graph=True``; double_backward.py, which defines the autograd Functions, excepted) or draws
    Rademacher signs."""
    defined_in_hessian = {n.name for n in ast.walk(_parse(HESSIAN)) if isinstance(n, ast.FunctionDef)}
    expected = {"hutchinson", "hvp", "hvp_many", "block_hvp", "rademacher", "lanczos", "power_iteration"}
    assert expected <= defined_in_hessian, f"hessian.py lacks {sorted(expected - defined_in_hessian)}"
    bad = []
    for path in SOURCES.values():
        if path == HESSIAN:
            continue
        tree = _parse(path)
        bad += curvature_definitions(path, tree) + curvature_machinery(path, tree)
    assert not bad, "a second Hutchinson/HVP implementation outside hetcomp/analysis/hessian.py:\n" + "\n".join(
        f"  {b}" for b in bad)
