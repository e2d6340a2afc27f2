"""Every test module that starts a process declares ``pytestmark = pytest.mark.slow`` itself, so
that no such module lands in the unit tier (``-m "not slow"``) unnoticed.

"Starts a process" is decided from the source with ``ast``, nothing imported or run:

- a *primitive* starts one: ``subprocess.run``/``Popen``/..., ``multiprocessing.Process``/
  ``Pool``/``get_context``, ``os.fork``/``system``/``popen``/``spawn*``/``posix_spawn``,
  ``pty.spawn``, ``asyncio.create_subprocess_*``, ``ProcessPoolExecutor``, torch's ``spawn``
  and ``torch.distributed.run`` (torchrun in-process);
- a function or class of the project (any package, ``tests/helpers.py`` and ``tests/launch.py``
  included) starts one when its body names a primitive or another such function or class,
  followed through imports to a fixed point. So ``tests.launch.run_pretrain`` (torchrun) and
  ``tests.helpers.make_engine`` do, and so does everything that builds a
  ``checkpointing.engine.checkpoint_engine.CheckpointEngine``, whose flusher is a process of its own;
- a test module starts one when any of its code names such a primitive, function or class, or a
  test takes a fixture of ``tests/conftest.py`` that does.

A class counts as a whole (naming it is taken to run any of its methods), and a function counts
whichever branch names the primitive: the rule errs towards the slow tier. What no name shows is
not followed: a module loaded from a file path, ``getattr``, ``pytest.mark.usefixtures`` by name.
A module may be slow without starting a process (it trains end to end); nothing checks that way.
"""

from __future__ import annotations

import ast
import functools

from tests.test_layering import ROOT, imported_from, module_files, project_packages

PRIMITIVES = frozenset({
    *(f"subprocess.{n}" for n in ("run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput")),
    *(f"multiprocessing.{n}" for n in ("Process", "Pool", "Manager", "get_context", "pool.Pool")),
    *(f"os.{n}" for n in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "spawnl", "spawnle",
                          "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe")),
    "pty.spawn", "pty.fork", "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell",
    "concurrent.futures.ProcessPoolExecutor",
    *(f"torch.multiprocessing.{n}" for n in ("spawn", "start_processes", "Process", "Pool")),
    "torch.distributed.run", "torch.distributed.launcher",
})
"""Dotted names whose use starts a process (a name that begins with one of them counts too)."""


