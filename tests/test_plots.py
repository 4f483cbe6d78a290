"""Figures drawn whole: every title, axis label and colour bar inside the image at the figure's own
size; heatmap axes that are the model's layers; colour scales that show every circuit head; a
training figure with one colour per run; the head map drawn as links."""

from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from cdist import plots, static_png
from cdist.matching import HeadMap
from cdist.types import Head, HeadPair, Scan

LONG = ("HuggingFaceTB/SmolLM2-135M-entity-tracking-student",
        "HuggingFaceTB/SmolLM2-360M-entity-tracking-teacher")


def smol_map(kind: str = "similarity") -> HeadMap:
    """SmolLM2-like: long model names, close similarities (0.62..0.65), many students per
    teacher."""
    students = [Head(layer, h) for layer in range(3) for h in range(3)]
    teachers = [Head(layer, h) for layer in range(2) for h in range(4)]
    matrix = 0.62 + 0.03 * torch.rand(len(students), len(teachers),
                                      generator=torch.Generator().manual_seed(0))
    pairs = tuple(HeadPair(s, teachers[i % 2]) for i, s in enumerate(students))
    return HeadMap(pairs, tuple(students), tuple(teachers), matrix, kind, "cka", *LONG)


def texts_outside(fig) -> tuple[list[str], list[str]]:
    """What the PNG draws outside its figure (texts by their text; an axes' drawn tick labels,
    whose extent ``get_tightbbox`` holds, by the axes' label), and every text it draws."""
    figure = static_png.draw(fig)
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        box = figure.bbox

        def out(e) -> bool:
            return e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1

        ticks = {id(t) for ax in figure.axes for axis in (ax.xaxis, ax.yaxis)
                 for t in axis.get_ticklabels(which="both")}
        drawn, outside = [], []
        for text in figure.findobj(plt.Text):
            if not text.get_visible() or not text.get_text().strip() or id(text) in ticks:
                continue
            drawn.append(text.get_text())
            if out(text.get_window_extent(renderer)):
                outside.append(text.get_text())
        for ax in figure.axes:  # ticks, tick labels and axis labels as drawn
            drawn += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
            if out(ax.get_tightbbox(renderer)):
                outside.append(f"axes {ax.get_xlabel()!r} / {ax.get_ylabel()!r}")
        return outside, drawn
    finally:
        plt.close(figure)


@pytest.mark.parametrize("make", [
    lambda: plots.head_map_figure(smol_map()),
    lambda: plots.head_map_figure(smol_map("distance")),
    lambda: plots.head_map_links_figure(smol_map()),
    lambda: plots.head_heatmap(torch.randn(30, 9), title="path patching at pos_query_label, "
                               "senders of the position detector group, SmolLM2-360M",
                               colorbar="relative change of p(answer), senders at "
                               "pos_query_label (- = important)", marked=[Head(3, 4)]),
])
def test_png_draws_every_text_inside_the_figure(make):
    outside, drawn = texts_outside(make())
    assert drawn and outside == []


def test_head_map_png_has_both_axis_labels_and_distinct_colour_bar_ticks():
    fig = plots.head_map_figure(smol_map())
    outside, drawn = texts_outside(fig)
    assert "student head" in drawn and "teacher head" in drawn and outside == []
    assert any("SmolLM2-360M" in t for t in drawn)  # the title, wrapped, not cut
    ticks = list(fig.data[0].colorbar.ticktext)
    assert len(ticks) == 5 and len(set(ticks)) == 5  # not "0.62, 0.63, 0.63, ..."


def test_colour_ticks_are_distinct_and_short():
    values, labels = plots.colour_ticks(0.62, 0.65)
    assert len(set(labels)) == 5 and values[0] == 0.62 and values[-1] == pytest.approx(0.65)
    assert plots.colour_ticks(-1.0, 1.0)[1] == ["-1", "-0.5", "0", "0.5", "1"]
    assert plots.colour_ticks(0.3, 0.3) == ([0.3], ["0.3"])


