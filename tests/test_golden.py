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
    assert len(made["runs"]) == len(expected["runs"]) == 15  # 13 arms' and selection runs
    for key, run in expected["runs"].items():
        # a run's record now also names the models it started from (their fingerprints)
        added = made["runs"][key]["eval"].pop("models")
        assert set(added) == {"teacher", "student"}, key
        assert made["runs"][key] == run, key
    assert made["per_item"] == expected["per_item"]
    for key in expected["results"]:
        assert made["results"][key] == expected["results"][key], key
    assert made == expected
