"""cdist.types.Scan, the one record of every discovery scan: built, stored, read back, drawn."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from conftest import unchecked

from cdist import plots
from cdist.records import load_scan, read_record, save_scan, write_record
from cdist.types import Circuit, Head, Scan

META = ("method", "metric", "higher_is_important", "position", "receivers", "receiver_input",
        "n_items")


def path_scan() -> Scan:
    g = torch.Generator().manual_seed(0)
    metrics = {"relative_change": torch.randn(3, 4, generator=g),
               "prob_change": torch.randn(3, 4, generator=g)}
    return Scan("path_patching", metrics, "relative_change", higher_is_important=False,
                position="pos_query_label", receivers=(Head(2, 1), "a1.h3"), receiver_input="k",
                n_items=7)


def ablation_scan() -> Scan:
    drop = torch.tensor([[0.5, -0.25, 0.0], [1e-7, 0.125, -3.0]])
    metrics = {"prob_drop": drop, "accuracy_drop": drop.sign()}
    return Scan("mean_ablation", metrics, "prob_drop", n_items=2)


def assert_same(a: Scan, b: Scan) -> None:
    assert {k: getattr(a, k) for k in META} == {k: getattr(b, k) for k in META}
    assert set(a.metrics) == set(b.metrics)  # safetensors sorts its keys
    for key in a.metrics:
        assert b[key].dtype == torch.float32 and torch.equal(a[key], b[key])


@pytest.mark.parametrize("make", [path_scan, ablation_scan])
def test_scan_round_trips_through_json(make, tmp_path):
    scan = make()
    assert_same(read_record(Scan, write_record(scan)), scan)
    write_record(scan, tmp_path / "scan.json")
    assert_same(read_record(Scan, tmp_path / "scan.json"), scan)
    assert_same(read_record(Scan, str(tmp_path / "scan.json")), scan)


@pytest.mark.parametrize("make", [path_scan, ablation_scan])
def test_scan_round_trips_through_safetensors(make, tmp_path):
    scan = make()
    save_scan(scan, tmp_path / "scan.safetensors")
    assert_same(load_scan(tmp_path / "scan.safetensors"), scan)


def test_scan_holds_heads_and_cpu_float32():
    scan = path_scan()
    assert scan.receivers == (Head(2, 1), Head(1, 3)) and scan.shape == (3, 4)
    wide = Scan("activation_patching", {"relative_change": torch.ones(2, 2, dtype=torch.float64)},
                "relative_change")
    assert wide["relative_change"].dtype == torch.float32
    assert scan.ranking().top(1) == (Head(*divmod(int(scan["relative_change"].argmin()), 4)),)
    assert scan.ranking("prob_change").higher_is_important  # another metric ranks high first


def test_invalid_scans_raise():
    ok = {"prob_drop": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="scan method 'gradient'"):
        Scan("gradient", ok, "prob_drop")
    with pytest.raises(ValueError, match="ranking metric 'accuracy_drop' is not among"):
        Scan("mean_ablation", ok, "accuracy_drop")
    # Wrong shapes break the metrics' annotation, which the suite's checker may report first.
    with unchecked():
        with pytest.raises(ValueError, match="one \\[layer, head_index\\] tensor"):
            mixed = {"prob_drop": torch.zeros(2, 4), "accuracy_drop": torch.zeros(3, 4)}
            Scan("mean_ablation", mixed, "prob_drop")
        with pytest.raises(ValueError, match="one \\[layer, head_index\\] tensor"):
            Scan("mean_ablation", {"prob_drop": torch.zeros(8)}, "prob_drop")
    scan = Scan("mean_ablation", ok, "prob_drop")
    with pytest.raises(KeyError, match="no metric 'relative_change'"):
        scan.ranking("relative_change")


def test_scan_figure_is_a_layer_by_head_heatmap():
    scan = path_scan()
    fig = plots.scan_figure(scan, marked=[Head(0, 1), Head(2, 3)])
    assert isinstance(fig, go.Figure)
    (heat,) = fig.data
    assert heat.type == "heatmap" and heat.z.shape == scan.shape
    assert (heat.customdata == scan["relative_change"].numpy()).all()  # z: colour positions
    assert len(fig.layout.shapes) == 2
    assert "path_patching at pos_query_label" in fig.layout.title.text
    other = plots.scan_figure(ablation_scan(), "accuracy_drop")
    assert other.data[0].z.shape == (2, 3) and "every position" in other.layout.title.text


def test_heads_are_whole_numbers_and_records_name_their_file(tmp_path):
    from cdist.errors import FileFormatError, InputError

    for layer, head in ((1.5, 0), ("0", "1"), (True, 0), (-1, 0)):
        with unchecked(), pytest.raises(InputError, match="whole numbers >= 0"):
            Head(layer, head)
    with unchecked():  # a tensor's integer is a whole number, kept as an int
        made = Head(torch.tensor(2), 3)
    assert made == Head(2, 3) and hash(made) == hash(Head(2, 3)) and type(made.layer) is int
    for text in ("{not json", '{"groups": 3}', "[]"):
        path = tmp_path / "circuit.json"
        path.write_text(text)
        with pytest.raises(FileFormatError, match=r"circuit.json is not a Circuit record"):
            read_record(Circuit, path)
