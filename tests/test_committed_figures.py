"""Committed HTML figures open offline: none loads a script from the network, and every script it
loads lies beside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"<script[^>]*\ssrc=\"([^\"]+)\"")


def committed_html() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.html"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    return [REPO / f for f in listed]


def test_committed_html_figures_load_their_scripts_from_beside_them():
    pages = committed_html()
    assert pages  # the repository ships figures; an empty list would make this test vacuous
    remote, missing = [], []
    for page in pages:
        for src in SCRIPT.findall(page.read_text(errors="replace")):
            if re.match(r"^(https?:)?//", src):
                remote.append(f"{page.relative_to(REPO)}: {src}")
            elif not (page.parent / src).is_file():
                missing.append(f"{page.relative_to(REPO)}: {src}")
    assert remote == [] and missing == []


def test_the_check_sees_a_network_script(tmp_path):
    page = tmp_path / "f.html"
    page.write_text('<script charset="utf-8" src="https://cdn.plot.ly/plotly-4.1.1.min.js" '
                    'integrity="x"></script>')
    assert SCRIPT.findall(page.read_text()) == ["https://cdn.plot.ly/plotly-4.1.1.min.js"]
