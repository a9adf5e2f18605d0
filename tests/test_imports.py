"""The modules of ``bpfree`` import one another without a cycle.

Every ``import`` and ``from ... import`` counts, relative or absolute, at module level or inside
a function (a lazy import is still an edge: it only moves the cycle to run time). An import of
a package is an edge to its ``__init__``; ``from P import name`` is an edge to ``P.name`` when that
is a module, else to ``P``. Importing a module does not count as importing its parent packages
(so a package ``__init__`` that imports its own submodules is no cycle).

Run as a script (``python tests/test_imports.py``) to print the graph's cycles, if any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "bpfree"


def modules(src: Path = SRC, root: str = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module under ``src/root`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` (file ``path``) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def target(dotted: str) -> str | None:
        """``dotted`` or, for a name inside a module, the nearest enclosing module we know."""
        while dotted:
            if dotted in known:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(target(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else target(base))
    found.discard(None)
    found.discard(name)
    return found


def graph(src: Path = SRC, root: str = ROOT) -> dict[str, set[str]]:
    known = modules(src, root)
    return {name: imports(name, path, known) for name, path in known.items()}


def components(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(g) + 100))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle in each strongly connected component."""
    return [_one_cycle(g, set(c)) for c in components(g)]


def report(g: dict[str, set[str]]) -> str:
    """Each cycle, with all the modules caught in it."""
    return "\n".join(f"{' -> '.join(_one_cycle(g, set(c)))}  (caught in it: {', '.join(c)})"
                     for c in components(g))


def _one_cycle(g: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(g[v] & comp):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError("not a strongly connected component")  # pragma: no cover


def test_the_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("import os\nfrom .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom ..b import f\n")
    g = graph(tmp_path, "pkg")
    assert g == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(),
                 "pkg.sub.c": {"pkg.a", "pkg.b"}}
    assert cycles(g) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "c.py").write_text("from .. import thing\n")  # a name of pkg/__init__
    assert cycles(graph(tmp_path, "pkg")) == [["pkg", "pkg.a", "pkg.b", "pkg.sub.c", "pkg"]]


def test_bpfree_has_no_import_cycle():
    g = graph()
    assert "bpfree.train.loop" in g and "bpfree.cli" in g
    assert not components(g), "import cycles:\n" + report(g)


if __name__ == "__main__":
    g = graph()
    print(report(g) or "no import cycle")
    sys.exit(1 if components(g) else 0)
