"""One self-contained HTML page for a run folder (``cdist report RUN_DIR``): the table (or, for
a folder of single steps, each model's and trained run's accuracies), the circuits' heatmaps, the
head-correspondence maps (heatmap and links), the training curves, the alignment diagnostics,
the settings and the commits.

Each section is drawn from the files a step left (``cdist.cli.steps``) and left out where there are
none, so the page works for a folder that only has circuits as well as for a finished table.
plotly.js is inlined once, so the page opens offline and can be mailed as one file.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import markdown
import plotly.colors
import plotly.graph_objects as go
import plotly.offline
from plotly.subplots import make_subplots

from cdist import plots
from cdist.checkpoints import atomic_write_text, read_json
from cdist.errors import FileFormatError, MissingFileError, RunFolderError
from cdist.matching import HeadMap
from cdist.pipeline.runs import ood_accuracies
from cdist.records import read_record, records_in
from cdist.report import curve_figure, markdown_table, with_comparisons
from cdist.store import Store
from cdist.types import Circuit, Scan

__all__ = ["run_page", "write_run_page"]

_GENERATOR = "<meta name='generator' content='cdist report_page'>"
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.figure { margin: 1em 0; }
.row { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
details { margin: 0.6em 0; }
summary { cursor: pointer; font-weight: 600; }
nav a { margin-right: 1em; }
"""


def _figure(fig: go.Figure, name: str) -> str:
    # "fig-": plotly draws into document.getElementById(div_id), and a section of the same name
    # (the training figure in the "training" section) would take the plot instead
    return ('<div class="figure">'
            + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                          config={"responsive": False})
            + "</div>")


def _row(figures: list[str]) -> list[str]:
    """Figures side by side, wrapping at the page's width: a 30-layer model's heatmaps are tall and
    narrow, and one under another made SmolLM2's page over 20,000 px long."""
    return [f'<div class="row">{"".join(figures)}</div>'] if figures else []


def _read(path: Path):
    return read_json(path, "restore it, or run the step that writes it again")


def _kept(run: Path, path: Path):
    """What the run folder's store keeps in ``path``."""
    kept = Store(run).kept(path.relative_to(run))
    if kept is None:
        raise FileFormatError(f"{path} is not in this cdist's store layout (made by an earlier "
                              "cdist, or edited); run the step that made it again")
    return kept


def _circuits(run: Path) -> list[str]:
    parts = []
    for role in ("teacher", "student"):
        path = run / f"circuit-{role}.json"
        if not path.is_file():
            continue
        circuit = read_record(Circuit, path)
        groups = "; ".join(f"{g}: {' '.join(map(str, hs))}" for g, hs in circuit.groups.items()
                           if hs)  # a group left empty is not printed as "name: ;"
        parts.append(f"<h3>{role}: {html.escape(circuit.model or '')}</h3>"
                     f"<p>{len(circuit)} heads by {html.escape(circuit.method)} "
                     f"({html.escape(groups)})</p>")
        found = run / f"discovery-{role}.json"
        if found.is_file():
            test = _read(found).get("test", {})
            parts.append("<p>test items: " + ", ".join(
                f"{k.replace('_', ' ')} {v:.3f}" for k, v in test.items() if v is not None)
                + "</p>")
        figures = []
        for path in sorted((run / "scans").glob(f"{role}-*.json")):
            scan = Scan.from_dict(_kept(run, path))
            fig = plots.scan_figure(scan, marked=circuit.heads, title=f"{role}: {path.stem} "
                                    f"({scan.method}, {scan.n_items} items)")
            figures.append(_figure(fig, f"scan-{path.stem}"))
        searched = [(path, name, Scan.from_dict(data))
                    for path in sorted((run / f"search-{role}").glob("*.json"))
                    for name, data in _kept(run, path).items()]
        largest = plots.shared_scale(scan for _, _, scan in searched)  # one scale per search
        for path, name, scan in searched:
            fig = plots.scan_figure(scan, marked=circuit.groups.get(path.stem, ()),
                                    title=f"{role}: path patching, {name}", largest=largest)
            figures.append(_figure(fig, f"search-{role}-{name}"))
        parts += _row(figures)
    return parts


