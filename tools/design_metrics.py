"""Design metrics of a checkout (issue #27's closing note): files over 600 lines, the longest
functions, import cycles of the package, config classes, files under benchmarks/results/.

    python tools/design_metrics.py [ROOT]      # ROOT: a checkout or worktree (default: this one)

Stdlib only, and it reads the tree without importing it, so it measures any commit
(``git worktree add /tmp/old <commit>``). ``tests/test_import_graph.py`` asserts on the import
graph built here (``import_graph``, ``cycles``, ``closure``): one place for that code.

The import graph: modules of the installed layout (pyproject's ``packages`` and ``package-dir``:
``schedules/`` is ``mla_compiler.schedules`` ...), an edge for every import of a package module
anywhere in a file (module level, inside functions, ``importlib.import_module("...")`` with a
literal name), absolute or relative. ``from P import name`` is an edge to the module ``P.name``
when there is one, else to ``P``; importing ``a.b.c`` is an edge to ``a.b.c`` only, not to the
packages above it.
"""

from __future__ import annotations

import ast
import collections
import itertools
import sys
from pathlib import Path
from typing import NamedTuple

import tomllib

PACKAGE = "mla_compiler"
LONG_FILE = 600  # lines
PRODUCT = ("mla_compiler", "schedules", "runtime", "model_export")  # folders of product code
GROUPS = {"product": PRODUCT, "tests": ("tests",), "benchmarks": ("benchmarks",)}


class Import(NamedTuple):
    """One import of a package module: where it is and what it names."""

    source: str  # importing module
    target: str  # imported module
    path: Path
    line: int
    lazy: bool  # inside a function (runs when it is called, not at import time)


# ---- the import graph ----------------------------------------------------------------------