def test_html_titles_are_wrapped_not_truncated():
    for fig in (plots.head_map_figure(smol_map()), plots.head_map_links_figure(smol_map())):
        text = fig.layout.title.text
        assert all(name.replace("-", "") in re.sub(r"<br>|-", "", text) for name in LONG)
        assert all(len(line) * 11 <= fig.layout.width - 40 for line in text.split("<br>"))
        assert fig.layout.margin.t >= 40 + 24 * len(text.split("<br>"))
        # hung from the figure's top edge: centred in the margin, 5 lines reached into the plot
        assert fig.layout.title.yref == "container" and fig.layout.title.yanchor == "top"


def test_a_prefiltered_scan_keeps_its_scale_and_names_the_heads_it_did_not_scan():
    """A search's exact scan patches only the pre-filter's candidates: the others are NaN. The
    colour bar still spans the scores (it showed only "0" when NaN reached the largest |score|)."""
    z = torch.full((3, 2), float("nan"))
    z[2, 0], z[1, 1] = -3.25, -0.4
    heat = plots.head_heatmap(z, title="t", colorbar="logit_diff_change").data[0]
    assert list(heat.colorbar.ticktext) == ["-3.2", "-0.33", "0", "0.33", "3.2"]
    assert heat.text[0][0] == "a0.h0: not scanned" and heat.text[2][0] == "a2.h0: -3.25"


def test_heatmap_axes_are_exactly_the_layers_and_heads():
    fig = plots.head_heatmap(torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, 0.2]]), title="t",
                             colorbar="c")
    assert list(fig.layout.yaxis.tickvals) == [0, 1] and list(fig.layout.yaxis.range) == [1.5, -0.5]
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2]
    assert list(fig.layout.xaxis.range) == [-0.5, 2.5]
    assert fig.layout.yaxis.scaleanchor is None  # square cells would pad the layer axis
    figure = static_png.draw(fig)
    try:
        (ax, _bar) = figure.axes
        assert ax.get_ylim() == (1.5, -0.5) and list(ax.get_yticks()) == [0, 1]
    finally:
        plt.close(figure)


def test_every_circuit_head_is_coloured_and_noise_is_neutral():
    """One huge effect and two moderate ones: the moderate heads get clearly non-white colours (on
    a linear scale they would be near white); +-1e-6 noise is exactly neutral."""
    z = torch.full((4, 4), 1e-6)
    z[0, 0], z[1, 2], z[3, 1] = -5.0, -0.3, -0.2
    z[2, 2] = -1e-6
    fig = plots.head_heatmap(z, title="t", colorbar="c", marked=[Head(0, 0), Head(1, 2),
                                                                   Head(3, 1)])
    heat = fig.data[0]
    assert np.allclose(heat.customdata, z.numpy())  # the scores themselves, for hover
    cmap = static_png._cmap(heat.colorscale)
    colour = np.asarray(heat.z)
    frac = (colour - heat.zmin) / (heat.zmax - heat.zmin)
    white = np.asarray(cmap(0.5)[:3])

    def off_white(f):
        return np.abs(np.asarray(cmap(f)[:3]) - white).sum()

    for layer, head in ((1, 2), (3, 1)):
        assert off_white(frac[layer, head]) > 0.4
        assert off_white(0.5 - 0.5 * abs(z[layer, head].item()) / 5.0) < 0.2  # linear: faint
    assert (colour[2, :] == 0).all() and colour[0, 1] == 0  # noise: neutral
    assert frac[0, 0] == pytest.approx(0.0, abs=1e-6)  # the largest is the scale's end


def test_tall_heatmaps_keep_a_sensible_height():
    width, height = plots.heatmap_size(30, 9)
    assert height <= 720 and width <= 700
    fig = plots.head_heatmap(torch.randn(30, 9), title="t", colorbar="c")
    assert fig.layout.height <= 720
    assert plots.heatmap_size(2, 4)[1] >= 300  # a small model keeps its 44 px cells


