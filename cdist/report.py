"""Tables and figures from an experiment's ``results.json`` (``cdist.pipeline``): markdown, CSV,
HTML, PNG.

``write_report(summary, out_dir, stem)`` writes ``{stem}.md`` (the declared primary comparison
first, then the selection, the alignment diagnostics and one table per training regime),
``{stem}.csv`` (regime x arm x metric, mean and sd over seeds), ``{stem}.json`` (the whole summary),
``{stem}-val-ce.html/.png`` (CE on the fixed validation items over steps, the paper's Fig. 5),
``{stem}-val-accuracy.html/.png``, and the chosen head map as a matrix and as links,
``{stem}-head-map.html/.png`` and ``{stem}-head-map-links.html/.png``. ``write_figures`` draws the
figures alone, from a summary already written (``cdist table --draw-only``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cdist import arms, plots
from cdist.checkpoints import atomic_write_json, atomic_write_text
from cdist.matching import HeadMap
from cdist.pipeline.comparisons import compare_arms

__all__ = ["markdown_table", "with_comparisons", "write_figures", "write_report"]

METRICS = (("full_accuracy", "full"), ("circuit_accuracy", "circuit"),
           ("random_accuracy", "random circuit"), ("faithfulness", "faithfulness"))
CURVE_ARMS = {"circuit distilled, CE": "#1f77b4", "circuit distilled, CE + Align CKA": "#d62728",
              "circuit distilled, CE + Shuffled CKA": "#2ca02c",
              "circuit distilled, CE + Rand CKA": "#9467bd", "circuit distilled, KD": "#ff7f0e"}


def _cell(stat: dict) -> str:
    return "–" if stat["mean"] is None else f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def _short(arm: str) -> str:
    return arm.replace("circuit distilled, ", "").replace("positive control, ", "control: ")


def _comparison_line(e: dict) -> str:
    """One comparison: the per-seed difference with its interval, p, equivalence verdict, and the
    clustered test beside it (``cdist.pipeline.comparisons``)."""
    s, clustered = e["seed_level"], e["clustered"]
    if s.get("note"):  # one seed, or no spread: the seed-level tests are undefined, say why
        tests = f"{s['note']}), **{s['verdict']}**"  # the note counts the seeds
    else:
        seeds = f"{e['n_seeds']} seed{'s' if e['n_seeds'] != 1 else ''}"
        holm = (f", Holm p {e['holm_p']:.3g} (corrected: {e['holm_verdict']})" if "holm_p" in e
                else "")
        tests = (f"95% CI {s['ci'][0]:+.3f} to {s['ci'][1]:+.3f}, {seeds}), p "
                 f"{s['p_value']:.3g}{holm}; equivalence at ±{s['margin']:g}: p "
                 f"{s['tost_p']:.3g}, **{s['verdict']}**")
    return (f"{_short(e['a'])} vs {_short(e['b'])} [{e['set']}, {e['role']}]: difference "
            f"{s['mean']:+.3f} ({tests}; clustered McNemar p {clustered['p_value']:.3g}")


def with_comparisons(summary: dict, per_item: dict | None, *, margin: float = 0.02,
                     alpha: float = 0.05) -> dict:
    """``summary`` with its comparisons: a table summarised by an earlier cdist (pooled tests
    only) gets them recomputed from its ``per_item.json`` (``cdist.pipeline.comparisons``), and
    says so."""
    if "comparisons" in summary or per_item is None:
        return summary
    return summary | {"comparisons": compare_arms(per_item["runs"], margin=margin, alpha=alpha),
                      "margin": margin, "alpha": alpha,
                      "comparisons_from": "recomputed from per_item.json (the table was "
                                          "summarised by an earlier cdist)"}


def markdown_table(summary: dict, *, command: str = "", commit: str = "") -> str:
    """The report as markdown: the primary comparison, then the selection of lr, matcher and
    lambda, the head map's diagnostics, what the circuit arms train, and one table of test results
    per training regime with its significance tests."""
    lines = _primary_lines(summary, command, commit)
    lines += _selection_lines(summary)
    lines += _head_map_lines(summary)
    lines += _trainable_lines(summary)
    for regime, rows in summary["rows"].items():
        lines += _regime_lines(summary, regime, rows)
    return "\n".join(lines) + "\n"


def _primary_lines(summary: dict, command: str, commit: str) -> list[str]:
    """The title, the command that made the table, and the comparison declared before the runs."""
    cfg = summary["config"]
    task = cfg["task"].replace("_", " ")
    small = min(cfg["regimes"])
    lines = [f"# {task}: {summary['student']} distilled from {summary['teacher']}", ""]
    if command:
        lines.append(f"`{command}`" + (f" at commit `{commit}`" if commit else "") +
                     f"; {summary['wall_time_s'] / 60:.0f} min.")
    lines += ["", "**Primary comparison (declared before the runs):** "
              f"{arms.PRIMARY[0]} vs {arms.PRIMARY[1]} at {small} training items, test accuracy: "
              f"the mean over seeds {cfg['seeds']} of the per-seed difference, its 95% t "
              f"interval and p, and two one-sided tests at ±{summary.get('margin', 0.02):g} "
              "(equivalence); "
              "Durkalski's clustered McNemar test (items as clusters) beside it.", ""]
    comparisons = summary.get("comparisons")
    if comparisons is None:
        return [*lines, "- not in this summary (made by an earlier cdist, without per-item "
                "results beside it)"]
    primary = [e for e in comparisons if e["role"] == "primary"]
    lines.append("- " + (_comparison_line(primary[0]) if primary
                         else "not run (an arm is missing)"))
    if "comparisons_from" in summary:
        lines.append(f"- every comparison here is {summary['comparisons_from']}")
    return lines


def _selection_lines(summary: dict) -> list[str]:
    """How lr, matcher and lambda were chosen on the validation items."""
    sel = summary["selection"]
    chosen = sel["chosen"]
    lines = ["", f"## Selection (validation items, seed {sel['seed']}, "
             f"{sel['train_items']} training items)", "",
             f"Chosen: lr {chosen['lr']}, matcher `{chosen['matcher']}`, "
             f"lambda {chosen['lambda']} ({sel['why']}); "
             f"the (strong) arms use lambda {chosen['lambda_strong']}, the smallest "
             f"whose CKA:CE gradient ratio at the start reaches {arms.STRONG_RATIO}; "
             f"sample-efficiency threshold {chosen['threshold']:.3f} (halfway from the base "
             "student's validation accuracy to circuit CE's at the end of its run).", "",
             "| circuit CE lr | validation accuracy |", "|---|---|"]
    lines += [f"| {r['lr']} | {r['val_accuracy']:.3f} |" for r in sel["lr"]]
    lines += ["", "| matcher | lambda | validation accuracy | CKA:CE gradient ratio at the start | "
              "pair CKA (debiased) start → end |", "|---|---|---|---|---|"]
    for r in sel["align"]:
        ratio = "–" if r["grad_ratio_start"] is None else f"{r['grad_ratio_start']:.3g}"
        lines.append(f"| {r['matcher']} | {r['lambda']} | {r['val_accuracy']:.3f} | {ratio} | "
                     f"{r['cka_val_start']:.3f} → {r['cka_val_end']:.3f} |")
    return lines


def _head_map_lines(summary: dict) -> list[str]:
    """The chosen head map's pairs with their diagnostics (``cdist.alignment``), and every flag."""
    chosen = summary["selection"]["chosen"]
    lines = ["", f"## Head map `{chosen['matcher']}` and its diagnostics (validation items)", "",
             f"Teacher head positions from {summary['positions_from']}: " +
             ", ".join(f"{h}@{c}" for h, c in summary["teacher_positions"].items()) + ".", "",
             "| pair | teacher variation | student variation | debiased CKA | "
             "batch CKA (paired / shuffled) |",
             "|---|---|---|---|---|"]
    for key in (chosen["matcher"], f"{chosen['matcher']} at pos_last"):
        for r in summary["diagnostics"].get(key, {"pairs": []})["pairs"]:
            lines.append(f"| {r['pair']} | {r['teacher_variation']:.3g} | "
                         f"{r['student_variation']:.3g} | {r['cka_debiased']:.3f} | "
                         f"{r['cka_batch']:.3f} / {r['cka_batch_shuffled']:.3f} |")
    for name, d in summary["diagnostics"].items():
        for flag in d["flags"]:
            lines.append(f"- flag ({name}): {flag}")
    return lines


