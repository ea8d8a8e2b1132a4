"""The first-party import graph, read with ``ast``: no cycles, and dependencies point inward.

An import counts as *module-top-level* when it runs while its module is being imported: at the
top of the file or inside a top-level ``if``/``try``/``with`` or class body, but not inside a
function and not under ``if TYPE_CHECKING:``. Neither modules nor packages may form a cycle
through those; modules may not form one even through imports inside functions (a deferred import
only hides a tangle). The domain's and the benchmarks' bans hold for imports at any level, and
the vector adapter is built in one place.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "adapters", "chaos", "lockstep", "bench")
# Modules outside PACKAGES that an import may still resolve to (only to be refused).
OTHER_FIRST_PARTY = ("tests",)
# Top-level distributions the domain must not import: Ray and every store or broker client.
DOMAIN_BANNED_THIRD_PARTY = frozenset(
    {
        "ray",
        "pymilvus",
        "milvus_lite",
        "tantivy",
        "opensearchpy",
        "elasticsearch",
        "psycopg",
        "psycopg2",
        "sqlalchemy",
        "sqlite3",
        "aiokafka",
        "kafka",
        "confluent_kafka",
    }
)
DOMAIN_BANNED_FIRST_PARTY = frozenset({"adapters", "lockstep", "chaos", "bench"})


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a first-party module's dotted name, or a third-party top-level name
    line: int
    top_level: bool
    # The import names a module inside ``target``, which Python runs first.
    parent: bool = False
    # Under ``if TYPE_CHECKING:``: for annotations, never run.
    typing_only: bool = False


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


ImportNode = ast.Import | ast.ImportFrom


def _import_nodes(
    body: list[ast.stmt], top_level: bool, typing_only: bool = False
) -> Iterator[tuple[ImportNode, bool, bool]]:
    """Every import statement under ``body``, with whether it runs when the module is imported
    and whether it is there for annotations only (under ``if TYPE_CHECKING:``)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, top_level, typing_only
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _import_nodes(node.body, False, typing_only)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.body, False, True)
            yield from _import_nodes(node.orelse, top_level, typing_only)
        else:  # if, class bodies, try, with, for, while, match: run where their statement runs
            for field in ("body", "orelse", "finalbody"):
                yield from _import_nodes(getattr(node, field, []), top_level, typing_only)
            for clause in [*getattr(node, "handlers", []), *getattr(node, "cases", [])]:
                yield from _import_nodes(clause.body, top_level, typing_only)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _first_party(name: str, modules: dict[str, Path]) -> str | None:
    """The longest first-party module ``name`` names or lies inside, else None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(importer: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """What ``importer`` imports: first-party modules by name, anything else by top-level name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node, top_level, typing_only in _import_nodes(tree.body, True):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = _resolve(importer, is_package, node)
            # ``from pkg import name`` imports the submodule pkg.name when there is one.
            names = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            names = names or [base]
        for name in names:
            target = _first_party(name, modules)
            if target is None:
                yield Import(importer, name.split(".")[0], node.lineno, top_level, typing_only=typing_only)
                continue
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            for parent in _parents(target, modules):
                yield Import(importer, parent, node.lineno, top_level, parent=True, typing_only=typing_only)
            yield Import(importer, target, node.lineno, top_level, typing_only=typing_only)


def _parents(module: str, modules: dict[str, Path]) -> list[str]:
    parts = module.split(".")
    return [p for p in (".".join(parts[:end]) for end in range(1, len(parts))) if p in modules]


def all_imports() -> list[Import]:
    modules = first_party_modules()
    known = {**modules, **{module_name(p): p for pkg in OTHER_FIRST_PARTY for p in (ROOT / pkg).rglob("*.py")}}
    return [imp for name, path in modules.items() for imp in imports_of(name, path, known)]


def package_of(module: str) -> str:
    return module.split(".")[0]


def shortest_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A shortest cycle in ``graph`` (its first node repeated at the end), or None."""
    best: list[str] | None = None
    for start in sorted(graph):
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            if start in graph.get(node, ()):
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                cycle = [*reversed(path), start]
                if best is None or len(cycle) < len(best):
                    best = cycle
                break
            for nxt in sorted(graph.get(node, ())):
                if nxt not in previous and nxt != start:
                    previous[nxt] = node
                    queue.append(nxt)
    return best


def module_graph(imports: list[Import], *, top_level_only: bool = True) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (a package it imports from
    counts only where the import runs its ``__init__`` at import time; an import for
    annotations only never counts: a Protocol and its implementation may name each other)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        counted = imp.top_level if top_level_only else not (imp.parent or imp.typing_only)
        if counted and package_of(imp.target) in PACKAGES and imp.target != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.target)
    return graph


def package_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        src, dst = package_of(imp.importer), package_of(imp.target)
        if imp.top_level and dst in PACKAGES and dst != src:
            graph.setdefault(src, set()).add(dst)
    return graph


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports()


def test_the_graph_sees_known_imports(imports: list[Import]) -> None:
    """The reader finds imports of every shape: plain, from a submodule, nested in a function, typing-only."""
    found = {(i.importer, i.target, i.top_level) for i in imports}
    assert ("coordinator.apply", "coordinator.errors", True) in found
    assert ("lockstep.cli", "lockstep.audit_cli", True) in found
    assert ("lockstep.cli", "lockstep.settings", False) in found
    assert any(i.importer == "lockstep.cli" and i.target == "lockstep.service" and not i.top_level for i in imports)
    assert ("lockstep", "lockstep.api", False) in found
    assert ("lockstep", "lockstep.api", True) not in found


def test_shortest_cycle_reports_the_loop() -> None:
    """The cycle finder returns a closed path through the loop and None for a DAG."""
    assert shortest_cycle({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == ["a", "b", "c", "a"]
    assert shortest_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_type_checking_and_function_imports_are_not_top_level() -> None:
    """Imports under ``if TYPE_CHECKING:`` or inside a function do not run at import time; the
    first are for annotations only."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import a\n"
        "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
        "try:\n    import d\nexcept ImportError:\n    import e\n"
        "def f():\n    import g\n"
        "class K:\n    import h\n"
        "if a:\n    import i\n"
    )
    nodes = _import_nodes(ast.parse(source).body, True)
    found = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name): (top, typing) for n, top, typing in nodes}
    assert {name: top for name, (top, _) in found.items()} == {
        "typing": True, "a": True, "b": False, "c": True, "d": True, "e": True, "g": False, "h": True, "i": True
    }
    assert [name for name, (_, typing) in found.items() if typing] == ["b"]


