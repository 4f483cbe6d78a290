"""PNG versions of cdist's plotly figures, drawn by matplotlib, so that a static figure needs
neither a browser nor a network.

plotly's own PNG export (kaleido) drives a Chromium, which a fresh or offline machine often lacks.
Each figure is still defined once, in plotly (``cdist.plots``, ``cdist.report``); this module
redraws what those figures use: heatmaps (numeric or categorical axes, plotly's colour scales,
``zmid``/``zmin``/``zmax``, the colour bar's own ticks), line traces, markers with text, subplots in
their layout domains with titles, rectangle shapes, text annotations, axis titles, ranges, hidden
and reversed axes.

Layout is ours, not plotly's: the plotting area's margins are fitted (``_fit``) to what was drawn,
so that a figure's title (wrapped to its width), axis labels and colour bar all lie inside the
image at the figure's own size.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

__all__ = ["draw", "write_png"]

_DPI = 100
_PAD = 6  # pixels kept clear at the figure's edges


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
    a plotting area inside margins, one matplotlib ``Axes`` per (x axis, y axis) pair, made when
    something is first drawn on it, a heatmap's colour bar in a slim axes at its right. ``place``
    puts everything where the current margins say; ``_fit`` sets the margins so that everything
    drawn lies inside the figure."""

    MARGIN = {"l": 0.09, "r": 0.05, "b": 0.12, "t": 0.16}  # before ``_fit``
    BAR = 14  # colour bar width, pixels

    def __init__(self, figure: plt.Figure, layout: go.Layout) -> None:
        self.figure, self.layout = figure, layout
        self.margin = dict(self.MARGIN)
        self.axes: dict[tuple[str, str], plt.Axes] = {}
        self.bars: dict[tuple[str, str], plt.Axes] = {}
        self.domains: dict[tuple[str, str], tuple] = {}
        self.paper_texts: list[tuple[plt.Text, float, float]] = []
        # heatmap axes -> their (x, y) tick values, to place annotations on categorical axes
        self.categories: dict[tuple[str, str], tuple[list, list]] = {}

    def ax(self, xref: str, yref: str) -> plt.Axes:
        """The ``Axes`` of plotly's axis pair ``(xref, yref)`` ('x', 'y2', ...)."""
        if (xref, yref) not in self.axes:
            xd = getattr(self.layout, _axis_key(xref, "x")).domain or (0, 1)
            yd = getattr(self.layout, _axis_key(yref, "y")).domain or (0, 1)
            self.domains[xref, yref] = (tuple(xd), tuple(yd))
            self.axes[xref, yref] = self.figure.add_axes((0, 0, 1, 1))
            self.place()
        return self.axes[xref, yref]

    def bar(self, xref: str, yref: str) -> plt.Axes:
        """A colour bar's axes beside the axes of ``(xref, yref)``."""
        self.bars[xref, yref] = self.figure.add_axes((0, 0, 1, 1))
        self.place()
        return self.bars[xref, yref]

    def place(self) -> None:
        """Every axes, colour bar and subplot title where the margins put them."""
        m, fw = self.margin, self.figure.bbox.width
        w, h = 1 - m["l"] - m["r"], 1 - m["b"] - m["t"]
        for key, ax in self.axes.items():
            xd, yd = self.domains[key]
            gap = 0.06 if xd[1] - xd[0] < 1 else 0.0
            x0, width = m["l"] + w * xd[0] + gap / 2, w * (xd[1] - xd[0]) - gap
            y0, height = m["b"] + h * yd[0], h * (yd[1] - yd[0])
            if key in self.bars:
                bar, pad = self.BAR / fw, 8 / fw
                width -= bar + pad
                self.bars[key].set_position((x0 + width + pad, y0, bar, height))
            ax.set_position((x0, y0, max(width, 0.05), height))
        for text, x, y in self.paper_texts:
            text.set_position(self.paper(x, y))

    def paper(self, x: float, y: float) -> tuple[float, float]:
        """plotly's paper coordinates (0..1 over the plotting area) as figure fractions."""
        m = self.margin
        return m["l"] + (1 - m["l"] - m["r"]) * x, m["b"] + (1 - m["b"] - m["t"]) * y


