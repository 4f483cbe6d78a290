"""The shape of the library's code, measured from its source: function, class and module lengths
and the import graph between cdist's modules (imports inside functions included, since those hide
cycles rather than remove them). ``tests/test_code_shape.py`` holds the library to its limits;
``python tests/code_shape.py`` prints the measurements."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "cdist"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the library."""
    found = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def definitions() -> list[tuple[str, str, int]]:
    """(kind, qualified name, lines) of every function, method and class, docstrings included."""
    rows = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        stack = [(node, name) for node in tree.body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                qual = f"{prefix}.{node.name}"
                rows.append((kind, qual, node.end_lineno - node.lineno + 1))
                stack += [(child, qual) for child in node.body]
    return rows


def module_lines() -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules().items()}


def import_graph() -> dict[str, set[str]]:
    """Module -> the cdist modules it imports anywhere in its file (``TYPE_CHECKING`` blocks
    left out: they run only under a type checker)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                # ``from package import submodule`` imports the submodule; a name that is no
                # module comes from the package itself
                named = {f"{base}.{a.name}" for a in node.names}
                targets |= named | ({base} if named - set(known) else set())
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles() -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted. A package
    that imports its submodules (to re-export them) and a submodule that imports its package
    form a cycle too: Python runs the package's ``__init__`` first either way."""
    graph = import_graph()
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


if __name__ == "__main__":
    rows = definitions()
    for kind in ("function", "class"):
        longest = sorted((r for r in rows if r[0] == kind), key=lambda r: -r[2])[:8]
        print(f"longest {kind}s: " + ", ".join(f"{q} {n}" for _, q, n in longest))
    sizes = sorted(module_lines().items(), key=lambda kv: -kv[1])[:8]
    print("largest modules: " + ", ".join(f"{m} {n}" for m, n in sizes))
    print("import cycles: " + ("; ".join(" <-> ".join(c) for c in cycles()) or "none"))
