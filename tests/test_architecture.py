"""The layout of ``utils/``: no import cycle, imports at the top, files and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from utils.paths import REPO_ROOT

UTILS = REPO_ROOT / "utils"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60
# One unit that reads best whole: the Triton kernels of the fast path.
FILE_EXCEPTIONS = {"utils/speed/kernels.py"}
# Imports that stay inside functions: optional heavy packages (they may be absent, or must load after another
# package), the profilers, a Unix-only module, the project's Triton kernels (they import Triton at their top),
# and the one transformers module the fast path needs (a benchmark child imports utils.speed before Unsloth,
# which must patch transformers before transformers loads).
LOCAL_IMPORT_ALLOWED = ("triton", "liger_kernel", "unsloth", "IPython", "cProfile", "pstats", "torch.profiler",
                        "resource", "utils.speed.kernels", "transformers.modeling_outputs")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(UTILS.rglob("*.py"))}


def resolve(name: str, current: str, level: int, is_package: bool) -> str:
    if level == 0:
        return name
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def top_level_imports(path: Path, current: str, known: set[str]) -> set[str]:
    """The ``utils`` modules a module imports when it is imported (its top-level statements)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module or "", current, node.level, path.name == "__init__.py")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # "from utils.x import y": y may be a submodule (utils.x.y) or a name in utils.x
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("utils"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = top_level_imports(path, name, set(mods))
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        for dep in list(deps):
            parts = dep.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in mods)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the edge from a package's ``__init__`` to its own submodules (re-exports)."""
    return {m: {d for d in deps if not (d.startswith(m + ".") and modules()[m].name == "__init__.py")}
            for m, deps in graph.items()}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_utils_modules():
    cycle = find_cycle(package_parents(import_graph()))
    assert cycle is None, " -> ".join(cycle)


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", sorted(UTILS.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_module_layout(path):
    rel = str(path.relative_to(REPO_ROOT))
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if rel not in FILE_EXCEPTIONS:
        assert lines <= MAX_FILE_LINES, f"{rel}: {lines} lines (split it by topic)"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for fn in functions(tree):
        length = fn.end_lineno - fn.lineno + 1
        assert length <= MAX_FUNCTION_LINES, f"{rel}:{fn.lineno} {fn.name}: {length} lines"
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in LOCAL_IMPORT_ALLOWED or name in LOCAL_IMPORT_ALLOWED, (
                    f"{rel}:{node.lineno}: 'import {name}' inside {fn.name}: imports go at the top of the module "
                    "(only optional heavy packages may be imported where they are used)")
