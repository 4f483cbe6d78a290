"""cdist.store: one fingerprint of a model and of items, and one reuse-by-identity rule."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from cdist.errors import FileFormatError
from cdist.store import Store, items_fingerprint, model_fingerprint


def test_model_fingerprint_tells_weights_apart_and_ignores_copies():
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    with torch.no_grad():  # the same numbers moved within a tensor (heads swapped): another model
        c = torch.nn.Linear(4, 3)
        c.load_state_dict(a.state_dict())
        c.weight[0, 0], c.weight[0, 1] = a.weight[0, 1].item(), a.weight[0, 0].item()
    assert model_fingerprint(c) != model_fingerprint(a)


def test_model_fingerprint_is_the_same_on_any_number_of_threads():
    """A float sum's last bits depend on how a parallel reduction splits it; the fingerprint must
    not (a model built with one thread count was refused when loaded with another)."""
    big = torch.nn.Linear(1024, 2048)
    threads = torch.get_num_threads()
    try:
        made = set()
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            made.add(model_fingerprint(big))
    finally:
        torch.set_num_threads(threads)
    assert len(made) == 1
    half = torch.nn.Linear(8, 4).to(torch.bfloat16)  # 2-byte weights too
    assert model_fingerprint(half) == model_fingerprint(half)


def test_items_fingerprint_reads_the_tokens_and_answers_or_the_columns_named():
    columns = {"input_ids": [[1, 2], [3, 4]], "answer_id": [5, 6], "pos_last": [1, 1]}
    data = Dataset.from_dict(columns)
    other = Dataset.from_dict({**columns, "answer_id": [5, 7]})
    assert items_fingerprint(data)[0] == 2
    assert items_fingerprint(data) != items_fingerprint(other)
    assert items_fingerprint(data, ["pos_last"]) == items_fingerprint(other, ["pos_last"])


def test_store_reuses_the_same_identity_and_remakes_another(tmp_path):
    store, made = Store(tmp_path), []

    def make():
        made.append(1)
        return {"n": len(made)}

    assert store.reuse("a/b.json", ["m", (1, 2)], make) == {"n": 1}
    assert store.reuse("a/b.json", ["m", [1, 2]], make) == {"n": 1}  # tuples read back as lists
    assert store.reuse("a/b.json", ["other"], make) == {"n": 2}  # recomputed, replaced
    assert json.loads((tmp_path / "a/b.json").read_text())["identity"] == ["other"]
    assert store.load("a/b.json", ["m"]) is None and store.kept("a/b.json") == {"n": 2}
    (tmp_path / "a/b.json").write_text("{not json")  # a user's edit: remade
    assert store.reuse("a/b.json", ["other"], make) == {"n": 3}
    # a kept value its reader cannot decode is remade too
    assert store.reuse("a/b.json", ["other"], make, decode=lambda v: v["missing"]) == {"n": 4}
    assert store.load("nothing.json", ["x"]) is None and store.kept("nothing.json") is None


def test_a_circuit_read_back_from_the_store_writes_the_same_record(tmp_path):
    # a search's groups come in search order and a ranking's scores largest first; sorted keys
    # on the way through the store rewrote circuit-<role>.json in another order on every resume
    from cdist.records import write_record
    from cdist.types import Circuit

    made = Circuit({"name_mover": ["a9.h1", "a2.h0"], "induction": ["a1.h3"]},
                   scores={"a9.h1": -0.5, "a2.h0": -0.2, "a1.h3": -0.1})
    store = Store(tmp_path)
    store.reuse("c.json", ["id"], lambda: made, encode=Circuit.to_dict)
    again = store.reuse("c.json", ["id"], lambda: pytest.fail("remade"), decode=Circuit.from_dict)
    assert write_record(again) == write_record(made)
    assert list(again.groups) == ["name_mover", "induction"]
    assert list(again.scores) == list(made.scores)


def test_a_record_keeps_its_identity_among_its_fields(tmp_path):
    store, made = Store(tmp_path), []

    def make():
        made.append(1)
        return {"accuracy": len(made) / 10}

    first = store.record("run/eval.json", {"seed": 0, "items": [3, "h"]}, make)
    assert first == {"seed": 0, "items": [3, "h"], "accuracy": 0.1}
    assert json.loads((tmp_path / "run/eval.json").read_text()) == first  # read as it is
    assert store.record("run/eval.json", {"seed": 0, "items": (3, "h")}, make) == first
    assert store.record("run/eval.json", {"seed": 1, "items": [3, "h"]}, make)["accuracy"] == 0.2
    (tmp_path / "run/eval.json").write_text("{")  # maybe the only copy: the user's to delete
    with pytest.raises(FileFormatError, match="run/eval.json is not valid JSON"):
        store.record("run/eval.json", {"seed": 1}, make)


def test_store_names_are_relative_to_its_folder(tmp_path):
    """A name is a path inside the store's folder; a relative folder (as a user types it) is not
    prefixed twice, and an absolute name is refused rather than written outside."""
    store = Store("results/run")
    assert store.path("runs/n16/eval.json") == Path("results/run/runs/n16/eval.json")
    with pytest.raises(ValueError, match="relative to its folder"):
        store.path(tmp_path / "eval.json")
