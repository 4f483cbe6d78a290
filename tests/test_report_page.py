"""``cdist report``: one self-contained page per run folder, checked in a real headless browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cdist import cli
from cdist.report_page import run_page

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "results" / "entity_tracking"  # the zoo's Table 1, committed
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium as root on a closed network: no sandbox, no background connections (which are refused
# here, many at a time, and slow the start)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_page_of_a_table_folder_has_every_section(tmp_path):
    page = run_page(TABLE)
    for section in ('id="table"', 'id="circuits"', 'id="head-maps"',
                    'id="settings-and-commits"'):
        assert section in page
    assert "Primary comparison" in page and "<table>" in page
    assert "<script src=" not in page and "<link " not in page  # nothing to fetch
    assert page.count('class="figure"') >= 3


def test_head_maps_and_diagnostics_open_one_at_a_time_and_figures_sit_side_by_side(tmp_path):
    """A folder with three head maps and their diagnostics: each map a section of its own whose
    summary says how crowded it is, the first open; each map's matrix and links in one row."""
    from cdist.checkpoints import atomic_write_json
    from cdist.matching import HeadMap
    from cdist.records import write_record
    from cdist.types import Head, HeadPair

    students, teachers = (Head(0, 0), Head(0, 1), Head(1, 0)), (Head(0, 2), Head(1, 1))
    run = tmp_path / "run"
    (run / "head_maps").mkdir(parents=True)
    for name, picks in (("one", (0, 1, 0)), ("two", (0, 0, 0)), ("three", (1, 0, 1))):
        pairs = tuple(HeadPair(s, teachers[t]) for s, t in zip(students, picks, strict=True))
        write_record(HeadMap(pairs, students, teachers, torch.rand(3, 2), "distance",
                             "ablation"), run / "head_maps" / f"{name}.json")
    atomic_write_json({name: {"pairs": [], "flags": ["crowded"]} for name in ("one", "two")},
                      run / "diagnostics.json")
    page = run_page(run)
    maps = page.split('id="head-maps"')[1].split("</section>")[0]
    assert maps.count("<details") == 3 and maps.count("<details open>") == 1
    assert maps.index("<details open>") == maps.index("<details")
    assert "two: 3 pairs, 3 student heads to 1 teacher heads; crowded: a0.h2 takes 3" in maps
    assert maps.count('<div class="row">') == 3  # matrix beside links, per map
    diagnostics = page.split('id="diagnostics"')[1].split("</section>")[0]
    assert diagnostics.count("<details") == 2 and "one: 0 pairs, 1 flags" in diagnostics


def test_report_refuses_a_folder_with_nothing_of_cdist(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "holds nothing cdist wrote" in err[0]
    assert "is not a run folder" in err[1]


def _render(page_path: Path, shot: Path) -> tuple[int, int, list, list]:
    """Open ``page_path`` in headless Chromium: (figures, figures rendered, console and page
    errors, requests), with a full-page screenshot at ``shot``."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium (make test installs it where it can)")
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            figures = page.locator("div.figure").count()
            page.wait_for_function(  # every figure drawn
                "Array.from(document.querySelectorAll('div.figure')).every("
                "d => d.querySelector('.js-plotly-plot .main-svg'))", timeout=60_000)
            rendered = page.evaluate(
                "Array.from(document.querySelectorAll('div.figure')).filter("
                "d => d.querySelector('.js-plotly-plot .main-svg') && "
                "d.querySelector('.js-plotly-plot g.trace, .js-plotly-plot .hm')).length")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return figures, rendered, errors, requests


@pytest.mark.slow
def test_page_renders_in_a_headless_browser(tmp_path):
    """Every plot renders (an SVG inside each plotly div), with no console error or page error,
    from a file:// URL with the network unused; a screenshot is kept."""
    page_path = cli.run(["report", str(TABLE), "--page", str(tmp_path / "report.html")])
    figures, rendered, errors, requests = _render(page_path, tmp_path / "report.png")
    assert figures >= 3 and rendered == figures
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
    assert (tmp_path / "report.png").stat().st_size > 50_000


@pytest.mark.slow
def test_a_pipeline_folder_page_renders_too(tok, tmp_path, monkeypatch):
    """The page of a folder made step by step (discover, match, distill on tiny checkpoints),
    named as a user types it (relative to the working folder): scans, search groups, a head map
    and training curves, all drawn."""
    from cdist.models import new_llama, save_llama

    ckpt = {}
    for role, seed in (("teacher", 0), ("student", 1)):
        model = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                          vocab_size=len(tok), seed=seed, tokenizer=tok)
        ckpt[role] = str(save_llama(model, tmp_path / role, tokenizer=tok))
    monkeypatch.chdir(tmp_path)
    out = "run"
    small = ["--val-items", "24", "--test-items", "40", "--ood-items", "16", "--reference-items",
             "32", "--discovery-items", "24", "--ood-boxes", "3", "--n-random", "1",
             "--min-effect", "0", "--min-faithfulness", "0", "--device", "cpu"]
    cli.run(["discover", "--teacher", ckpt["teacher"], "--student", ckpt["student"], *small,
             "--out", out])
    cli.run(["match", "--matchers", "ablation", "--out", out])
    cli.run(["distill", "--out", out, "--steps", "2", "--eval-every", "1", "--batch-size", "8",
             "--train-items", "16", "--lr", "1e-3", "--matcher", "ablation"])
    # the run's record is in its own folder, not under a second copy of the relative path
    assert [str(p) for p in Path(out).rglob("eval.json")] == [
        "run/runs/n16/circuit_distilled-CE+Align_CKA-seed0/eval.json"]
    page_path = cli.run(["report", out])
    figures, rendered, errors, requests = _render(page_path, tmp_path / "pipeline.png")
    assert figures >= 4 and rendered == figures
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
