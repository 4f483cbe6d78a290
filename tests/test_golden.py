"""The golden table (``tests/golden.py``): the same command gives the same numbers, bit for bit, as
the run recorded in ``tests/data/golden_table.json``."""

from __future__ import annotations

import json
from pathlib import Path

import golden
import pytest
import torch


@pytest.mark.slow
def test_golden_table_is_reproduced_bit_for_bit(tmp_path):
    expected = json.loads((Path(__file__).parent / "data" / "golden_table.json").read_text())
    threads = torch.get_num_threads()
    try:
        made = json.loads(json.dumps(golden.run(tmp_path)))  # tuples as lists, as stored
    finally:
        torch.set_num_threads(threads)
    assert len(made["runs"]) == len(expected["runs"]) == 18  # the arms' and selection runs
    for key, run in expected["runs"].items():
        assert made["runs"][key] == run, key
    assert made["per_item"] == expected["per_item"]
    for key in expected["results"]:
        assert made["results"][key] == expected["results"][key], key
    assert made == expected


@pytest.mark.slow
def test_the_python_api_runs_the_same_stages_as_the_command(tmp_path):
    """``pipeline.run_experiment`` on the config the golden command describes gives the golden
    per-item results: the CLI adds settings and files, not numbers."""
    from cdist import pipeline, zoo
    from cdist.cli import common, settings, steps
    from cdist.cli.parser import Parser

    expected = json.loads((Path(__file__).parent / "data" / "golden_table.json").read_text())
    parser = Parser(prog="cdist table")
    steps._configure(parser, "table")
    argv = [*golden.ARGS[1:], "--out", str(tmp_path / "unused")]
    cfg = common.experiment_config(settings.parse(parser, argv, "table"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = pipeline.run_experiment(
            cfg, lambda: zoo.load("et-teacher")[0].eval(),
            lambda: zoo.load("et-student")[0].eval(), tmp_path / "api",
            names=("et-teacher", "et-student"), progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "api" / "per_item.json").read_text()) == expected["per_item"]
    # through JSON, as stored: tuples as lists, and NaN as json's one NaN (equal to itself)
    made = golden._without_wall_times(json.loads(json.dumps(summary)))
    assert made["rows"] == expected["results"]["rows"]
    assert made["comparisons"] == expected["results"]["comparisons"]
