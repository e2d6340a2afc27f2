"""The import layering of the project, read from the source with ``ast`` (nothing is imported).

Every import counts: at the top of a module, inside a function (lazy), relative, and
``importlib.import_module``/``__import__`` of a constant name. Two rules hold between the
project's modules:

- no import cycle, not even through a lazy import (a cycle makes the order in which modules
  load decide whether a name exists yet);
- no import against the order of ``LAYERS``: a package imports only from packages of lower
  layers. The leaves (``cli``, ``tokenization``) import nothing from the project, and
  ``benchmarks`` (library code of the benches) sits below ``scripts`` (their thin command lines).
  ``tests`` may import anything.

Inside ``checkpointing`` the same order holds between its subpackages (``CHECKPOINTING_LAYERS``:
``base`` < ``format`` < ``storage`` < ``engine``, ``recovery`` < ``manager``), and the code
outside it (tests aside) reaches it only through its public surface: the names a subpackage's
``__init__`` lists in ``__all__`` (lazily exported: a name in its ``_EXPORTS`` counts as an import
of the module that defines it), and the top-level ``checkpointing.manager``.

The checker is the two small functions ``cycles`` and ``layer_violations`` over a graph
``{module: set of modules it imports}``; the tests below run them on the project's graph and on
graphs with an added cycle and an added upward import, which they must refuse.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli", "tokenization"),
    ("checkpointing",),
    ("models",),
    ("trainer",),
    ("interop",),
    ("benchmarks",),
    ("scripts",),
    ("tests",),
)
"""Top-level packages from the bottom up; a package imports only from the layers below its own."""

CHECKPOINTING_LAYERS: tuple[tuple[str, ...], ...] = (
    ("checkpointing._exports",),
    ("checkpointing.base",),
    ("checkpointing.format",),
    ("checkpointing.storage",),
    ("checkpointing.engine", "checkpointing.recovery"),
    ("checkpointing.manager",),
)
"""``checkpointing``'s subpackages from the bottom up (a module belongs to the longest name it
starts with); each imports only from its own part and the parts below."""

SUBPACKAGES = ("base", "format", "storage", "engine", "recovery")

NOT_PROJECT = {"docs", "results", "build", "dist"}
"""Top-level folders that hold no project code (``.venv``, ``*.egg-info`` and hidden ones neither)."""


def layer_of(layers: tuple[tuple[str, ...], ...]) -> dict[str, int]:
    return {package: rank for rank, group in enumerate(layers) for package in group}


def module_files(root: Path, packages) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under the given top-level folders
    (``scripts/`` has no ``__init__.py``; its files are ``scripts.<name>`` all the same)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_from(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from ... import`` reads, in a module of ``package``."""
    if not node.level:
        return node.module
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Dotted names that ``source`` (the module ``module``) imports, anywhere in its body."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if (is_package and isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "_EXPORTS" and isinstance(node.value, ast.Dict)):
            # checkpointing._exports.lazy_exports: each public name is imported from its module on use
            names.update(f"{module}.{value.value}" for value in node.value.values if isinstance(value, ast.Constant))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = imported_from(node, package)
            # ``a.b`` resolves to the module ``a.b`` or, where ``b`` is a name, to ``a``.
            names.update(base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                names.add(node.args[0].value)
    return names


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name loads: its longest prefix that is a module. A bare
    name of a file in ``scripts/`` is that file (the scripts put their folder on sys.path)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    if f"scripts.{parts[0]}" in modules:
        return f"scripts.{parts[0]}"
    return None


def import_graph(root: Path, packages) -> dict[str, set[str]]:
    """``{module: the project modules it imports}`` over the given top-level folders of ``root``."""
    modules = module_files(root, packages)
    graph = {}
    for module, path in modules.items():
        names = imported_names(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        graph[module] = {target for name in names if (target := resolve(name, modules)) not in (None, module)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_violations(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """Each import of a package from its own layer or one above it, and each module of a
    package that has no layer, as a sentence naming both modules."""
    rank = layer_of(layers)
    found = []
    for module in sorted(graph):
        package = module.split(".")[0]
        if package not in rank:
            found.append(f"{module}: package {package!r} has no place in LAYERS")
            continue
        for target in sorted(graph[module]):
            other = target.split(".")[0]
            if other != package and rank.get(other, len(layers)) >= rank[package]:
                found.append(f"{module} imports {target}: {package} may import only from layers below it")
    return found


def part_of(module: str, layers: tuple[tuple[str, ...], ...]) -> str | None:
    """The longest part name of ``layers`` that ``module`` is or lies inside of (None: none)."""
    parts = [p for group in layers for p in group if module == p or module.startswith(p + ".")]
    return max(parts, key=len, default=None)


def sublayer_violations(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """Within the package the ``layers`` divide: each import from a part of the same or a higher
    rank than the importer's own (its own part aside), and each module of that package in no part."""
    rank = {part: r for r, group in enumerate(layers) for part in group}
    package = layers[0][0].split(".")[0]
    found = []
    for module in sorted(graph):
        if module.split(".")[0] != package or module == package:
            continue
        own = part_of(module, layers)
        if own is None:
            found.append(f"{module}: no place in the layers of {package}")
            continue
        for target in sorted(graph[module]):
            other = part_of(target, layers)
            if other is not None and other != own and rank[other] >= rank[own]:
                found.append(f"{module} imports {target}: {own} may import only from {package}'s layers below it")
    return found


def surface_violations(imports: dict[str, list[tuple[str, str]]], public: dict[str, set[str]]) -> list[str]:
    """Imports of ``checkpointing`` from outside it that pass its public surface by: ``imports``
    is ``{module: [(imported module, name or "")]}`` of the code outside, ``public`` each
    subpackage's ``__all__``."""
    found = []
    for module, pairs in sorted(imports.items()):
        for target, name in pairs:
            parts = target.split(".")
            if parts[0] != "checkpointing":
                continue
            if target == "checkpointing" and name in (*public, "manager"):
                continue
            if target == "checkpointing.manager":
                continue
            if len(parts) == 2 and parts[1] in public and name in public[parts[1]]:
                continue
            found.append(f"{module} imports {target}{'.' + name if name else ''}: outside checkpointing, use a name "
                         "a subpackage's __all__ lists (or checkpointing.manager)")
    return found


def outside_imports(root: Path, packages) -> dict[str, list[tuple[str, str]]]:
    """``{module: [(imported module, name)]}`` of the ``checkpointing`` imports in ``packages``
    (``import a.b`` gives ``("a.b", "")``)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for module, path in module_files(root, packages).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                pairs = [(a.name, "") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                pairs = [(node.module, a.name) for a in node.names]
            else:
                continue
            found.setdefault(module, []).extend(p for p in pairs if p[0].split(".")[0] == "checkpointing")
    return found


def public_names() -> dict[str, set[str]]:
    import importlib

    return {sub: set(importlib.import_module(f"checkpointing.{sub}").__all__) for sub in SUBPACKAGES}


def project_packages(root: Path) -> list[str]:
    """Top-level folders holding Python files, hidden, virtual-environment and build ones aside."""
    return sorted(
        d.name for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and not d.name.endswith(".egg-info")
        and d.name not in NOT_PROJECT and any(d.rglob("*.py")))


@functools.cache
def _project_graph() -> tuple[tuple[str, frozenset[str]], ...]:
    return tuple((m, frozenset(t)) for m, t in import_graph(ROOT, project_packages(ROOT)).items())


def project_graph() -> dict[str, set[str]]:
    """The project's import graph, read once per session (a fresh copy each call, to change)."""
    return {module: set(targets) for module, targets in _project_graph()}


def test_every_package_has_a_layer():
    placed = set(layer_of(LAYERS))
    assert not set(project_packages(ROOT)) - placed, "give each new top-level package a place in LAYERS"


def test_no_import_cycle():
    assert cycles(project_graph()) == []


def test_no_import_against_the_layers():
    assert layer_violations(project_graph(), LAYERS) == []


def test_lazy_relative_and_dynamic_imports_are_seen(tmp_path):
    for path, source in {
        "checkpointing/__init__.py": "",
        "checkpointing/engine.py": "from . import levels\nfrom .levels import Level\n",
        "checkpointing/levels.py": "def later():\n    import importlib\n    importlib.import_module('trainer.training')\n",
        "trainer/__init__.py": "",
        "trainer/training.py": "def run():\n    from checkpointing.engine import CheckpointEngine\n",
        "scripts/bench.py": "import bench_common\n",
        "scripts/bench_common.py": "import os\n",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    graph = import_graph(tmp_path, ["checkpointing", "trainer", "scripts"])
    assert graph == {
        "checkpointing": set(), "checkpointing.engine": {"checkpointing.levels"},
        "checkpointing.levels": {"trainer.training"}, "trainer": set(), "trainer.training": {"checkpointing.engine"},
        "scripts.bench": {"scripts.bench_common"}, "scripts.bench_common": set()}
    assert cycles(graph) == [["checkpointing.engine", "checkpointing.levels", "trainer.training"]]
    assert layer_violations(graph, LAYERS) == [
        "checkpointing.levels imports trainer.training: checkpointing may import only from layers below it"]


def test_an_added_cycle_is_refused():
    graph = project_graph()
    # An edge inside one package (the layers allow it) that closes a loop with an existing one.
    importer, imported = next((m, t) for m in sorted(graph) for t in sorted(graph[m])
                              if m.split(".")[0] == t.split(".")[0] == "checkpointing")
    graph[imported] = graph[imported] | {importer}
    assert [c for c in cycles(graph) if {importer, imported} <= set(c)], (importer, imported)
    assert set(layer_violations(graph, LAYERS)) == set(layer_violations(project_graph(), LAYERS))


def test_an_added_upward_import_is_refused():
    before = set(layer_violations(project_graph(), LAYERS))
    for importer, imported in (("checkpointing.engine.checkpoint_engine", "trainer.training"),
                               ("tokenization.tokenizer", "interop.bpe"),
                               ("tokenization.tokenizer", "cli.flags"), ("benchmarks.runner", "scripts.bench_checkpoint"),
                               ("models.gpt", "trainer.training")):
        graph = project_graph()
        graph.setdefault(importer, set()).add(imported)
        package = importer.split(".")[0]
        assert set(layer_violations(graph, LAYERS)) - before == {
            f"{importer} imports {imported}: {package} may import only from layers below it"}


def test_a_package_without_a_layer_is_refused():
    assert layer_violations({"newpkg.thing": set()}, LAYERS) == ["newpkg.thing: package 'newpkg' has no place in LAYERS"]


def test_checkpointing_subpackages_keep_their_order():
    assert sublayer_violations(project_graph(), CHECKPOINTING_LAYERS) == []


def test_an_upward_import_between_subpackages_is_refused():
    assert set(p for g in CHECKPOINTING_LAYERS for p in g) >= {f"checkpointing.{s}" for s in SUBPACKAGES}
    for importer, imported in (("checkpointing.base.errors", "checkpointing.format.metadata"),
                               ("checkpointing.format.commit", "checkpointing.storage.host_pool"),
                               ("checkpointing.recovery.loading", "checkpointing.engine.checkpoint_engine"),
                               ("checkpointing.engine.flusher", "checkpointing.recovery.rollback"),
                               ("checkpointing.storage.host_pool", "checkpointing.manager")):
        graph = project_graph()
        graph[importer].add(imported)
        own = part_of(importer, CHECKPOINTING_LAYERS)
        assert sublayer_violations(graph, CHECKPOINTING_LAYERS) == [
            f"{importer} imports {imported}: {own} may import only from checkpointing's layers below it"]
    assert sublayer_violations({"checkpointing.stray": set()}, CHECKPOINTING_LAYERS) == [
        "checkpointing.stray: no place in the layers of checkpointing"]


def test_code_outside_uses_the_public_surface():
    outside = [p for p in project_packages(ROOT) if p not in ("checkpointing", "tests")]
    assert surface_violations(outside_imports(ROOT, outside), public_names()) == []


def test_an_internal_import_from_outside_is_refused():
    public = public_names()
    assert "HostPool" in public["storage"] and "CheckpointEngine" in public["engine"]
    imports = {"trainer.x": [("checkpointing.storage", "HostPool"), ("checkpointing.manager", "CheckpointManager"),
                             ("checkpointing.storage.host_pool", "HostPool"), ("checkpointing.engine", "landing"),
                             ("checkpointing.base.errors", "")]}
    assert surface_violations(imports, public) == [
        "trainer.x imports checkpointing.storage.host_pool.HostPool: outside checkpointing, use a name a "
        "subpackage's __all__ lists (or checkpointing.manager)",
        "trainer.x imports checkpointing.engine.landing: outside checkpointing, use a name a subpackage's __all__ "
        "lists (or checkpointing.manager)",
        "trainer.x imports checkpointing.base.errors: outside checkpointing, use a name a subpackage's __all__ "
        "lists (or checkpointing.manager)"]


def test_each_public_name_resolves():
    import importlib

    for sub in SUBPACKAGES:
        package = importlib.import_module(f"checkpointing.{sub}")
        for name in package.__all__:
            assert getattr(package, name) is not None, (sub, name)


MAX_MODULE_LINES = 500
"""A module past this is doing more than one thing: split it by purpose (as the engine's L0
versions went to ``checkpointing.engine.held_versions``)."""


def test_no_module_is_over_the_line_limit():
    packages = [p for p in project_packages(ROOT) if p != "tests"]
    long = {module: n for module, path in module_files(ROOT, packages).items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


def describe_package(root: Path, package: str) -> list[str]:
    """The import graph of one package as text: its modules, the arrows between them, how many
    floors deep it is (longest chain of imports), and, where it has subpackages, the arrows
    between them. ``python -m tests.test_layering checkpointing [--root DIR]``."""
    graph = {m: {t for t in targets if t.split(".")[0] == package}
             for m, targets in import_graph(root, [package]).items()}
    modules = sorted(m for m in graph if (root / m.replace(".", "/")).with_suffix(".py").exists())

    @functools.cache
    def floor(module: str, seen: frozenset = frozenset()) -> int:
        below = [floor(t, seen | {module}) for t in graph.get(module, ()) if t not in seen and t != module]
        return 1 + max(below, default=0)

    arrows = sum(len(graph[m]) for m in modules)
    lines = [f"{package}: {len(modules)} modules, {arrows} arrows between them, "
             f"{max(floor(m) for m in modules)} floors deep"]
    parts = sorted({m.split(".")[1] for m in graph if m.count(".") >= 2})
    if parts:
        between: dict[tuple[str, str], int] = {}
        for module in modules:
            for target in graph[module]:
                a, b = (x.split(".")[1] if x.count(".") >= 2 else x.split(".")[-1] for x in (module, target))
                if a != b:
                    between[(a, b)] = between.get((a, b), 0) + 1
        for part in parts:
            count = sum(1 for m in modules if m.startswith(f"{package}.{part}."))
            lines.append(f"  {part}: {count} modules; imports " + (", ".join(
                f"{b} ({n})" for (a, b), n in sorted(between.items()) if a == part) or "nothing of the package"))
        top = sorted({m.split(".")[1] for m in modules if m.count(".") == 1})
        for name in top:
            lines.append(f"  {name}: imports " + (", ".join(
                f"{b} ({n})" for (a, b), n in sorted(between.items()) if a == name) or "nothing of the package"))
    return lines


def test_the_graph_is_described_layer_by_layer():
    lines = describe_package(ROOT, "checkpointing")
    assert lines[0].startswith("checkpointing: ") and "floors deep" in lines[0]
    assert "  base: 12 modules; imports nothing of the package" in lines
    assert any(line.startswith("  manager: imports base (") for line in lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The import graph of one package, layer by layer.")
    parser.add_argument("package", nargs="?", default="checkpointing")
    parser.add_argument("--root", type=Path, default=ROOT, help="a checkout (another commit's worktree)")
    args = parser.parse_args()
    print("\n".join(describe_package(args.root, args.package)))
