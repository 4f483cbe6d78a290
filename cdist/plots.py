"""Figures: layer x head heatmaps of per-head scores and head-correspondence maps, written as
interactive HTML and static PNG that both work offline.

Each HTML file loads plotly.js from ``plotly.min.js`` beside it, written once per folder (megabytes
once instead of in every file, and no CDN, which an offline machine cannot reach). The PNG is drawn
by matplotlib (``cdist.static_png``), since plotly's own export needs a Chromium.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

from cdist.types import Head, Scan

__all__ = ["head_heatmap", "head_map_figure", "save_figure", "scan_figure"]


def head_heatmap(
    scores: Float[Tensor, "layer head_index"],
    *,
    title: str,
    colorbar: str,
    marked: Iterable[Head] = (),
    diverging: bool = True,
) -> go.Figure:
    """A layer (rows, layer 0 at the top) x head (columns) heatmap; ``marked`` heads get a black
    box.

    Args:
        scores: one number per head.
        title: figure title.
        colorbar: what the colour means, with its sign convention.
        marked: heads to outline (a circuit).
        diverging: a red-white-blue scale centred on 0 (signed scores); else a sequential scale.
    """
    z = scores.detach().float().cpu().numpy()
    n_layers, n_heads = z.shape
    text = [[f"a{layer}.h{head}: {z[layer, head]:.3g}" for head in range(n_heads)]
            for layer in range(n_layers)]
    limit = float(abs(z).max()) or 1.0
    heat = go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), text=text, hoverinfo="text",
        colorscale="RdBu" if diverging else "Viridis", zmid=0 if diverging else None,
        zmin=-limit if diverging else None, zmax=limit if diverging else None,
    )
    fig = go.Figure(heat)
    for h in marked:
        fig.add_shape(type="rect", x0=h.head - 0.5, x1=h.head + 0.5, y0=h.layer - 0.5,
                      y1=h.layer + 0.5, line={"color": "black", "width": 3})
    fig.update_layout(
        title={"text": f"{title}<br><sup>{colorbar}</sup>"},
        xaxis={"title": "head", "dtick": 1, "constrain": "domain"},
        yaxis={"title": "layer", "dtick": 1, "autorange": "reversed", "scaleanchor": "x"},
        width=max(560, 160 + 44 * n_heads), height=max(300, 200 + 44 * n_layers),
        template="plotly_white", margin={"t": 90},
    )
    return fig


def scan_figure(scan: Scan, metric: str | None = None, *, marked: Iterable[Head] = (),
                title: str | None = None) -> go.Figure:
    """A scan's layer x head heatmap (``head_heatmap``) of ``metric`` (default: the metric it ranks
    heads by), ``marked`` heads outlined; titled by its method and the position it intervened at."""
    metric = metric or scan.metric
    where = "every position" if scan.position is None else scan.position
    return head_heatmap(scan[metric], title=title or f"{scan.method} at {where}", colorbar=metric,
                        marked=marked)


def save_figure(fig: go.Figure, stem: str | Path) -> list[Path]:
    """Write ``stem.html`` (with ``plotly.min.js`` beside it) and ``stem.png``; returns the two
    paths."""
    from cdist.checkpoints import is_follower
    from cdist.static_png import write_png

    stem = Path(stem)
    if is_follower():  # under torchrun rank 0 writes the figures
        return [stem.with_suffix(".html"), stem.with_suffix(".png")]
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = stem.with_suffix(".html")
    fig.write_html(html, include_plotlyjs="directory")
    return [html, write_png(fig, stem.with_suffix(".png"))]


def head_map_figure(head_map, *, title: str | None = None) -> go.Figure:
    """The head-correspondence map of a ``cdist.matching.HeadMap``: student heads (rows) x teacher
    heads (columns), colour = the matcher's distance or similarity, chosen pairs marked with a black
    box and labelled with the position column they are read at (student / teacher where the two
    differ)."""
    z = head_map.matrix.detach().float().cpu().numpy()
    students = [str(h) for h in head_map.student_heads]
    teachers = [str(h) for h in head_map.teacher_heads]
    label = "distance |dP_s - dP_t|" if head_map.kind == "distance" else "similarity (CKA)"
    scale = "Viridis_r" if head_map.kind == "distance" else "Viridis"
    heat = go.Heatmap(z=z, x=teachers, y=students, colorscale=scale, colorbar={"title": label},
                      hovertemplate="student %{y} / teacher %{x}: %{z:.3g}<extra></extra>")
    fig = go.Figure(heat)
    for pair in head_map.pairs:
        r, c = students.index(str(pair.student)), teachers.index(str(pair.teacher))
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5,
                      line={"color": "black", "width": 3})
        where = pair.teacher_position.removeprefix("pos_")
        if pair.student_position != pair.teacher_position:
            where = pair.student_position.removeprefix("pos_") + " / " + where
        fig.add_annotation(x=c, y=r, text=where, showarrow=False,
                           font={"size": 10, "color": "white"})
    name = f"{head_map.student_model or 'student'} -> {head_map.teacher_model or 'teacher'}"
    fig.update_layout(
        title=title or f"head correspondence, {head_map.method} matcher: {name}",
        xaxis={"title": "teacher head", "type": "category"},
        yaxis={"title": "student head", "type": "category", "autorange": "reversed"},
        width=max(520, 220 + 46 * len(teachers)), height=max(320, 180 + 36 * len(students)),
        template="plotly_white",
    )
    return fig
