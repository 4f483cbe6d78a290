"""Figures: layer x head heatmaps of per-head scores and head-correspondence maps (as a matrix and
as links between the two models' heads), written as interactive HTML and static PNG that both work
offline.

Each HTML file loads plotly.js from ``plotly.min.js`` beside it, one per folder (megabytes once
instead of in every file, and no CDN, which an offline machine cannot reach). Every file is written
atomically (``cdist.checkpoints``), and ``plotly.min.js`` is compared with the installed plotly's
each time a figure is saved and rewritten when it differs, so a copy cut short (a full disk, a
kill, by an earlier cdist that let plotly write it) is repaired by the next run rather than kept.
The PNG is drawn by matplotlib (``cdist.static_png``), since plotly's own export needs a Chromium.

Colour: a signed per-head score is drawn on a symmetric-log scale (``signed_colour``) so that a
circuit's moderate heads stay visible beside one huge effect, and values below ``NEUTRAL_FLOOR`` of
the largest are drawn white (noise, not effects), except a circuit's own heads, which are always
coloured; the groups of one search share a scale (``shared_scale``), so a group of noise is white.
Colour bars carry explicit ticks whose labels are given as many significant digits as it takes to
tell them apart (``colour_ticks``).
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

from cdist.types import Head, Scan

__all__ = ["NEUTRAL_FLOOR", "colour_ticks", "head_heatmap", "head_map_figure",
           "head_map_links_figure", "heatmap_size", "save_figure", "scan_figure", "shared_scale",
           "signed_colour", "wrap_title"]

NEUTRAL_FLOOR = 0.01
"""Scores smaller in size than this share of the largest are drawn neutral (white)."""


def colour_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], list[str]]:
    """``n`` evenly spaced ticks from ``lo`` to ``hi`` and their labels, printed with the fewest
    significant digits (2 to 8, ``.Ng``) that keep every label distinct; one tick for an empty
    range."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return [float(lo)], [f"{lo:.3g}"]
    values = np.linspace(lo, hi, n)
    values[np.abs(values) < 1e-9 * (hi - lo)] = 0.0  # no "1e-17" where 0 is meant
    for digits in range(2, 9):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == n:
            break
    return values.tolist(), labels