def test_no_module_cycle(imports: list[Import]) -> None:
    """No first-party module reaches itself through module-top-level imports."""
    cycle = shortest_cycle(module_graph(imports))
    assert cycle is None, "module import cycle: " + " -> ".join(cycle or [])


def test_no_two_modules_need_each_other(imports: list[Import]) -> None:
    """Not even an import inside a function closes a loop between modules: a deferred import
    hides a cycle from Python, not the tangle from a reader."""
    cycle = shortest_cycle(module_graph(imports, top_level_only=False))
    assert cycle is None, "module import cycle (some import inside a function): " + " -> ".join(cycle or [])


def test_no_package_cycle(imports: list[Import]) -> None:
    """The packages' module-top-level imports form a DAG (coordinator at the bottom)."""
    cycle = shortest_cycle(package_graph(imports))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


def outward_from_domain(imports: list[Import]) -> list[str]:
    return [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in imports
        if package_of(i.importer) == "coordinator"
        and not i.parent
        and (package_of(i.target) in DOMAIN_BANNED_FIRST_PARTY or i.target in DOMAIN_BANNED_THIRD_PARTY)
    ]


def test_the_domain_ban_catches_deferred_imports() -> None:
    """An import of Ray or an adapter inside a domain function counts; one of the domain's own does not."""
    deferred = [
        Import("coordinator.shard", "ray", 7, top_level=False),
        Import("coordinator.apply", "adapters.vector.milvus", 9, top_level=False),
        Import("coordinator.apply", "coordinator.errors", 3, top_level=True),
    ]
    assert outward_from_domain(deferred) == [
        "coordinator.shard:7 imports ray",
        "coordinator.apply:9 imports adapters.vector.milvus",
    ]


def test_the_domain_imports_no_adapter_app_or_client(imports: list[Import]) -> None:
    """coordinator imports neither adapters, the app, chaos, bench, Ray nor a store client, at any level."""
    bad = outward_from_domain(imports)
    assert not bad, "the domain reaches outward:\n" + "\n".join(bad)


def test_bench_does_not_import_tests(imports: list[Import]) -> None:
    """The benchmarks own what they run: bench imports nothing from tests/, at any level."""
    bad = [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in imports
        if package_of(i.importer) == "bench" and package_of(i.target) == "tests" and not i.parent
    ]
    assert not bad, "bench imports tests:\n" + "\n".join(bad)


# Where the vector adapter may be constructed directly: its own package, the composition root,
# and the port's contract tests (which exercise the adapter itself).
VECTOR_BUILDERS = ("adapters/", "lockstep/bootstrap.py", "tests/contract/")


def _constructions(path: Path, class_name: str) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == class_name or getattr(node.func, "attr", None) == class_name)
    ]


def test_vector_indexes_are_built_by_the_composition_root() -> None:
    """Outside the adapter, the composition root and the contract tests, a Milvus collection is
    opened through ``build_vector``: a new vector store kind touches one module."""
    paths = [p for pkg in (*PACKAGES, *OTHER_FIRST_PARTY) for p in sorted((ROOT / pkg).rglob("*.py"))]
    built = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in paths
        if not str(p.relative_to(ROOT)).startswith(VECTOR_BUILDERS)
        for line in _constructions(p, "MilvusVectorIndex")
    ]
    assert built == [], "MilvusVectorIndex built outside lockstep.bootstrap.build_vector:\n" + "\n".join(built)
    assert _constructions(ROOT / "lockstep/bootstrap.py", "MilvusVectorIndex"), "the check looks for the real name"


def test_one_batched() -> None:
    """Cutting items into batches is written once, in coordinator/batching.py, for every layer."""
    paths = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    defined = [
        f"{p.relative_to(ROOT)} {node.name}"
        for p in paths
        for node in ast.parse(p.read_text(), filename=str(p)).body
        if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "batched"
    ]
    assert defined == ["coordinator/batching.py batched"], "batched is written more than once:\n" + "\n".join(defined)