def _set_ticks(bar, trace) -> None:
    """The colour bar's ticks: the trace's own (``colorbar.tickvals``/``ticktext``; cdist's
    figures give them, see ``cdist.plots.colour_ticks``), else matplotlib's, which are distinct."""
    spec = trace.colorbar
    if spec is not None and spec.tickvals is not None:
        values = [float(v) for v in spec.tickvals]
        labels = (list(spec.ticktext) if spec.ticktext is not None
                  else [f"{v:.3g}" for v in values])
        bar.set_ticks(values, labels=[str(t) for t in labels])
    bar.ax.tick_params(labelsize=7)


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
    vmin = float(np.nanmin(z)) if vmin is None else vmin
    vmax = float(np.nanmax(z)) if vmax is None else vmax
    image = ax.imshow(z, cmap=_cmap(trace.colorscale), vmin=vmin, vmax=vmax,
                      aspect="auto", interpolation="nearest", origin="upper")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs],
                  rotation=90 if any(isinstance(x, str) for x in xs) else 0, fontsize=7)
    ax.set_yticks(range(len(ys)), [str(y) for y in ys], fontsize=7)
    bar = canvas.figure.colorbar(image, cax=canvas.bar(xref, yref))
    _set_ticks(bar, trace)
    title = trace.colorbar.title.text if trace.colorbar and trace.colorbar.title else None
    if title:
        bar.set_label(_strip(title), fontsize=8)


def _texts(values, n: int) -> list[str]:
    if values is None:
        return []
    return [str(values)] * n if isinstance(values, str) else [str(v) for v in values]


def _draw_scatter(ax: plt.Axes, trace) -> None:
    """A scatter trace: a line (with markers where plotly draws them), named for the legend, or
    markers alone (plotly's pixel sizes and colours, one or one per point), with their text beside
    them where the mode has "text"."""
    mode = trace.mode or "lines"
    x, y = list(trace.x), list(trace.y)
    line, marker = trace.line, trace.marker
    label = trace.name if trace.showlegend is not False else None
    if "lines" in mode:
        ax.plot(x, y, color=_colour(line.color) if line.color else None,
                linewidth=(line.width or 2) * 0.7, label=label,
                marker="o" if "markers" in mode else None)
    elif "markers" in mode:
        size = np.broadcast_to(np.asarray(6 if marker.size is None else marker.size, float),
                               (len(x),))
        colours = marker.color
        colours = [_colour(c) for c in _texts(colours, len(x))] if colours is not None else None
        ax.scatter(x, y, s=(size * 0.75) ** 2, c=colours, label=label, zorder=3,
                   edgecolors="white", linewidths=0.5)
    if "text" in mode:
        where = trace.textposition or "middle center"
        ha = "right" if "left" in where else "left" if "right" in where else "center"
        side = {"right": -1, "left": 1, "center": 0}[ha]
        sizes = size if "markers" in mode and "lines" not in mode else np.zeros(len(x))
        for xi, yi, text, s in zip(x, y, _texts(trace.text, len(x)), sizes, strict=False):
            # beside the marker: half its width (plotly's px as points) and a gap
            ax.annotate(_strip(text), (xi, yi), xytext=(side * (s * 0.75 / 2 + 4), 0),
                        textcoords="offset points", ha=ha, va="center", fontsize=8)


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
            text = canvas.figure.text(*canvas.paper(note.x, note.y), _strip(note.text),
                                      ha="center", va="bottom", fontsize=9)
            canvas.paper_texts.append((text, note.x, note.y))


def _reversed(axis) -> bool:
    return axis.autorange == "reversed" or bool(axis.range and axis.range[0] > axis.range[1])


def _finish_axes(canvas: _Canvas) -> None:
    """Axis titles, plotly's y direction (heatmaps: row 0 at the top), ranges and hidden axes,
    a grid on line plots."""
    for (xref, yref), ax in canvas.axes.items():
        xa = getattr(canvas.layout, _axis_key(xref, "x"))
        ya = getattr(canvas.layout, _axis_key(yref, "y"))
        if xa.title and xa.title.text:
            ax.set_xlabel(_strip(xa.title.text), fontsize=9)
        if ya.title and ya.title.text:
            ax.set_ylabel(_strip(ya.title.text), fontsize=9)
        heat = (xref, yref) in canvas.categories
        if heat:  # imshow draws row 0 at the top, as the figures' reversed y axes do
            if not _reversed(ya):
                ax.invert_yaxis()
            continue
        if xa.range:
            ax.set_xlim(*xa.range)
        if ya.range:
            ax.set_ylim(*sorted(ya.range))
        if _reversed(ya):
            ax.invert_yaxis()
        if xa.visible is False and ya.visible is False:
            ax.set_axis_off()
        else:
            ax.grid(alpha=0.3)