def signed_colour(z: np.ndarray, floor: float = NEUTRAL_FLOOR, *, largest: float | None = None,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Signed scores mapped to colour positions in [-1, 1] on a symmetric-log scale.

    With ``m`` the largest ``|z|`` (or ``largest``, a scale shared by several figures, beyond which
    colours saturate) and ``c = floor * m``: ``|z| < c`` maps to 0 (neutral: noise such as +-1e-6
    is not drawn as an effect); otherwise ``sign(z) * log(1 + |z|/c) / log(1 + m/c)``, so ``m`` is
    the scale's end, ``m/10`` about halfway and ``c`` about 0.15. A head a tenth the size of the
    largest effect is thus clearly coloured instead of nearly white, as on a linear scale. Where
    ``keep`` (a mask: a circuit's heads) holds a nonzero score below ``c``, ``c`` comes down to half
    the smallest such score (not below ``floor**2 * m``), so that a circuit head is never drawn as
    noise.

    Returns:
        The colour positions (``z``'s shape), ``m`` (1 where every score is 0) and ``c``.
    """
    m = largest if largest is not None else (float(np.nanmax(np.abs(z))) if z.size else 0.0)
    m = m if m > 0 and np.isfinite(m) else 1.0
    c = floor * m
    if keep is not None:
        kept = np.abs(z[keep & (z != 0) & np.isfinite(z)])
        if kept.size and kept.min() < c:
            c = max(float(kept.min()) / 2, floor ** 2 * m)
    out = np.clip(np.sign(z) * np.log1p(np.abs(z) / c) / np.log1p(m / c), -1.0, 1.0)
    out[np.abs(z) < c] = 0.0
    return out, m, c


def _signed_ticks(m: float, c: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks for ``signed_colour``: 0, +-m/10 and +-m at their colour positions, and
    +-c where ``c`` (the neutral floor) sits well below m/10."""
    raw = [-m, -m / 10, 0.0, m / 10, m]
    if c < m / 100:
        raw = sorted(raw + [-c, c])
    pos = [float(np.sign(v) * np.log1p(abs(v) / c) / np.log1p(m / c)) for v in raw]
    return pos, [f"{v:.2g}" for v in raw]


def wrap_title(title: str, width: int, subtitle: str = "") -> tuple[dict, int]:
    """``title`` (and a smaller ``subtitle``) broken into lines that fit a ``width``-pixel figure;
    returns plotly's ``layout.title`` and the top margin it needs.

    plotly does not wrap a title: a long one runs off both ends of the figure. A line holds about
    ``width / 11`` characters of plotly's 17 px title font (``width / 8`` of the subtitle's). The
    title hangs from the figure's top edge: plotly centres it in the top margin otherwise, and a
    title of four lines or more then reached into the plot (a head map named by two file paths).
    """
    lines = textwrap.wrap(title, max(12, (width - 40) // 11)) or [""]
    subs = textwrap.wrap(subtitle, max(16, (width - 40) // 8)) if subtitle else []
    text = "<br>".join(lines + [f"<sup>{s}</sup>" for s in subs])
    layout = {"text": text, "yref": "container", "y": 1.0, "yanchor": "top", "pad": {"t": 14}}
    return layout, 40 + 24 * len(lines) + 16 * len(subs)


def heatmap_size(n_layers: int, n_heads: int) -> tuple[int, int]:
    """A layer x head heatmap's (width, height) in pixels: 44 px cells, rows shrinking (to 14 px)
    for deep models so that the figure stays under about 700 px tall (SmolLM2's 30 layers x 9
    heads is not a 1,500 px strip)."""
    cell_h = max(14, min(44, 480 // max(1, n_layers)))
    return max(560, 220 + 44 * n_heads), max(320, 220 + cell_h * n_layers)


def head_heatmap(
    scores: Float[Tensor, "layer head_index"],
    *,
    title: str,
    colorbar: str,
    marked: Iterable[Head] = (),
    diverging: bool = True,
    largest: float | None = None,
) -> go.Figure:
    """A layer (rows, layer 0 at the top) x head (columns) heatmap; ``marked`` heads get a black
    box. The axes show exactly the model's layers and heads (integer ticks, no padding rows).

    Colour: with ``diverging``, a red-white-blue scale on ``signed_colour``'s symmetric-log
    positions: sizes below ``NEUTRAL_FLOOR`` (1%) of the largest are white, and every head a tenth
    the size of the largest is still clearly coloured; the colour bar is labelled in the scores'
    units. The trace's ``z`` holds those colour positions; the scores themselves are its
    ``customdata`` and hover text. Without ``diverging``, a linear sequential scale from the
    smallest score to the largest (``z`` is the scores).

    Args:
        scores: one number per head.
        title: figure title (wrapped to the figure's width).
        colorbar: what the colour means, with its sign convention (the subtitle).
        marked: heads to outline (a circuit).
        diverging: signed scores, centred on 0; else a sequential scale.
        largest: the diverging scale's end, shared by figures drawn side by side (the groups of
            one search), so that a group of mere noise is drawn white; default this figure's own.
    """
    z = scores.detach().float().cpu().numpy()
    n_layers, n_heads = z.shape
    marked = list(marked)
    # NaN: a head the scan did not patch (outside a pre-filter's top candidates)
    text = [[f"a{layer}.h{head}: "
             + (f"{z[layer, head]:.3g}" if np.isfinite(z[layer, head]) else "not scanned")
             for head in range(n_heads)] for layer in range(n_layers)]
    if diverging:
        keep = np.zeros(z.shape, dtype=bool)
        for h in marked:
            keep[h.layer, h.head] = True
        colour, end, floor = signed_colour(z, largest=largest, keep=keep)
        # every score 0 (no effect anywhere): one tick, not a +-1 scale that nothing reaches
        tickvals, ticktext = (_signed_ticks(end, floor) if np.nan_to_num(np.abs(z)).max() > 0
                              else ([0.0], ["0"]))
        scale = {"colorscale": "RdBu", "zmid": 0, "zmin": -1, "zmax": 1}
    else:
        colour = z
        tickvals, ticktext = colour_ticks(float(z.min()), float(z.max()))
        scale = {"colorscale": "Viridis"}
    heat = go.Heatmap(z=colour, customdata=z, x=list(range(n_heads)), y=list(range(n_layers)),
                      text=text, hoverinfo="text",
                      colorbar={"tickvals": tickvals, "ticktext": ticktext}, **scale)
    fig = go.Figure(heat)
    for h in marked:
        fig.add_shape(type="rect", x0=h.head - 0.5, x1=h.head + 0.5, y0=h.layer - 0.5,
                      y1=h.layer + 0.5, line={"color": "black", "width": 3})
    width, height = heatmap_size(n_layers, n_heads)
    heading, top = wrap_title(title, width, colorbar)
    grid = {"showgrid": False, "zeroline": False, "automargin": True}
    fig.update_layout(
        title=heading,
        xaxis={"title": "head", "tickvals": list(range(n_heads)),
               "range": [-0.5, n_heads - 0.5], **grid},
        # layer 0 at the top: a reversed range, exactly the layers
        yaxis={"title": "layer", "tickvals": list(range(n_layers)),
               "range": [n_layers - 0.5, -0.5], **grid},
        width=width, height=height, template="plotly_white", margin={"t": top},
    )
    return fig


def scan_figure(scan: Scan, metric: str | None = None, *, marked: Iterable[Head] = (),
                title: str | None = None, largest: float | None = None) -> go.Figure:
    """A scan's layer x head heatmap (``head_heatmap``) of ``metric`` (default: the metric it ranks
    heads by), ``marked`` heads outlined; titled by its method and the position it intervened at;
    ``largest``: a colour scale shared with other scans (``shared_scale``)."""
    metric = metric or scan.metric
    where = "every position" if scan.position is None else scan.position
    return head_heatmap(scan[metric], title=title or f"{scan.method} at {where}", colorbar=metric,
                        marked=marked, largest=largest)


def shared_scale(scans: Iterable[Scan], metric: str | None = None) -> float | None:
    """The largest ``|score|`` over ``scans`` (each by its own ranking metric, or ``metric``): one
    colour scale for the groups of a search, so that each group is read against the largest
    effect of the search, as its heads were chosen (``min_share``); None if there are none."""
    sizes = [float(s[metric or s.metric].abs().nan_to_num().max()) for s in scans]
    return max(sizes) if sizes and max(sizes) > 0 else None


def save_figure(fig: go.Figure, stem: str | Path) -> list[Path]:
    """Write ``stem.html`` (with ``plotly.min.js`` beside it, checked: module doc) and
    ``stem.png``, atomically; returns the two paths.

    Raises:
        WriteError: the disk is full, or another error the system gives while writing.
    """
    from plotly.offline import get_plotlyjs

    from cdist.checkpoints import atomic_write_text, is_follower
    from cdist.static_png import write_png

    stem = Path(stem)
    html = stem.with_suffix(".html")
    if is_follower():  # under torchrun rank 0 writes the figures
        return [html, stem.with_suffix(".png")]
    # plotly's own write_html writes plotly.min.js in place and keeps any file of that name
    atomic_write_text(get_plotlyjs(), stem.parent / "plotly.min.js")
    atomic_write_text(fig.to_html(include_plotlyjs="directory"), html)
    return [html, write_png(fig, stem.with_suffix(".png"))]


def _map_title(head_map, title: str | None, what: str) -> str:
    name = f"{head_map.student_model or 'student'} -> {head_map.teacher_model or 'teacher'}"
    return title or f"head correspondence ({what}), {head_map.method} matcher: {name}"


def _label_colour(scale: str, at: float) -> str:
    """Black or white, whichever reads on the colour ``scale`` has at ``at`` (0..1): black on the
    light end of Viridis (its yellow), white on the dark."""
    red, green, blue = plotly.colors.unlabel_rgb(
        plotly.colors.sample_colorscale(scale, [min(max(at, 0.0), 1.0)])[0])
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "white"


def head_map_figure(head_map, *, title: str | None = None) -> go.Figure:
    """The head-correspondence map of a ``cdist.matching.HeadMap``: student heads (rows) x teacher
    heads (columns), colour = the matcher's distance or similarity (linear; the colour bar's ticks
    from ``colour_ticks``), chosen pairs marked with a black box and labelled with the position
    column they are read at (student / teacher where the two differ), in black or white, whichever
    reads on the pair's colour. The title is wrapped to the figure's width.
    ``head_map_links_figure`` draws the same map as links."""
    z = head_map.matrix.detach().float().cpu().numpy()
    students = [str(h) for h in head_map.student_heads]
    teachers = [str(h) for h in head_map.teacher_heads]
    label = "distance |dP_s - dP_t|" if head_map.kind == "distance" else "similarity (CKA)"
    scale = "Viridis_r" if head_map.kind == "distance" else "Viridis"
    tickvals, ticktext = colour_ticks(float(z.min()), float(z.max())) if z.size else ([], [])
    heat = go.Heatmap(z=z, x=teachers, y=students, colorscale=scale,
                      colorbar={"title": {"text": label, "side": "right"}, "tickvals": tickvals,
                                "ticktext": ticktext},
                      hovertemplate="student %{y} / teacher %{x}: %{z:.3g}<extra></extra>")
    fig = go.Figure(heat)
    for pair in head_map.pairs:
        r, c = students.index(str(pair.student)), teachers.index(str(pair.teacher))
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5,
                      line={"color": "black", "width": 3})
        where = pair.teacher_position.removeprefix("pos_")
        if pair.student_position != pair.teacher_position:
            where = pair.student_position.removeprefix("pos_") + " / " + where
        at = (z[r, c] - z.min()) / (z.max() - z.min()) if z.max() > z.min() else 0.5
        fig.add_annotation(x=c, y=r, text=where, showarrow=False,
                           font={"size": 10, "color": _label_colour(scale, float(at))})
    width = max(560, 260 + 46 * len(teachers))
    heading, top = wrap_title(_map_title(head_map, title, "matrix"), width)
    fig.update_layout(
        title=heading,
        xaxis={"title": "teacher head", "type": "category", "automargin": True},
        yaxis={"title": "student head", "type": "category", "autorange": "reversed",
               "automargin": True},
        width=width, height=max(360, 140 + top + 36 * len(students)),
        template="plotly_white", margin={"t": top},
    )
    return fig


def _closeness(head_map) -> np.ndarray:
    """The matrix as closeness in [0, 1] (1 = the closest pair of the map): similarity as is,
    distance reversed, both scaled over the matrix's range; all ones for a constant matrix (the
    random matcher's zeros)."""
    z = head_map.matrix.detach().float().cpu().numpy()
    lo, hi = (float(z.min()), float(z.max())) if z.size else (0.0, 0.0)
    if hi <= lo:
        return np.ones_like(z)
    return (hi - z) / (hi - lo) if head_map.kind == "distance" else (z - lo) / (hi - lo)


def _column(heads: Sequence[Head]) -> list[float]:
    """Heights of a column of nodes, first at the top, spread over [0, 1]."""
    n = len(heads)
    return [0.5] if n == 1 else [1 - i / (n - 1) for i in range(n)]


def head_map_links_figure(head_map, *, title: str | None = None) -> go.Figure:
    """A ``cdist.matching.HeadMap`` drawn as links: student heads in a column on the left, teacher
    heads on the right (both in the map's order), one line per chosen pair, wider and darker the
    closer the pair (``_closeness``: similarity, or distance reversed, scaled over the map). Each
    teacher head's marker grows with its in-degree (how many student heads learn from it; its area
    about in proportion, so that one head taking every student still fits the figure) and is
    labelled "xk" for k > 1, so a crowded teacher head shows at a glance; heads in no pair are
    grey. Drawn to PNG by ``save_figure`` / ``cdist.static_png.write_png``, like every figure here.
    """
    close = _closeness(head_map)
    students, teachers = list(head_map.student_heads), list(head_map.teacher_heads)
    ys, yt = _column(students), _column(teachers)
    fig = go.Figure()
    for pair in head_map.pairs:
        r, c = students.index(pair.student), teachers.index(pair.teacher)
        s = float(close[r, c])
        fig.add_trace(go.Scatter(
            x=[0, 1], y=[ys[r], yt[c]], mode="lines", showlegend=False, hoverinfo="text",
            text=f"{pair.student} -> {pair.teacher}: {float(head_map.matrix[r, c]):.3g}",
            line={"width": 1 + 5 * s, "color": f"rgba(31, 119, 180, {0.3 + 0.7 * s:.2f})"}))
    used = {p.student for p in head_map.pairs}
    degree = Counter(p.teacher for p in head_map.pairs)
    fig.add_trace(go.Scatter(
        x=[0] * len(students), y=ys, mode="markers+text", textposition="middle left",
        text=[str(h) for h in students], showlegend=False, hoverinfo="text",
        marker={"size": 12, "color": ["#1f77b4" if h in used else "#bbbbbb" for h in students]}))
    fig.add_trace(go.Scatter(
        x=[1] * len(teachers), y=yt, mode="markers+text", textposition="middle right",
        text=[f"{h} x{degree[h]}" if degree[h] > 1 else str(h) for h in teachers],
        showlegend=False, hoverinfo="text",
        # the marker's area grows with the in-degree: 10 px alone, 18 px for one student head,
        # about 50 for 24 (a linear size would be 154 px there, larger than the figure's margin)
        marker={"size": [10 + 8 * degree[h] ** 0.5 for h in teachers],
                "color": ["#d62728" if degree[h] else "#bbbbbb" for h in teachers]}))
    for x, name in ((0, "student heads"), (1, "teacher heads")):
        fig.add_annotation(x=x, y=1.1, text=name, showarrow=False, font={"size": 13})
    width = 560
    heading, top = wrap_title(_map_title(head_map, title, "links"), width)
    hidden = {"visible": False, "fixedrange": True}
    fig.update_layout(
        title=heading, xaxis={"range": [-0.6, 1.6], **hidden},
        yaxis={"range": [-0.08, 1.18], **hidden}, width=width,
        height=max(360, top + 80 + 30 * max(len(students), len(teachers))),
        template="plotly_white", margin={"t": top},
    )
    return fig