def _head_maps(run: Path) -> list[str]:
    """Each head map twice, side by side: as a heatmap of every pair's score and as links between
    the chosen pairs (which teacher heads are crowded shows there at a glance). Each map is a
    section that opens and closes, its summary line saying how crowded it is; the first is open."""
    maps = records_in(HeadMap, sorted((run / "head_maps").glob("*.json")))  # a user's note: not
    if not maps and (run / "head_map.json").is_file():
        maps = {run / "head_map.json": read_record(HeadMap, run / "head_map.json")}
    parts = []
    for i, (p, hmap) in enumerate(maps.items()):
        students = {pair.student for pair in hmap.pairs}
        teachers = {pair.teacher for pair in hmap.pairs}
        crowded = ", ".join(f"{t} takes {n}" for t, n in hmap.crowded().items())
        line = (f"{p.stem}: {len(hmap.pairs)} pairs, {len(students)} student heads to "
                f"{len(teachers)} teacher heads" + (f"; crowded: {crowded}" if crowded else ""))
        figures = _row([_figure(plots.head_map_figure(hmap), f"head-map-{p.stem}"),
                        _figure(plots.head_map_links_figure(hmap), f"head-map-links-{p.stem}")])
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{html.escape(line)}</summary>"
                     f"{''.join(figures)}</details>")
    return parts


def _ood(rec: dict) -> dict[str, float]:
    """A record's out-of-distribution accuracies: a model's (``ood_accuracy``) or, from its
    per-item bits, a trained run's."""
    return rec["ood_accuracy"] if "ood_accuracy" in rec else ood_accuracies(rec.get("ood") or {})


def _pair_cka(rec: dict) -> tuple[float, float] | None:
    """A trained run's mean pair CKA on the validation items before training and at its end."""
    seen = [m["cka_val_mean"] for m in rec.get("metrics") or []
            if m.get("cka_val_mean") is not None]
    return (seen[0], seen[-1]) if len(seen) > 1 else None


def _results(run: Path) -> list[str]:
    """Every trained run's accuracies beside the base student's and the teacher's (the models'
    from ``evaluation.json``, which ``cdist evaluate`` writes; the runs' from their own
    ``eval.json``), with each run's change in accuracy over the base student and in pair CKA over
    its training."""
    rows = {}
    evaluation = run / "evaluation.json"
    models = _read(evaluation).get("models", {}) if evaluation.is_file() else {}
    for role in ("teacher", "student"):
        if role in models:
            rows[f"{'base student' if role == 'student' else 'teacher'} "
                 f"({models[role].get('model', role)})"] = models[role]
    for path in sorted(run.glob("runs/*/*/eval.json")):
        rows[str(path.parent.relative_to(run))] = _read(path)
    if not rows:
        return []
    base = models.get("student", {}).get("full_accuracy")
    sets = list(dict.fromkeys(k for rec in rows.values() for k in _ood(rec)))  # as made
    head = ["", "full", "vs base student", "circuit", "random circuit", "faithfulness",
            *(f"OOD: {k}" for k in sets), "pair CKA: start → end"]

    def cell(value, signed=False):
        return "" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"

    body = []
    for name, rec in rows.items():
        full, ood, cka = rec.get("full_accuracy"), _ood(rec), _pair_cka(rec)
        change = None if base is None or full is None or name.startswith("base") else full - base
        values = [cell(full), cell(change, signed=True), cell(rec.get("circuit_accuracy")),
                  cell(rec.get("random_accuracy")), cell(rec.get("faithfulness")),
                  *(cell(ood.get(k)) for k in sets),
                  "" if cka is None else f"{cka[0]:.3f} → {cka[1]:.3f} ({cka[1] - cka[0]:+.3f})"]
        body.append(f"<tr><td>{html.escape(name)}</td>"
                    + "".join(f"<td>{v}</td>" for v in values) + "</tr>")
    note = ("" if models else "<p>the base student and the teacher are not evaluated yet: "
            f"<code>cdist evaluate --out {html.escape(str(run))}</code> adds them</p>")
    return [note + "<p>test items; the trained runs' pair CKA on the validation items</p>"
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(body) + "</table>"]


def _diagnostics(run: Path) -> list[str]:
    path = run / "diagnostics.json"
    if not path.is_file():
        return []
    parts = []
    for i, (name, d) in enumerate(_read(path).items()):
        rows = "".join(
            f"<tr><td>{html.escape(r['pair'])}</td><td>{r['teacher_variation']:.3g}</td>"
            f"<td>{r['student_variation']:.3g}</td><td>{r['cka_debiased']:.3f}</td>"
            f"<td>{r['cka_batch']:.3f} / {r['cka_batch_shuffled']:.3f}</td></tr>"
            for r in d["pairs"])
        flags = "".join(f"<li>{html.escape(f)}</li>" for f in d["flags"]) or "<li>none</li>"
        # one section per map, the first open: a table per map made SmolLM2's page 8,000 px longer
        line = f"{name}: {len(d['pairs'])} pairs, {len(d['flags'])} flags"
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{html.escape(line)}</summary>"
                     "<table><tr><th>pair</th><th>teacher variation</th><th>student variation"
                     "</th><th>debiased CKA</th><th>batch CKA (paired / shuffled)</th></tr>"
                     f"{rows}</table><p>flags:</p><ul>{flags}</ul></details>")
    return parts


