"""``experiments/explore_circuits.ipynb`` runs top to bottom (it is committed without outputs, so it
cannot go stale unnoticed)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "explore_circuits.ipynb"


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel runs in a scratch folder: nothing the notebook writes lands in the checkout
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []
    for expected in ("teacher accuracy", "faithfulness", "pairs:", "CE + Align CKA: test accuracy"):
        assert expected in text
    # plotly's "notebook" renderer: HTML with plotly.js inlined (no CDN), one output per figure
    figures = sum("Plotly.newPlot" in o.get("data", {}).get("text/html", "")
                  for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures >= 5  # pattern, scan, each searched group, head map
