"""PNG versions of cdist's plotly figures, drawn by matplotlib, so that a static figure needs
neither a browser nor a network.

plotly's own PNG export (kaleido) drives a Chromium, which a fresh or offline machine often lacks.
Each figure is still defined once, in plotly (``cdist.plots``, ``cdist.report``); this module
redraws what those figures use: heatmaps (numeric or categorical axes, plotly's colour scales,
``zmid``/``zmin``/``zmax``), line traces, subplots in their layout domains with titles, rectangle
shapes, text annotations, axis titles and reversed axes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

__all__ = ["write_png"]

_DPI = 100


def _colour(text: str):
    """A plotly colour ('#rrggbb', 'rgb(r, g, b)', 'rgba(...)' or a name) for matplotlib."""
    text = text.strip()
    if text.startswith("rgb"):
        values = [float(v) for v in text[text.index("(") + 1:text.index(")")].split(",")]
        return tuple(v / 255 for v in values[:3]) + tuple(values[3:4])
    return text


def _cmap(scale) -> LinearSegmentedColormap:
    """plotly's colour scale (the (fraction, colour) pairs it stores, even for a named scale)."""
    return LinearSegmentedColormap.from_list("plotly", [(float(f), _colour(c)) for f, c in scale])


def _axis_key(ref: str, prefix: str) -> str:
    """'x2' -> 'xaxis2', 'x' -> 'xaxis'."""
    return f"{prefix}axis{ref[1:]}"


def _strip(text) -> str:
    return "" if text is None else str(text).replace("<br>", "\n").replace("<sup>", "") \
        .replace("</sup>", "")


class _Canvas:
    """A matplotlib figure laid out as a plotly figure is: each plotly axis pair's domain placed in
    a plotting area inside fixed margins, one matplotlib ``Axes`` per (x axis, y axis) pair, made
    when something is first drawn on it."""

    MARGIN = {"l": 0.09, "r": 0.05, "b": 0.12, "t": 0.16}

    def __init__(self, figure: plt.Figure, layout: go.Layout) -> None:
        self.figure, self.layout = figure, layout
        self.axes: dict[tuple[str, str], plt.Axes] = {}
        # heatmap axes -> their (x, y) tick values, to place annotations on categorical axes
        self.categories: dict[tuple[str, str], tuple[list, list]] = {}
        margin = self.MARGIN
        self.w, self.h = 1 - margin["l"] - margin["r"], 1 - margin["b"] - margin["t"]

    def ax(self, xref: str, yref: str) -> plt.Axes:
        """The ``Axes`` of plotly's axis pair ``(xref, yref)`` ('x', 'y2', ...)."""
        if (xref, yref) not in self.axes:
            margin, w, h = self.MARGIN, self.w, self.h
            xd = getattr(self.layout, _axis_key(xref, "x")).domain or (0, 1)
            yd = getattr(self.layout, _axis_key(yref, "y")).domain or (0, 1)
            gap = 0.06 if xd[1] - xd[0] < 1 else 0.0
            self.axes[xref, yref] = self.figure.add_axes(
                (margin["l"] + w * xd[0] + gap / 2, margin["b"] + h * yd[0],
                 w * (xd[1] - xd[0]) - gap, h * (yd[1] - yd[0])))
        return self.axes[xref, yref]

    def paper(self, x: float, y: float) -> tuple[float, float]:
        """plotly's paper coordinates (0..1 over the plotting area) as figure fractions."""
        return self.MARGIN["l"] + self.w * x, self.MARGIN["b"] + self.h * y


def _draw_heatmap(canvas: _Canvas, trace, xref: str, yref: str) -> None:
    """A heatmap trace as an image with its ticks and a colour bar, limits as plotly sets them."""
    ax = canvas.ax(xref, yref)
    z = np.asarray(trace.z, dtype=float)
    xs = list(trace.x) if trace.x is not None else list(range(z.shape[1]))
    ys = list(trace.y) if trace.y is not None else list(range(z.shape[0]))
    canvas.categories[xref, yref] = (xs, ys)
    vmin, vmax = trace.zmin, trace.zmax
    if trace.zmid is not None and (vmin is None or vmax is None):
        reach = float(np.nanmax(np.abs(z - trace.zmid))) or 1.0
        vmin, vmax = trace.zmid - reach, trace.zmid + reach
    image = ax.imshow(z, cmap=_cmap(trace.colorscale), vmin=vmin, vmax=vmax,
                      aspect="auto", interpolation="nearest", origin="upper")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs],
                  rotation=90 if any(isinstance(x, str) for x in xs) else 0, fontsize=7)
    ax.set_yticks(range(len(ys)), [str(y) for y in ys], fontsize=7)
    bar = canvas.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    title = trace.colorbar.title.text if trace.colorbar and trace.colorbar.title else None
    if title:
        bar.set_label(_strip(title), fontsize=8)