def package_dirs(root: Path) -> dict[str, Path]:
    """Package name -> folder, as pyproject's setuptools table installs them."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg.get("package-dir", {})
    out = {}
    for package in cfg["packages"]:
        parts = package.split(".")
        for n in range(len(parts), -1, -1):  # the longest mapped prefix ("" is the root)
            prefix = ".".join(parts[:n])
            if prefix in mapping or n == 0:
                out[package] = root / mapping.get(prefix, "") / Path(*parts[n:])
                break
    return out


def package_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module of the installed layout."""
    modules = {}
    for package, folder in package_dirs(root).items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (its longest known prefix), None for others."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def _function_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def module_imports(
    module: str, path: Path, known: dict[str, Path], *, external: bool = False
) -> list[Import]:
    """Every import of a package module in ``module`` (file ``path``); ``external``: those of
    other packages too, as their top-level name (``from tvm.runtime import vm``: ``tvm``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = _function_lines(tree)
    names: list[tuple[str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.append((full if full in known else base, node))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (
                    isinstance(node.func, ast.Name)
                    and node.func.id in ("import_module", "__import__")
                )
            )
        ):
            names.append((node.args[0].value, node))
    out = []
    for name, node in names:
        target = _resolve(name, known)
        if target is None and external and not name.startswith(f"{PACKAGE}."):
            target = name.partition(".")[0]
        if target is not None and target != module:
            out.append(Import(module, target, path, node.lineno, node.lineno in in_function))
    return sorted(out, key=lambda i: (i.line, i.target))


def import_graph(root: Path) -> dict[str, dict[str, Import]]:
    """module -> {imported module: its first import} over the package of the tree at ``root``."""
    known = package_modules(root)
    graph: dict[str, dict[str, Import]] = {}
    for module, path in known.items():
        edges = graph.setdefault(module, {})
        for imp in module_imports(module, path, known):
            if imp.target not in edges or edges[imp.target].lazy > imp.lazy:  # eager first
                edges[imp.target] = imp
    return graph


def _components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, {})))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    out.append(sorted(component))
    return out


def _shortest_cycle(graph: dict[str, dict[str, Import]], start: str, within: set[str]) -> list:
    """The shortest path ``start -> ... -> start`` inside ``within`` (breadth first)."""
    parent: dict[str, str] = {}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt not in within:
                continue
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return []


def cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest cycle through each module of every cyclic component (duplicates dropped),
    as ``[a, b, ..., a]``; empty when the graph has no cycle."""
    found, seen = [], set()
    for component in _components(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        for start in component:
            cycle = _shortest_cycle(graph, start, members)
            key = frozenset(itertools.pairwise(cycle))
            if cycle and key not in seen:
                seen.add(key)
                found.append(cycle)
    return found


def cyclic_components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    return [c for c in _components(graph) if len(c) > 1]


def format_cycle(graph: dict[str, dict[str, Import]], cycle: list[str], root: Path) -> str:
    """``a -> b (a.py:12, lazy) -> a (b.py:3)``: each step with the line that imports."""
    steps = [cycle[0]]
    for a, b in itertools.pairwise(cycle):
        imp = graph[a][b]
        where = f"{imp.path.relative_to(root)}:{imp.line}{', lazy' if imp.lazy else ''}"
        steps.append(f"{b} ({where})")
    return " -> ".join(steps)


def closure(
    graph: dict[str, dict[str, Import]], modules, *, eager: bool = False
) -> dict[str, list[str]]:
    """Every module reachable from ``modules``, with the import chain that reaches it;
    ``eager``: through module-level imports only (what importing ``modules`` runs)."""
    chain = {m: [m] for m in modules}
    queue = collections.deque(sorted(chain))
    while queue:
        node = queue.popleft()
        for nxt, imp in sorted(graph.get(node, {}).items()):
            if eager and imp.lazy:
                continue
            if nxt not in chain:
                chain[nxt] = [*chain[node], nxt]
                queue.append(nxt)
    return chain


# ---- the other metrics ---------------------------------------------------------------------


def python_files(root: Path, folders) -> list[Path]:
    files = []
    for folder in folders:
        files += [p for p in sorted((root / folder).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def long_files(root: Path, folders) -> tuple[int, list[tuple[int, str]]]:
    """(number of files, [(lines, path)] of those over LONG_FILE lines, longest first)."""
    files = python_files(root, folders)
    sizes = [(len(p.read_text().splitlines()), str(p.relative_to(root))) for p in files]
    return len(files), sorted((s for s in sizes if s[0] > LONG_FILE), reverse=True)


def functions(root: Path, folders) -> list[tuple[int, str, str]]:
    """(lines, qualified name, path:line) of every function and method, longest first."""
    out = []

    def visit(node, prefix: str, rel: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((child.end_lineno - child.lineno + 1, name, f"{rel}:{child.lineno}"))
                visit(child, f"{name}.", rel)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", rel)
            else:
                visit(child, prefix, rel)

    for path in python_files(root, folders):
        visit(ast.parse(path.read_text(), str(path)), "", path.relative_to(root))
    return sorted(out, key=lambda f: (-f[0], f[1]))


def _is_dataclass(node: ast.ClassDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def config_classes(root: Path, folders) -> list[tuple[str, str]]:
    """(class name, path:line) of every dataclass whose name ends with ``Config``."""
    out = []
    for path in python_files(root, folders):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
                if _is_dataclass(node):
                    out.append((node.name, f"{path.relative_to(root)}:{node.lineno}"))
    return sorted(out)


def report(root: Path) -> str:
    root = root.resolve()
    lines = [f"design metrics of {root}"]
    lines.append(f"python files over {LONG_FILE} lines:")
    for group, folders in GROUPS.items():
        total, long = long_files(root, folders)
        lines.append(f"  {group} ({', '.join(folders)}): {len(long)} of {total} files")
        lines += [f"    {n:5d}  {p}" for n, p in long]
    lines.append("longest functions:")
    for group, folders in GROUPS.items():
        top = functions(root, folders)[: 5 if group == "product" else 1]
        lines += [f"  {group}: {n} lines  {name}  ({where})" for n, name, where in top]
    graph = import_graph(root)
    found = cycles(graph)
    components = cyclic_components(graph)
    n_edges = sum(len(e) for e in graph.values())
    lines.append(
        f"import cycles: {len(components)} cyclic components, {len(found)} cycles "
        f"({len(graph)} modules, {n_edges} import edges)"
    )
    for component in components:
        lines.append(f"  component of {len(component)}: {', '.join(component)}")
    lines += [f"    {format_cycle(graph, c, root)}" for c in found]
    configs = config_classes(root, PRODUCT)
    counts = collections.Counter(name for name, _ in configs)
    shared = {n: c for n, c in counts.items() if c > 1}
    lines.append(
        f"config classes (dataclasses named *Config, product code): {len(configs)}, "
        f"{len(counts)} names, {sum(shared.values())} classes share {len(shared)} names"
    )
    for name, where in configs:
        lines.append(f"  {name:24s} {where}{'  (shared name)' if name in shared else ''}")
    results = root / "benchmarks" / "results"
    n_results = sum(p.is_file() for p in results.rglob("*")) if results.is_dir() else 0
    lines.append(f"files under benchmarks/results/: {n_results}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
