"""The library's shape, held from its source (``tests/code_shape.py``): no function over 80 lines,
no module over 500, no import cycle (imports inside functions count), TransformerLens behind
``cdist.models``, and a vocabulary (``cdist.types``) that does no file I/O and draws nothing."""

from __future__ import annotations

import ast

import code_shape


def test_no_function_over_80_lines_and_no_module_over_500():
    long = [(q, n) for kind, q, n in code_shape.definitions() if kind == "function" and n > 80]
    big = {m: n for m, n in code_shape.module_lines().items() if n > 500}
    assert long == [] and big == {}


def test_no_import_cycles():
    assert code_shape.cycles() == []


def test_the_measurements_see_what_they_measure(tmp_path, monkeypatch):
    # a package of two modules that import each other inside functions, and one long function:
    # the measurements must find both, or the tests above could not fail
    pkg = tmp_path / "cdist"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cdist import b\n" + "    x = 1\n" * 90)
    (pkg / "b.py").write_text("def g():\n    from cdist.a import f\n")
    monkeypatch.setattr(code_shape, "LIBRARY", pkg)
    assert code_shape.cycles() == [["cdist.a", "cdist.b"]]
    assert ("function", "cdist.a.f", 92) in code_shape.definitions()


def test_transformer_lens_is_imported_by_the_models_package_alone():
    importers = sorted(m for m, path in code_shape.modules().items()
                       if any(isinstance(node, (ast.Import, ast.ImportFrom))
                              and "transformer_lens" in ast.unparse(node)
                              for node in ast.walk(ast.parse(path.read_text()))))
    assert importers and all(m == "cdist.models" or m.startswith("cdist.models.")
                             for m in importers)


def test_the_vocabulary_imports_no_io_and_no_plotting():
    graph = code_shape.import_graph()
    assert graph["cdist.types"] <= {"cdist.errors"}


def test_no_upward_imports():
    """Algorithms and records below the experiment never import the stages, the reports or the
    command line that are built on them."""
    top = ("cdist.pipeline", "cdist.cli", "cdist.report", "cdist.report_page", "cdist.__main__")
    upward = {m: sorted(t for t in ts if t.startswith(top))
              for m, ts in code_shape.import_graph().items() if not m.startswith(top)}
    assert {m: ts for m, ts in upward.items() if ts} == {}


def test_every_progress_bar_is_closed_by_a_with_block():
    """A bar's heartbeat is a thread that prints until the bar closes: a bar left open by an
    exception (a scan interrupted in a notebook) would print its status every 30 s for good, so
    every bar the library opens is the context of a ``with``."""
    opened, in_with = [], set()
    for module, path in code_shape.modules().items():
        tree = ast.parse(path.read_text())
        names = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "cdist.progress" for a in node.names if a.name == "bar"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in names:
                opened.append((module, node.lineno))
            if isinstance(node, (ast.With, ast.AsyncWith)):
                in_with |= {(module, item.context_expr.lineno) for item in node.items
                            if isinstance(item.context_expr, ast.Call)}
    assert len(opened) >= 7  # the scans share one (RunningSums.bar)
    assert [site for site in opened if site not in in_with] == []
