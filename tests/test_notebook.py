"""``experiments/explore_circuits.ipynb`` runs top to bottom (it is committed without outputs, so it
cannot go stale unnoticed), prints what its text says it prints, and points only at things that
exist: README sections, repository files and ``cdist`` subcommands."""

from __future__ import annotations

import re
from itertools import takewhile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "explore_circuits.ipynb"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def _markdown() -> str:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation (backticks,
    parentheses, colons) dropped, spaces to hyphens. Lines inside fenced code are not headings."""
    anchors, fenced = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} +(.+?) *#* *$", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return anchors


def test_heading_anchors_follow_github():
    text = ("# A `cdist` command: (Tables 1 and 2)\n"
            "```bash\n# a comment, not a heading\n```\n"
            "## Set-up")
    assert heading_anchors(text) == {"a-cdist-command-tables-1-and-2", "set-up"}


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_links_point_at_what_exists():
    """Every relative link resolves to a file, and an anchor into a Markdown file to one of its
    headings (the old last cell named a README section that did not exist)."""
    links = [t for t in LINK.findall(_markdown()) if not t.startswith(("http://", "https://"))]
    readme_links = [t for t in links if t.split("#")[0].endswith("README.md") and "#" in t]
    assert readme_links, "the notebook should point its reader at README sections"
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        file = (NOTEBOOK.parent / path).resolve()
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and anchor not in heading_anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path}")
    assert broken == []


def test_notebook_names_files_that_exist():
    """A code span that starts with a folder of the repository (``cdist/cka.py``) names a path
    that exists; spans for what the notebook makes (``notebook_runs/``) start elsewhere."""
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    named = [s for s in CODE_SPAN.findall(_markdown())
             if " " not in s and "/" in s and s.split("/")[0] in top]
    assert named, "the notebook should name the modules that implement its steps"
    assert [s for s in named if not (ROOT / s).exists()] == []


def test_notebook_names_commands_that_exist(capsys):
    """Every ``cdist ...`` code span starts with a real subcommand: its words up to the first flag
    or argument parse with ``--help``."""
    from cdist.cli import parser

    commands = [s for s in CODE_SPAN.findall(_markdown()) if s.startswith("cdist ")]
    assert commands, "the notebook should name the shell commands of its steps"
    for command in commands:
        # "cdist zoo circuits" is two deep; "cdist report RUN_DIR" and "cdist match --matchers"
        # one
        words = list(takewhile(lambda w: re.fullmatch(r"[a-z]+", w), command.split()[1:]))[:2]
        with pytest.raises(SystemExit) as exited:
            parser().parse_args([*words, "--help"])
        assert exited.value.code == 0, f"`{command}`: no such command"
    capsys.readouterr()


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel runs in a scratch folder: nothing the notebook writes lands in the checkout
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    text = "".join(o.get("text", "") for o in outputs)
    number = r"-?\d\.\d{3}"
    for expected in (
        rf"teacher accuracy: {number} on the organisms' form, {number} on the Prakash form",
        r"min_effect='noise' keeps \[.+\]\nmin_effect=0\.01 keeps \[.+\]",
        rf"teacher circuit, \d+ of \d+ heads: .*faithfulness {number}",
        r"at the last token puts \d\.\d\d of its attention on the earlier mention",
        r"student circuit \(mean-ablation ranking\): \[.+\]",
        rf"student circuit, \d+ of \d+ heads: .*faithfulness {number}",
        rf"student \(path patching\) circuit, .*faithfulness {number}",
        r"ablation-baseline-1to1: a\d",
        r"cka-1to1: a\d",
        rf"CE \+ Align CKA +{number} +[-+]\d+\.\d +{number} {number} -> {number}",
        r"exact McNemar p = \d\.\d\d",
        r"reading: the alignment term ",
        r"demonstration, not evidence",
    ):
        assert re.search(expected, text), expected
    # the training histories are kept in a real folder beside the notebook, and read back from it
    for run in ("CE", "CE+Align_CKA"):
        assert (tmp_path / "notebook_runs" / run / "metrics.json").is_file()
    # plotly's "notebook" renderer: HTML with plotly.js inlined (no CDN), one output per figure
    figures = sum("Plotly.newPlot" in o.get("data", {}).get("text/html", "") for o in outputs)
    # the scan, each searched group (3), the value fetcher's attention, the head map as a matrix
    # and as links, the training curves
    assert figures >= 8