def _draw_scatter(ax: plt.Axes, trace) -> None:
    """A scatter trace as a line (with markers where plotly draws them), named for the legend."""
    line = trace.line or {}
    ax.plot(list(trace.x), list(trace.y), color=line.color if line else None,
            label=trace.name if trace.showlegend is not False else None,
            marker="o" if trace.mode and "markers" in trace.mode else None)


def _draw_shapes(canvas: _Canvas) -> None:
    """The layout's rectangles (the boxes round marked heads), unfilled."""
    for shape in canvas.layout.shapes or ():
        ax = canvas.ax(shape.xref or "x", shape.yref or "y")
        if shape.type == "rect":
            ax.add_patch(Rectangle((shape.x0, shape.y0), shape.x1 - shape.x0,
                                   shape.y1 - shape.y0, fill=False,
                                   edgecolor=(shape.line.color or "black"),
                                   linewidth=(shape.line.width or 1) * 0.7))


def _draw_annotations(canvas: _Canvas) -> None:
    """Text on the first axes (at data or category positions) and subplot titles (on paper)."""
    for note in canvas.layout.annotations or ():
        if note.xref in (None, "x") and note.yref in (None, "y") and note.showarrow is False:
            ax = canvas.ax("x", "y")
            x, y = note.x, note.y
            xs, ys = canvas.categories.get(("x", "y"), ([], []))
            x = xs.index(x) if x in xs and isinstance(x, str) else x
            y = ys.index(y) if y in ys and isinstance(y, str) else y
            font = note.font or {}
            ax.text(x, y, _strip(note.text), ha="center", va="center",
                    fontsize=(font.size or 10) * 0.7, color=font.color or "black")
        elif note.xref == "paper" and note.yref == "paper":  # subplot titles
            x, y = canvas.paper(note.x, note.y)
            canvas.figure.text(x, y + 0.01, _strip(note.text), ha="center", va="bottom",
                               fontsize=9)


def _finish_axes(canvas: _Canvas) -> None:
    """Axis titles, plotly's y direction (heatmaps: row 0 at the top), a grid on line plots."""
    for (xref, yref), ax in canvas.axes.items():
        xa = getattr(canvas.layout, _axis_key(xref, "x"))
        ya = getattr(canvas.layout, _axis_key(yref, "y"))
        if xa.title and xa.title.text:
            ax.set_xlabel(_strip(xa.title.text), fontsize=9)
        if ya.title and ya.title.text:
            ax.set_ylabel(_strip(ya.title.text), fontsize=9)
        heat = (xref, yref) in canvas.categories
        if heat:  # imshow draws row 0 at the top, as the figures' reversed y axes do
            if ya.autorange != "reversed":
                ax.invert_yaxis()
        elif ya.autorange == "reversed":
            ax.invert_yaxis()
        if not heat:
            ax.grid(alpha=0.3)


def _legend_and_title(canvas: _Canvas) -> None:
    """One legend (the first axes' named lines, shared by every panel) and the figure's title."""
    handles = [a for a in canvas.axes.values() if a.get_legend_handles_labels()[0]]
    if handles:
        canvas.figure.legend(*handles[0].get_legend_handles_labels(), loc="upper right",
                             fontsize=7, frameon=False)
    title = canvas.layout.title.text if canvas.layout.title else None
    if title:
        canvas.figure.suptitle(_strip(title), fontsize=10)


def write_png(fig: go.Figure, path: str | Path) -> Path:
    """Draw ``fig`` with matplotlib at its layout's width and height (pixels) into ``path``."""
    path = Path(path)
    layout = fig.layout
    width, height = (layout.width or 700) / _DPI, (layout.height or 450) / _DPI
    figure = plt.figure(figsize=(width, height), dpi=_DPI)
    try:
        canvas = _Canvas(figure, layout)
        for trace in fig.data:
            xref, yref = trace.xaxis or "x", trace.yaxis or "y"
            ax = canvas.ax(xref, yref)
            if trace.type == "heatmap":
                _draw_heatmap(canvas, trace, xref, yref)
            elif trace.type == "scatter":
                _draw_scatter(ax, trace)
        _draw_shapes(canvas)
        _draw_annotations(canvas)
        _finish_axes(canvas)
        _legend_and_title(canvas)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=_DPI)
    finally:
        plt.close(figure)
    return path
