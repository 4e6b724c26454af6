"""The import direction of docs/ARCHITECTURE.md ("Layers"), read from the source with ``ast``.

Every ``import`` counts, at module level or inside a function (lazy imports are how the verbs keep ``--help``
fast, and they still tie the packages together). A part may import parts on lower floors and its own modules,
never a part of its own floor or of a higher one, and no modules may import each other in a circle. The
shipped runtime (``modeling/``) imports only torch, transformers and the standard library, since it runs in
processes where spectra_convert is not installed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spectra_convert"

#: Highest floor first. A part is a top-level module or package of spectra_convert.
FLOORS = [
    {"__main__"},
    {"cli"},  # loads the verbs' shells by name (importlib), so --help imports none of them
    {"commands"},
    {"study"},
    {"recipes"},
    {"surgery", "finetune", "validate", "hub"},
    {"router", "modelio", "textdata", "modelcard", "options"},
    {"dtypes"},
    {"modeling", "errors", "console", "cpu_threads"},
]
FLOOR_OF = {part: level for level, parts in enumerate(FLOORS) for part in parts}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, as absolute dotted names (``from . import x`` names ``pkg.x``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]  # ``from pkg import module``
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_part_is_on_a_floor() -> None:
    parts = {_part(m) for m in _graph() if m != "spectra_convert"}
    assert parts <= set(FLOOR_OF), f"parts on no floor: {sorted(parts - set(FLOOR_OF))}"


def test_imports_only_go_down() -> None:
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            source_part, target_part = _part(module), _part(target)
            if source_part != target_part and FLOOR_OF[target_part] <= FLOOR_OF[source_part]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that are not downward: " + ", ".join(sorted(wrong))


def test_no_circles() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def _optional_imports(path: Path) -> set[str]:
    """Top-level names imported inside ``try`` blocks: what transformers' remote-code import check skips."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Try):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in inner.names}
    return found


def test_runtime_imports_only_torch_and_transformers() -> None:
    """The shipped runtime loads wherever torch and transformers do; numba (the compiled GRU loops) and numpy may
    only come in through a ``try`` import, so a folder loads without them."""
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for path in (PACKAGE / "modeling").glob("*.py"):
        name = _module_name(path)
        optional = _optional_imports(path)
        assert optional <= {"numba", "numpy"}, f"{path.name} try-imports {optional}"
        for module in _imports(path):
            top = module.split(".")[0]
            local = module.startswith(name.rpartition(".")[0] + ".") and module.count(".") >= 2
            assert top in allowed | optional or (local and module.startswith("spectra_convert.modeling")), \
                f"{path.name} imports {module}"


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The graph reads relative, absolute and function-level imports (a checker that saw none would pass)."""
    graph = _graph()
    assert "spectra_convert.modelio.checkpoint" in graph["spectra_convert.surgery.reroute"]
    assert "spectra_convert.surgery.upcycle" in graph["spectra_convert.recipes"]  # imported inside a function
    assert "spectra_convert.router.metrics" in graph["spectra_convert.validate.api"]  # ``from ..router import metrics as M``
