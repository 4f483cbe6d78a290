"""Tables and figures from an experiment's ``results.json`` (``cdist.experiment``): markdown, CSV, HTML, PNG.

``write_report(summary, out_dir, stem)`` writes ``{stem}.md`` and ``{stem}.csv`` (rows x metrics, mean and
spread over seeds), ``{stem}.json`` (the whole summary), ``{stem}-ce.html/.png`` (training CE over steps,
circuit CE vs CE + Align CKA, the paper's Fig. 5) and ``{stem}-head-map.html/.png``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import plotly.graph_objects as go

from cdist import plots
from cdist.checkpoints import atomic_write_json, atomic_write_text
from cdist.matching import HeadMap

__all__ = ["markdown_table", "write_report"]

METRICS = (("full_accuracy", "full"), ("circuit_accuracy", "circuit"), ("random_accuracy", "random circuit"),
           ("faithfulness", "faithfulness"))


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(summary: dict, *, command: str = "", commit: str = "") -> str:
    """The table as markdown, with its provenance, the lambda sweep and the McNemar tests."""
    seeds = summary["config"]["seeds"]
    task = summary["config"]["task"].replace("_", " ")
    lines = [f"# {task}: {summary['student']} distilled from {summary['teacher']}", ""]
    if command:
        lines.append(f"`{command}`" + (f" at commit `{commit}`" if commit else "") + ".")
    lines += [
        f"Accuracy on {summary['config']['test_items']} held-out test items; mean ± standard deviation over seeds "
        f"{', '.join(map(str, seeds))}. Circuit accuracy keeps only the student's circuit "
        f"({_heads(summary['circuits']['student'])} heads; "
        f"the teacher row uses the teacher's circuit). Trained: {summary['trainable']['heads']} heads, "
        f"{summary['trainable']['params']:,} parameters ({100 * summary['trainable']['param_share']:.1f}% of the "
        f"student). lambda = {summary['lambda']} (chosen on validation items).",
        "",
        "| | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for row, stats_ in summary["rows"].items():
        lines.append(f"| {row} | " + " | ".join(_cell(stats_[key]) for key, _ in METRICS) + " |")
    lines += ["", "McNemar's exact test (full-model correctness on the test items), per seed:", ""]
    for name, per_seed in summary["mcnemar"].items():
        cells = ", ".join(f"seed {t['seed']}: p = {t['p_value']:.3g} (b = {t['b']}, c = {t['c']})" for t in per_seed)
        lines.append(f"- {name}: {cells}")
    if summary["lambda_sweep"]:
        lines += ["", "Lambda sweep (CE + Align CKA, validation accuracy): " + ", ".join(
            f"{r['lambda']}: {r['val_accuracy']:.3f}" for r in summary["lambda_sweep"])]
    return "\n".join(lines) + "\n"


def _heads(circuit: dict) -> int:
    return len({h for heads in circuit["groups"].values() for h in heads})


def ce_figure(summary: dict) -> go.Figure:
    """Training CE over steps for circuit CE and CE + Align CKA (each seed a thin line, the seed mean thick)."""
    fig = go.Figure()
    colours = {"circuit distilled, CE": "#1f77b4", "circuit distilled, CE + Align CKA": "#d62728"}
    for row, colour in colours.items():
        per_seed = summary["ce_curves"].get(row, {})
        for seed, curve in per_seed.items():
            pts = [(s, c) for s, c in curve if c is not None]
            fig.add_trace(go.Scatter(x=[s for s, _ in pts], y=[c for _, c in pts], mode="lines", opacity=0.35,
                                     line={"color": colour, "width": 1}, showlegend=False,
                                     name=f"{row}, seed {seed}"))
        if per_seed:
            steps = sorted({s for curve in per_seed.values() for s, c in curve if c is not None})
            mean = [sum(dict(curve).get(s) or 0 for curve in per_seed.values()) / len(per_seed) for s in steps]
            fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines+markers", name=row, line={"color": colour}))
    fig.update_layout(title="training CE (batch at each evaluation step)", xaxis_title="step",
                      yaxis_title="cross-entropy on the teacher's labels", template="plotly_white", width=720,
                      height=420)
    return fig


def write_report(summary: dict, out_dir: str | Path, stem: str, *, command: str = "", commit: str = "") -> list[Path]:
    """Write the markdown and CSV tables, the JSON summary and both figures; returns the paths."""
    out = Path(out_dir)
    written = []
    atomic_write_text(markdown_table(summary, command=command, commit=commit), out / f"{stem}.md")
    atomic_write_json({**summary, "command": command, "commit": commit}, out / f"{stem}.json")
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["row"] + [f"{key}_{part}" for key, _ in METRICS for part in ("mean", "std")] + ["seeds"])
    for row, stats_ in summary["rows"].items():
        writer.writerow([row] + [f"{stats_[key][part]:.6f}" for key, _ in METRICS for part in ("mean", "std")]
                        + [len(stats_["runs"])])
    atomic_write_text(table.getvalue(), out / f"{stem}.csv")
    written += [out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.csv"]
    written += plots.save_figure(ce_figure(summary), out / f"{stem}-ce")
    written += plots.save_figure(plots.head_map_figure(HeadMap.from_dict(summary["head_map"])),
                                 out / f"{stem}-head-map")
    return written
