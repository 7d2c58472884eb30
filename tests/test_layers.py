"""The house rules of DESIGN.md, held on the source: every import points down the layer list, no two
modules import each other (directly or round a longer circle), and each floor imports no heavier
library than it may. Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mcts", "critics", "rewards", "benchmarks")

# Floor of a module: the first entry whose prefix matches (lower = further down). DESIGN.md's list.
FLOORS = [
    (1, ("mcts.tree", "mcts.kernels")),
    (2, ("mcts.tasks", "mcts.base", "mcts.finished", "mcts.merge", "mcts.reference", "mcts.synthetic")),
    (3, ("mcts.search",)),
    (4, ("mcts", "critics")),
    (
        5,
        (
            "rewards.stats",
            "rewards.derive",
            "rewards.records",
            "rewards.export",
            "rewards.card",
            "rewards.audit",
            "rewards.critic_data",
        ),
    ),
    (6, ("rewards",)),
    (7, ("benchmarks",)),
]
# Libraries a floor may not import (the search core stays free of models, clusters and text models).
FORBIDDEN = {1: ("torch", "transformers", "ray"), 2: ("torch", "transformers", "ray"), 3: ("torch", "ray")}


def floor(module: str) -> int:
    for n, prefixes in FLOORS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return n
    raise AssertionError(f"{module} is on no floor of DESIGN.md's list: add it to FLOORS")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def imported(f: Path, name: str) -> set[str]:
    """Every module name an import statement of `f` names (relative imports resolved)."""
    found: set[str] = set()
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    mods = modules()
    edges = {}
    for name, f in mods.items():
        targets = set()
        for m in imported(f, name):
            # `from rewards import derive` names rewards.derive; `import rewards.derive` too
            while m and m not in mods:
                m = m.rpartition(".")[0]
            if m and m != name and m not in PACKAGES:
                targets.add(m)
        edges[name] = targets
    return edges


def test_every_import_points_down_the_layer_list():
    up = [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, targets in graph().items()
        for b in sorted(targets)
        if floor(b) > floor(a)
    ]
    assert not up, "imports up the layer list:\n" + "\n".join(up)


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("level", sorted(FORBIDDEN))
def test_low_floors_import_no_heavy_library(level):
    bad = [
        f"{name} imports {m}"
        for name, f in modules().items()
        if name not in PACKAGES and floor(name) == level
        for m in sorted(imported(f, name))
        if m.split(".")[0] in FORBIDDEN[level]
    ]
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and circle are found."""
    pkg = tmp_path / "mcts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tree.py").write_text("from mcts import search\n")  # floor 1 -> floor 3, and back
    (pkg / "search.py").write_text("import mcts.tree\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGES", ("mcts",))
    edges = graph()
    assert edges == {"mcts": set(), "mcts.tree": {"mcts.search"}, "mcts.search": {"mcts.tree"}}
    with pytest.raises(AssertionError, match="mcts.tree \\(floor 1\\) imports mcts.search"):
        test_every_import_points_down_the_layer_list()
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circle()


def test_only_the_launcher_imports_ray():
    users = sorted(
        name
        for name, f in modules().items()
        if name not in PACKAGES and any(m.split(".")[0] == "ray" for m in imported(f, name))
    )
    assert users == ["rewards.launcher"]