class Module:
    """One module's top-level functions and classes and what its imported names stand for."""

    def __init__(self, name: str, source: str, is_package: bool = False):
        self.name = name
        self.tree = ast.parse(source)
        self.defs = {node.name: node for node in self.tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        self.bindings: dict[str, str] = {}
        """Local name -> the dotted name it stands for; imports inside functions count as well."""
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.bindings[alias.asname] = alias.name
                    else:
                        root = alias.name.split(".")[0]
                        self.bindings[root] = root
            elif isinstance(node, ast.ImportFrom):
                base = imported_from(node, package)
                for alias in node.names:
                    if alias.name != "*":
                        self.bindings[alias.asname or alias.name] = f"{base}.{alias.name}"

    def qualified(self, local: str) -> str | None:
        """The dotted name a local name chain (``subprocess.run``, ``make_engine``) stands for."""
        root, _, rest = local.partition(".")
        if root in self.defs:
            target = f"{self.name}.{root}"
        elif root in self.bindings:
            target = self.bindings[root]
        else:
            return None
        return f"{target}.{rest}" if rest else target

    def references(self, node: ast.AST) -> set[str]:
        """The dotted names that code under ``node`` uses (``a.b.c`` gives ``a.b.c``; each
        shorter chain is in it as a prefix)."""
        found = set()
        for child in ast.walk(node):
            chain = []
            while isinstance(child, ast.Attribute):
                chain.append(child.attr)
                child = child.value
            if isinstance(child, ast.Name):
                if (name := self.qualified(".".join([child.id, *reversed(chain)]))) is not None:
                    found.add(name)
        return found


def is_primitive(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PRIMITIVES)


class ProcessStarters:
    """Which functions and classes of a set of modules start processes: those that name a
    primitive, then whatever names one of them, and so on."""

    def __init__(self, modules: dict[str, Module]):
        self.modules = modules
        users: dict[str, set[str]] = {}
        """``module.def`` -> the functions and classes that name it."""
        todo = []
        for module in modules.values():
            for local, node in module.defs.items():
                symbol = f"{module.name}.{local}"
                for name in module.references(node):
                    if is_primitive(name):
                        todo.append(symbol)
                    elif (used := self.symbol(name)) is not None:
                        users.setdefault(used, set()).add(symbol)
        self.starting: set[str] = set()
        while todo:
            symbol = todo.pop()
            if symbol not in self.starting:
                self.starting.add(symbol)
                todo.extend(users.get(symbol, ()))

    def symbol(self, name: str, seen: frozenset = frozenset()) -> str | None:
        """The ``module.def`` a dotted name refers to, through re-exports; None outside the modules."""
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            module = self.modules.get(".".join(parts[:end]))
            if module is None:
                continue
            local = parts[end]
            if local in module.defs:
                return f"{module.name}.{local}"
            target = module.bindings.get(local)
            if target is None or target in seen:
                return None
            return self.symbol(".".join([target, *parts[end + 1:]]), seen | {target})
        return None

    def starts(self, name: str) -> bool:
        return is_primitive(name) or self.symbol(name) in self.starting


def starts_processes(module: Module, starters: ProcessStarters, conftest: Module | None = None) -> list[str]:
    """What in ``module`` starts a process (sorted names; empty when nothing does)."""
    reasons = {name for name in module.references(module.tree)
               if starters.starts(name) and not name.startswith(f"{module.name}.")}
    if conftest is not None:
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.args:
                    if arg.arg in conftest.defs and f"{conftest.name}.{arg.arg}" in starters.starting:
                        reasons.add(f"fixture {arg.arg}")
    return sorted(reasons)


def declares_slow(module: Module) -> bool:
    """Whether the module's top level assigns ``pytestmark`` a value that holds ``pytest.mark.slow``."""
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return any(ref == "pytest.mark.slow" for ref in module.references(node.value))
    return False


@functools.cache
def _parsed_project() -> tuple[tuple[str, Module], ...]:
    files = module_files(ROOT, project_packages(ROOT))
    return tuple((name, Module(name, path.read_text(encoding="utf-8"), path.name == "__init__.py"))
                 for name, path in files.items())


def project_modules() -> dict[str, Module]:
    """The project's modules, parsed once per session (a fresh dict each call, to add to)."""
    return dict(_parsed_project())


def unmarked_process_modules(modules: dict[str, Module], starters: ProcessStarters | None = None) -> dict[str, list[str]]:
    """``{test module: what starts a process}`` for each ``tests/test_*`` module without the mark
    (``starters``: those of ``modules`` when already known)."""
    starters = starters or ProcessStarters(modules)
    conftest = modules.get("tests.conftest")
    return {name: reasons for name, module in sorted(modules.items())
            if name.startswith("tests.test_") and not declares_slow(module)
            and (reasons := starts_processes(module, starters, conftest))}


@functools.cache
def project_starters() -> ProcessStarters:
    """The project's starters, found once per session."""
    return ProcessStarters(project_modules())


def test_every_module_that_starts_processes_is_marked_slow():
    assert unmarked_process_modules(project_modules(), project_starters()) == {}


def test_the_launch_helpers_and_the_engine_count_as_starting_processes():
    starters = project_starters()
    for name in ("tests.launch.run_pretrain", "tests.launch.run_two_nodes", "tests.helpers.make_engine",
                 "checkpointing.engine.checkpoint_engine.CheckpointEngine"):
        assert starters.starts(name), name
    for name in ("tests.helpers.free_port", "tests.helpers.SyntheticState", "subprocess.TimeoutExpired"):
        assert not starters.starts(name), name


SPAWNING_TEST = '''
import pytest
{imports}

{mark}

def helper():
    return {call}

def test_it():
    helper()
'''


def _with_test_module(source: str) -> dict[str, Module]:
    """The project's modules but its test modules (no test module starts another's code), and a
    synthetic one."""
    modules = {name: module for name, module in project_modules().items() if not name.startswith("tests.test_")}
    modules["tests.test_synthetic"] = Module("tests.test_synthetic", source)
    return modules


def refused(source: str) -> bool:
    """Whether the checker refuses a test module of this source (the project's starters stay
    those of the project: nothing imports a test module)."""
    return "tests.test_synthetic" in unmarked_process_modules(_with_test_module(source), project_starters())


def test_a_module_that_spawns_without_the_mark_is_refused():
    for imports, call in (("import subprocess", "subprocess.run(['true'])"),
                          ("from subprocess import Popen as P", "P(['true'])"),
                          ("import multiprocessing as mp", "mp.get_context('spawn').Process(target=print)"),
                          ("import os", "os.system('true')"),
                          ("from tests.launch import run_pretrain", "run_pretrain([])"),
                          ("from tests import helpers", "helpers.make_engine(None, None, None)"),
                          ("from checkpointing.engine.checkpoint_engine import CheckpointEngine", "CheckpointEngine")):
        bare = SPAWNING_TEST.format(imports=imports, mark="", call=call)
        assert refused(bare), imports
        marked = SPAWNING_TEST.format(imports=imports, mark="pytestmark = pytest.mark.slow", call=call)
        assert not refused(marked), imports
        listed = SPAWNING_TEST.format(imports=imports, mark="pytestmark = [pytest.mark.slow, pytest.mark.timeout(9)]",
                                      call=call)
        assert not refused(listed), imports


def test_a_module_that_spawns_nothing_needs_no_mark():
    quiet = SPAWNING_TEST.format(imports="import subprocess\nfrom tests.helpers import free_port", mark="",
                                 call="(free_port(), subprocess.TimeoutExpired)")
    assert not refused(quiet)


def test_a_conftest_fixture_that_spawns_counts():
    modules = _with_test_module("def test_it(spawning_fixture):\n    pass\n")
    conftest = modules["tests.conftest"]
    modules["tests.conftest"] = Module("tests.conftest", ast.unparse(conftest.tree) + (
        "\n\nimport pytest, subprocess\n@pytest.fixture\ndef spawning_fixture():\n    subprocess.run(['true'])\n"))
    assert unmarked_process_modules(modules)["tests.test_synthetic"] == ["fixture spawning_fixture"]


def test_a_mark_on_one_test_is_not_the_modules():
    one = "import pytest, subprocess\n\n@pytest.mark.slow\ndef test_it():\n    subprocess.run(['true'])\n"
    assert refused(one)