def _faithfulness_lines(summary: dict) -> list[str]:
    """Each circuit's faithfulness check (stage 1), where the summary has one."""
    lines = []
    for role, rec in (summary.get("faithfulness") or {}).items():
        if not rec or not rec.get("after"):
            continue
        before, after = rec.get("before") or {}, rec["after"]
        grown = len(rec.get("added") or [])
        lines.append(f"The {role}'s circuit alone on validation items: faithfulness "
                     f"{before.get('faithfulness', float('nan')):.3f}"
                     + (f", grown by {grown} heads to {after.get('faithfulness', float('nan')):.3f}"
                        if grown else "") + f" ({rec.get('verdict', '')}).")
    return ["", *lines] if lines else []


def _trainable_lines(summary: dict) -> list[str]:
    """What the circuit arms train, and the teacher's accuracy out of distribution."""
    cfg = summary["config"]
    tr, grp = summary["trainable"], summary["trainable_group"]
    lines = _faithfulness_lines(summary)
    lines += ["", f"Circuit arms train {tr['heads']} heads, {tr['params']:,} parameters "
             f"({100 * tr['param_share']:.1f}% of the student; "
             f"kv policy `{cfg['distill']['kv_policy']}`); the "
             f"`group` policy would train {grp['params']:,}."]
    if summary["teacher_ood"]:
        lines += ["", "Teacher out of distribution: " + ", ".join(
            f"{k} {v:.3f}" + ("" if v >= cfg["min_teacher_ood"] else " (below the bar: not read)")
            for k, v in summary["teacher_ood"].items()) + "."]
    return lines