def test_links_figure_draws_a_line_per_pair_and_crowded_teachers_large(tmp_path):
    hm = smol_map()
    fig = plots.head_map_links_figure(hm)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == len(hm.pairs)
    students, teachers = fig.data[-2], fig.data[-1]
    assert list(students.text) == [str(h) for h in hm.student_heads]
    sizes = dict(zip([str(h) for h in hm.teacher_heads], teachers.marker.size, strict=True))
    assert sizes["a0.h0"] > sizes["a0.h1"] > sizes["a0.h2"]  # in-degree 5, 4, 0
    assert "a0.h0 x5" in teachers.text
    # the closer the pair, the wider its line
    close = [float(hm.matrix[hm.student_heads.index(p.student),
                             hm.teacher_heads.index(p.teacher)]) for p in hm.pairs]
    widths = [t.line.width for t in lines]
    assert np.argsort(close).tolist() == np.argsort(widths).tolist()
    html, png = plots.save_figure(fig, tmp_path / "links")
    assert png.exists() and "cdn.plot.ly" not in html.read_text()


def test_training_figure_one_colour_and_one_legend_entry_per_run(tmp_path):
    from cdist.report_page import training_curves

    for i, name in enumerate(("ce", "ce_cka")):
        run = tmp_path / "runs" / name / "0"
        run.mkdir(parents=True)
        metrics = [{"step": s, "val_ce": 2.0 - s / 10 - i, "accuracy": 0.1 * s,
                    "cka_val_mean": 0.5} for s in range(3)]
        (run / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    fig = training_curves(tmp_path)
    colours = {}
    for trace in fig.data:
        colours.setdefault(trace.name, set()).add(trace.line.color)
    assert all(len(c) == 1 for c in colours.values())
    assert len({c for cs in colours.values() for c in cs}) == 2
    legend = [t.name for t in fig.data if t.showlegend]
    assert sorted(legend) == ["runs/ce/0", "runs/ce_cka/0"]
    outside, drawn = texts_outside(fig)
    assert outside == [] and "runs/ce_cka/0" in drawn  # one PNG legend entry per run


def test_empty_groups_are_not_printed(tmp_path):
    from cdist.records import write_record
    from cdist.report_page import _circuits
    from cdist.types import Circuit

    circuit = Circuit({"value_fetcher": ["a1.h2"], "position_detector": []}, model="m",
                      method="path_patching")
    write_record(circuit, tmp_path / "circuit-teacher.json")
    text = "".join(_circuits(tmp_path))
    assert "value_fetcher: a1.h2" in text and "position_detector" not in text


def test_a_teacher_head_every_student_learns_from_keeps_its_marker_inside_the_figure():
    """SmolLM2's map: 24 student heads, all on one teacher head. Its marker stays larger than a
    less crowded head's, and lies inside the image (a size linear in the in-degree did not)."""
    students = [Head(layer, h) for layer in range(8) for h in range(3)]
    teachers = [Head(layer, 1) for layer in range(8)]
    pairs = tuple(HeadPair(s, teachers[-1]) for s in students[:-2])
    pairs += (HeadPair(students[-2], teachers[0]), HeadPair(students[-1], teachers[0]))
    matrix = torch.rand(len(students), len(teachers), generator=torch.Generator().manual_seed(0))
    hm = HeadMap(pairs, tuple(students), tuple(teachers), matrix, "distance", "ablation", *LONG)
    fig = plots.head_map_links_figure(hm)
    sizes = list(fig.data[-1].marker.size)
    assert sizes[-1] > sizes[0] > sizes[1]  # in-degree 22, 2, 0
    figure = static_png.draw(fig)
    try:
        figure.canvas.draw()
        (ax,) = figure.axes
        teachers_drawn = ax.collections[-1]
        centres = ax.transData.transform(teachers_drawn.get_offsets())
        radii = np.sqrt(teachers_drawn.get_sizes()) / 2 * figure.dpi / 72  # points^2 -> pixels
        box = figure.bbox
        assert (centres[:, 1] - radii >= box.y0).all() and (centres[:, 1] + radii <= box.y1).all()
        assert (centres[:, 0] + radii <= box.x1).all()
    finally:
        plt.close(figure)


def test_curves_have_both_axis_titles_and_the_legend_under_the_title():
    """The table's curve figure (``cdist.report.curve_figure``, one panel, long arm names): the
    PNG's legend is not drawn over its title, and each panel says what its y axis is."""
    from cdist.report import CURVE_ARMS, curve_figure

    curve = [(0, 1.7), (40, 0.4), (80, 0.2)]
    summary = {"rows": {"n128": {arm: {"val_ce_curve": curve} for arm in CURVE_ARMS}}}
    fig = curve_figure(summary, "val_ce_curve", "CE on the fixed validation items (teacher's "
                                                "labels), mean over seeds")
    outside, drawn = texts_outside(fig)
    assert outside == [] and "validation CE" in drawn and "step" in drawn
    figure = static_png.draw(fig)
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        title = figure._suptitle.get_window_extent(renderer)
        (legend,) = figure.legends
        assert not title.overlaps(legend.get_window_extent(renderer))
        assert len(legend.get_texts()) == len(CURVE_ARMS)
    finally:
        plt.close(figure)


@pytest.mark.parametrize("kind", ["distance", "similarity"])
def test_pair_labels_read_on_their_cells(kind):
    """A pair's position label is black on Viridis' light yellow end and white on its dark end
    (white on yellow could not be read)."""
    students, teachers = (Head(0, 0), Head(0, 1)), (Head(1, 0), Head(1, 1))
    matrix = torch.tensor([[0.0, 0.5], [0.5, 1.0]])
    pairs = (HeadPair(students[0], teachers[0]), HeadPair(students[1], teachers[1]))
    fig = plots.head_map_figure(HeadMap(pairs, students, teachers, matrix, kind, "cka", *LONG))
    colours = [note.font.color for note in fig.layout.annotations]
    light = 0 if kind == "distance" else 1  # Viridis_r: the smallest distance is yellow
    assert colours[light] == "black" and colours[1 - light] == "white"


def test_a_heatmap_of_zeros_has_no_scale_it_does_not_reach():
    heat = plots.head_heatmap(torch.zeros(2, 8), title="t", colorbar="c").data[0]
    assert list(heat.colorbar.ticktext) == ["0"] and np.all(np.asarray(heat.z) == 0)
    ticks = plots.head_heatmap(torch.tensor([[0.0, -0.5]]), title="t", colorbar="c").data[0]
    assert list(ticks.colorbar.ticktext) == ["-0.5", "-0.05", "0", "0.05", "0.5"]


def test_a_circuit_head_below_the_floor_is_still_coloured():
    """et-teacher's mean-ablation scan: a0.h3 drops 0.99, circuit heads a1.h4 and a1.h7 about
    0.005 (under 1% of it): outlined, they must not be drawn as noise; unmarked they are."""
    z = torch.full((2, 8), 1e-6)
    z[0, 3], z[1, 4], z[1, 7] = 0.99, 0.0046, 0.005
    circuit = [Head(0, 3), Head(1, 4), Head(1, 7)]
    marked = np.asarray(plots.head_heatmap(z, title="t", colorbar="c", marked=circuit).data[0].z)
    plain = np.asarray(plots.head_heatmap(z, title="t", colorbar="c").data[0].z)
    assert plain[1, 4] == plain[1, 7] == 0
    assert marked[1, 4] > 0.05 and marked[1, 7] > marked[1, 4]
    assert marked[0, 3] == pytest.approx(1.0)
    assert marked[0, 0] == 0  # noise stays neutral
    ticks = plots.head_heatmap(z, title="t", colorbar="c", marked=circuit).data[0].colorbar
    assert "0.0023" in list(ticks.ticktext)  # the lowered floor is on the colour bar


def test_a_search_shares_one_scale_so_a_group_of_noise_is_white():
    def scan(values):
        return Scan("path_patching", {"relative_change": torch.tensor(values)},
                    "relative_change", higher_is_important=False, n_items=8)

    real, noise = scan([[-0.6, 0.0], [-0.1, 0.0]]), scan([[1.9e-6, -1.2e-6], [0.0, 1e-7]])
    largest = plots.shared_scale([real, noise])
    assert largest == pytest.approx(0.6)
    alone = np.asarray(plots.scan_figure(noise).data[0].z)
    shared = np.asarray(plots.scan_figure(noise, largest=largest).data[0].z)
    assert np.abs(alone).max() == pytest.approx(1.0) and (shared == 0).all()
    assert plots.shared_scale([]) is None