def training_curves(run: Path) -> go.Figure | None:
    """Validation CE, accuracy and mean pair CKA over steps, one line per trained run, in one colour
    in every panel, with one legend entry per run."""
    paths = sorted(run.glob("runs/*/*/metrics.json")) + sorted(run.glob("select/*/metrics.json"))
    if not paths:
        return None
    panels = (("val_ce", "validation CE"), ("accuracy", "validation accuracy"),
              ("cka_val_mean", "pair CKA (validation)"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels])
    palette = plotly.colors.qualitative.Plotly
    for i, path in enumerate(paths):
        metrics = _read(path)["metrics"]
        colour = palette[i % len(palette)]
        shown = False
        name = str(path.parent.relative_to(run))
        for col, (key, _) in enumerate(panels, start=1):
            points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
            if points:
                fig.add_trace(go.Scatter(x=[s for s, _ in points], y=[v for _, v in points],
                                         mode="lines", name=name, legendgroup=name,
                                         line={"color": colour}, showlegend=not shown),
                              row=1, col=col)
                shown = True
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="training runs (validation items)", template="plotly_white",
                      width=1250, height=460)
    return fig


def run_page(run_dir: str | Path) -> str:
    """The page (module doc) as one HTML string."""
    run = Path(run_dir)
    if not run.is_dir():
        raise MissingFileError(f"{run} is not a run folder; give the --out of a cdist command")
    sections: list[tuple[str, list[str]]] = []
    results = run / "results.json"
    title = f"cdist run {run.name}"
    if results.is_file():
        per_item = run / "per_item.json"
        summary = with_comparisons(_read(results), _read(per_item) if per_item.is_file() else None)
        table = markdown.markdown(markdown_table(summary), extensions=["tables"])
        curves = [_figure(curve_figure(summary, key, label), f"curve-{key}") for key, label in
                  (("val_ce_curve", "validation CE, mean over seeds"),
                   ("val_accuracy_curve", "validation accuracy, mean over seeds"))]
        sections.append(("table", [table, *curves]))
        title = f"{summary['config']['task'].replace('_', ' ')}: {summary['student']} from " \
                f"{summary['teacher']}"
    if not results.is_file():  # a table's own results are its table
        sections.append(("results", _results(run)))
    sections.append(("circuits", _circuits(run)))
    sections.append(("head maps", _head_maps(run)))
    if not results.is_file():  # a table has its per-arm curves above and diagnostics in its text
        curves = training_curves(run)
        sections.append(("training", [_figure(curves, "training")] if curves else []))
        sections.append(("diagnostics", _diagnostics(run)))
    settings = []
    if results.is_file():
        settings.append("<h3>the experiment's config (results.json)</h3><pre>"
                        + html.escape(json.dumps(summary["config"], indent=1)) + "</pre>")
    for name in ("config.yaml", "commands.log"):
        if (run / name).is_file():
            settings.append(f"<h3>{name}</h3><pre>{html.escape((run / name).read_text())}</pre>")
    sections.append(("settings and commits", settings))
    sections = [(name, parts) for name, parts in sections if parts]
    if not sections:
        raise MissingFileError(f"{run} holds nothing cdist wrote (no circuits, head maps, runs or "
                                "results); run a cdist step with --out there first")
    nav = "".join(f'<a href="#{name.replace(" ", "-")}">{name}</a>' for name, _ in sections)
    body = "".join(f'<section id="{name.replace(" ", "-")}"><h2>{name}</h2>{"".join(parts)}'
                   "</section>" for name, parts in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{_GENERATOR}"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style><script>{plotly.offline.get_plotlyjs()}</script>"
            f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(str(run))}</p>"
            f"<nav>{nav}</nav>{body}</body></html>")


def _made_by_cdist(page: Path) -> bool:
    """Whether the file at ``page`` is a page cdist wrote: it names cdist as its generator, or,
    written before it did, opens with this module's style sheet."""
    with open(page, "rb") as f:
        head = f.read(8192).decode(errors="replace")
    return _GENERATOR in head or f"</title><style>{_STYLE}" in head


def write_run_page(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``run_page(run_dir)`` to ``out`` (default ``RUN_DIR/report.html``). An existing file
    there is replaced only if cdist wrote it (``RunFolderError`` otherwise): a page of the user's
    of the same name is never overwritten."""
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    if path.is_file() and not _made_by_cdist(path):
        raise RunFolderError(f"{path} exists and is not a page cdist wrote; give another path "
                             "with --page (cdist replaces only its own pages)")
    atomic_write_text(run_page(run_dir), path)
    return path