def _regime_lines(summary: dict, regime: str, rows: dict) -> list[str]:
    """One training regime: each arm's test (and OOD) results, then its significance tests."""
    ood_names = list(summary["teacher_ood"])
    lines = ["", f"## {regime[1:]} training items", "",
             "| arm | " + " | ".join(label for _, label in METRICS)
             + "".join(f" | OOD {n}" for n in ood_names)
             + " | steps to threshold | validation CE at the end |",
             "|---|" + "---|" * (len(METRICS) + len(ood_names) + 2)]
    for arm, row in rows.items():
        steps = row.get("steps_to_threshold")
        reached = [s for s in steps or [] if s is not None]
        steps_cell = "–" if steps is None else (
            f"{sorted(reached)[len(reached) // 2]} ({len(reached)}/{len(steps)} reached)"
            if reached else f"never (0/{len(steps)})")
        ce = row.get("val_ce_curve")
        lines.append(f"| {arm} | " + " | ".join(_cell(row[k]) for k, _ in METRICS)
                     + "".join(f" | {_cell(row['ood'][n])}" for n in ood_names)
                     + f" | {steps_cell} | {'–' if not ce else f'{ce[-1][1]:.3f}'} |")
    lines += ["", "Comparisons (test items, then each OOD set; the secondaries Holm-corrected as "
              "one family, the checks uncorrected):", ""]
    lines += ["- " + _comparison_line(e) for e in summary.get("comparisons") or []
              if e["regime"] == regime]
    return lines


CURVE_AXES = {"val_ce_curve": "validation CE", "val_accuracy_curve": "validation accuracy"}


def curve_figure(summary: dict, key: str, title: str) -> go.Figure:
    """``key`` ("val_ce_curve" or "val_accuracy_curve", the y axis's title in ``CURVE_AXES``) over
    steps, seed means, one panel per regime."""
    regimes = list(summary["rows"])
    titles = [f"{r[1:]} training items" for r in regimes]
    fig = make_subplots(rows=1, cols=len(regimes), subplot_titles=titles)
    for col, regime in enumerate(regimes, start=1):
        for arm, colour in CURVE_ARMS.items():
            curve = summary["rows"][regime].get(arm, {}).get(key)
            if curve:
                trace = go.Scatter(x=[s for s, _ in curve], y=[v for _, v in curve], mode="lines",
                                   name=arm, line={"color": colour}, legendgroup=arm,
                                   showlegend=col == 1)
                fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
        fig.update_yaxes(title_text=CURVE_AXES[key], row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", width=460 * len(regimes) + 200,
                      height=420)
    return fig


def write_report(summary: dict, out_dir: str | Path, stem: str, *, command: str = "",
                 commit: str = "") -> list[Path]:
    """Write the markdown and CSV tables, the JSON summary and the figures (``write_figures``);
    returns the paths."""
    out = Path(out_dir)
    atomic_write_text(markdown_table(summary, command=command, commit=commit), out / f"{stem}.md")
    atomic_write_json({**summary, "command": command, "commit": commit}, out / f"{stem}.json")
    table = io.StringIO()
    writer = csv.writer(table)
    ood_names = list(summary["teacher_ood"])
    writer.writerow(["train_items", "arm"]
                    + [f"{k}_{p}" for k, _ in METRICS for p in ("mean", "sd")]
                    + [f"ood_{n}_{p}" for n in ood_names for p in ("mean", "sd")] + ["seeds"])
    for regime, rows in summary["rows"].items():
        for arm, row in rows.items():
            stats_ = [row[k] for k, _ in METRICS] + [row["ood"][n] for n in ood_names]
            writer.writerow([regime[1:], arm] + [_num(s[p]) for s in stats_ for p in ("mean", "sd")]
                            + [row["full_accuracy"]["n"]])
    atomic_write_text(table.getvalue(), out / f"{stem}.csv")
    return [out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.csv",
            *write_figures(summary, out, stem)]


def write_figures(summary: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """The report's figures (module doc), HTML and PNG, from ``summary`` alone: the validation CE
    and accuracy curves, and the chosen head map as a matrix and as links; returns the paths."""
    out = Path(out_dir)
    head_map = HeadMap.from_dict(summary["head_map"])
    figures = {
        "val-ce": curve_figure(summary, "val_ce_curve", "CE on the fixed validation items "
                               "(teacher's labels), mean over seeds"),
        "val-accuracy": curve_figure(summary, "val_accuracy_curve",
                                     "validation accuracy, mean over seeds"),
        "head-map": plots.head_map_figure(head_map),
        "head-map-links": plots.head_map_links_figure(head_map),
    }
    return [path for name, fig in figures.items()
            for path in plots.save_figure(fig, out / f"{stem}-{name}")]


def _num(x) -> str:
    return "" if x is None else f"{x:.6f}"