def _legend_and_title(canvas: _Canvas, renderer) -> None:
    """The figure's title, wrapped to the figure's width, and under it, at the right, one legend
    (each named line once, whichever panel it is in) in as many columns as the width holds: a
    legend beside the title would be drawn over it."""
    figure = canvas.figure
    width, height = figure.bbox.width, figure.bbox.height
    top = 1 - _PAD / height  # figure fraction: where the next thing down may start
    title = _strip(canvas.layout.title.text) if canvas.layout.title else ""
    if title:
        text = figure.suptitle(title, fontsize=10, y=top, va="top")
        lines = title.split("\n")
        for chars in range(max(map(len, lines)), 8, -2):
            text.set_text("\n".join(textwrap.fill(line, chars) for line in lines))
            if text.get_window_extent(renderer).width <= width - 2 * _PAD:
                break
        top = (text.get_window_extent(renderer).y0 - _PAD) / height
    entries: dict[str, object] = {}  # label -> its first line, one entry per name in any panel
    for ax in canvas.axes.values():
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    for columns in range(len(entries), 0, -1):
        legend = figure.legend(list(entries.values()), list(entries), loc="upper right",
                               bbox_to_anchor=(1 - _PAD / width, top), ncols=columns,
                               fontsize=7, frameon=False)
        if columns == 1 or legend.get_window_extent(renderer).width <= width - 2 * _PAD:
            break
        legend.remove()


def _fit(canvas: _Canvas, renderer) -> None:
    """Set the margins so that every axes' tick labels, axis titles and colour bar, and the subplot
    titles, lie inside the figure and below its title and legend (a few passes: the decorations'
    sizes hardly change as the plotting area moves)."""
    figure = canvas.figure
    width, height = figure.bbox.width, figure.bbox.height
    for _ in range(3):
        boxes = [a.get_tightbbox(renderer) for a in (*canvas.axes.values(),
                                                      *canvas.bars.values())]
        boxes += [t.get_window_extent(renderer) for t, _, _ in canvas.paper_texts]
        if not boxes:
            return
        drawn = Bbox.union(boxes)
        top = height - _PAD  # below the title and the legend under it
        for above in (figure._suptitle, *figure.legends):
            if above is not None:
                top = min(top, above.get_window_extent(renderer).y0 - _PAD)
        m = canvas.margin
        left, right = m["l"] * width, (1 - m["r"]) * width
        bottom, upper = m["b"] * height, (1 - m["t"]) * height
        margin = {"l": (left - drawn.x0 + _PAD) / width, "r": (drawn.x1 - right + _PAD) / width,
                  "b": (bottom - drawn.y0 + _PAD) / height,
                  "t": (height - top + drawn.y1 - upper) / height}
        canvas.margin = {k: min(max(v, 0.0), 0.4) for k, v in margin.items()}
        canvas.place()


def write_png(fig: go.Figure, path: str | Path) -> Path:
    """Draw ``fig`` with matplotlib at its layout's width and height (pixels) into ``path``
    (atomically); titles, axis labels and colour bars are kept inside the image (``_fit``)."""
    from cdist.checkpoints import atomic_write_bytes

    path = Path(path)
    figure = draw(fig)
    png = io.BytesIO()
    try:
        figure.savefig(png, dpi=_DPI, format="png")
    finally:
        plt.close(figure)
    atomic_write_bytes(png.getvalue(), path)
    return path


def draw(fig: go.Figure) -> plt.Figure:
    """``fig`` as a matplotlib figure, laid out and ready to save (``write_png``); close it with
    ``plt.close`` when done."""
    layout = fig.layout
    width, height = (layout.width or 700) / _DPI, (layout.height or 450) / _DPI
    figure = plt.figure(figsize=(width, height), dpi=_DPI)
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
    renderer = figure.canvas.get_renderer()
    _legend_and_title(canvas, renderer)
    _fit(canvas, renderer)
    return figure
