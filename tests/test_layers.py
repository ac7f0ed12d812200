"""The import graph keeps ARCHITECTURE's rule: layers point one way (cli -> applications -> pipeline -> roles ->
hub/data), roles do not import each other, and no module imports itself round a circle.

Imports are read with ``ast`` from every file, in function bodies too (a lazy import is still an arrow), and
``if TYPE_CHECKING`` ones as well (a type-only circle is still a circle to a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RECON = Path(__file__).resolve().parents[1] / "recon"

# Every top-level module or package of recon, by layer (lowest first). An import may go down or sideways within a
# layer, never up; the roles layer may not go sideways (a backend family stands alone).
LAYERS = (
    (
        "config",
        "data",
        "captions_io",
        "preprocess",
        "tokenizers",
        "tiny",
        "stats",
        "kendall",
        "run_args",
    ),  # the floor: no model loading
    ("hub", "runs", "fingerprint", "report"),  # model ids, run directories and what reads them
    ("captioners", "generators", "similarity"),  # the roles
    ("pipeline",),
    ("jobs", "metrics", "shapes"),  # dataset loops, the torchmetrics Metric, the shapes worlds
    ("scoring", "train"),  # caption-set scoring and meta-evaluation, joint finetuning
    ("cli", "__main__", "__init__"),  # the command and the public API
)
ROLES = 2
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = ["recon", *path.relative_to(RECON).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = RECON.parent / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """recon modules ``path`` imports anywhere in it, with line numbers (``from m import f`` counts as ``m``;
    ``from pkg import mod`` as ``pkg.mod``)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name.startswith("recon") and not is_module(name):
                name = name.rpartition(".")[0]
            if name.startswith("recon") and name != here:
                found.append((name, node.lineno))
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, "file:line")]"""
    return {
        module_name(p): [(m, f"{p.relative_to(RECON.parent)}:{line}") for m, line in imported_modules(p)]
        for p in sorted(RECON.rglob("*.py"))
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_layer():
    units = {unit(m) for m in graph()}
    assert not units - set(LAYER), (
        f"place these in LAYERS (and README's Layout): {sorted(units - set(LAYER))}"
    )


def test_imports_point_down_and_roles_stand_alone():
    wrong = []
    for module, imports in graph().items():
        for target, where in imports:
            a, b = unit(module), unit(target)
            if a == b:
                continue
            if LAYER[b] > LAYER[a]:
                wrong.append(f"{where}: {module} imports {target}, a layer up")
            elif LAYER[b] == LAYER[a] == ROLES:
                wrong.append(f"{where}: the role {a} imports the role {b}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    modules = graph()
    edges = {m: {t for t, _ in imports} for m, imports in modules.items()}
    # a package's __init__ re-exporting its own modules is not a circle with them
    edges = {
        m: {t for t in ts if not (m == t.rpartition(".")[0] and is_package(m))} for m, ts in edges.items()
    }
    assert not cycles(edges)
    units = {}
    for m, ts in edges.items():
        units.setdefault(unit(m), set()).update(unit(t) for t in ts if unit(t) != unit(m))
    assert not cycles(units)


def is_package(module: str) -> bool:
    return (RECON.parent / module.replace(".", "/") / "__init__.py").exists()


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_circle_finder_finds_circles(edges, expected):
    assert cycles(edges) == expected
