"""The house rules (docs/architecture.md): what each room may import, no import
cycles, and every function within the style limits (60 lines, 8 parameters)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("mlx_diffgem", "cuda_backend", "drafter", "bench")
MAX_LINES, MAX_PARAMS = 60, 8

# room -> the project's rooms it may import (itself always); imports inside a
# function count too (a lazy import is still a dependency).
MAY_IMPORT = {
    "mlx_diffgem/core": set(),
    "mlx_diffgem/mlx_backend": {"mlx_diffgem/core"},
    "cuda_backend": {"mlx_diffgem/core"},
    "drafter": {"mlx_diffgem/core", "mlx_diffgem/mlx_backend", "cuda_backend"},
    "mlx_diffgem/api": {"mlx_diffgem/core", "drafter"},
    "mlx_diffgem/serve": {"mlx_diffgem/api", "mlx_diffgem/core"},
    "mlx_diffgem/cli": {
        "mlx_diffgem",  # __version__
        "mlx_diffgem/api",
        "mlx_diffgem/core",
        "mlx_diffgem/serve",
        "mlx_diffgem/mlx_backend",  # `diffgem convert` is MLX's
    },
}


def _files() -> list[Path]:
    return sorted(p for d in SOURCES for p in (ROOT / d).rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, top_level: bool) -> set[str]:
    """The modules `path` imports (absolute names), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else ast.walk(tree)
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from package import module` imports the module; the package's
            # face only when a name is not a module (filtered by the caller).
            out |= {f"{base}.{a.name}" for a in node.names} | {base}
    return out


def _room(module: str) -> str | None:
    """The room of a project module: mlx_diffgem/core, drafter, ..."""
    parts = module.split(".")
    if parts[0] != "mlx_diffgem":
        return parts[0] if parts[0] in SOURCES else None
    if len(parts) == 1:
        return "mlx_diffgem"
    return f"mlx_diffgem/{parts[1]}"


def _project_modules() -> set[str]:
    return {_module(p) for p in _files()}


@pytest.mark.parametrize("room", sorted(MAY_IMPORT))
def test_rooms_import_only_what_they_may(room):
    known = _project_modules()
    bad = []
    for path in _files():
        if _room(_module(path)) != room:
            continue
        names = _imports(path, top_level=False) & known
        # a package whose submodule is named beside it: the submodule is meant
        names -= {n.rpartition(".")[0] for n in names}
        for name in names:
            there = _room(name)
            if there not in (room, None) and there not in MAY_IMPORT[room]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_core_imports_neither_mlx_nor_torch():
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "mlx_diffgem" / "core").rglob("*.py")
        for name in _imports(p, top_level=False)
        if name.split(".")[0] in ("mlx", "torch")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """Module-level imports form no cycle (a lazy import inside a function may
    break one on purpose: those are not counted)."""
    known = _project_modules()
    graph = {
        _module(p): (_imports(p, top_level=True) & known) - {_module(p)}
        for p in _files()
    }
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_functions_within_the_style_limits():
    over = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            params += (a.vararg is not None) + (a.kwarg is not None)
            params -= bool(a.args and a.args[0].arg in ("self", "cls"))
            if any(ast.unparse(d) == "triton.jit" for d in node.decorator_list):
                params = 0  # a kernel's signature is its launch interface: no structs
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES or params > MAX_PARAMS:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                over.append(f"{where} {node.name}: {lines} lines, {params} params")
    assert not over, "\n".join(over)
