"""A task given as data (``cdist.tasks.from_file``): a file written from built-in items reads back
as those items, splits do not depend on row order, every bad row is refused in one line naming
the row and the column, and the pipeline's sets of a file are disjoint."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cdist import cli, pipeline, tasks
from cdist.errors import ConfigError, FileFormatError, InputError, RunFolderError
from cdist.tasks.from_file import TaskFile, write_task_file
from cdist.tokenizers import llama3_tokenizer


@pytest.fixture(scope="module")
def llama_tok():
    from cdist.tokenizers import llama3_tokenizer

    return llama3_tokenizer()


@pytest.fixture(scope="module")
def ioi_file(llama_tok, tmp_path_factory):
    items = tasks.ioi(120, tokenizer=llama_tok, template="mixed", seed=2)
    path = tmp_path_factory.mktemp("task") / "ioi.jsonl"
    return items, write_task_file(items, llama_tok, path, ("io", "s1", "s2"))


def test_a_file_written_from_built_in_items_reads_back_as_them(ioi_file, llama_tok):
    items, path = ioi_file
    first = json.loads(path.read_text().splitlines()[0])
    assert "[[io:" in first["prompt"] and first["answer"].startswith(" ")
    read = TaskFile(path, llama_tok)
    for made, back in zip(items, read.items, strict=True):
        for column in ("input_ids", "answer_id", "contrast_id", "corrupt_input_ids", "pos_io",
                       "pos_s1", "pos_s2", "pos_last", "prompt"):
            assert made[column] == back[column], column
    task = tasks.get_task(str(path))
    assert (task.discovery_method, task.metric) == ("path_patching", "logit_diff")
    assert task.search(items) == "positions"
    assert task.size(llama_tok, "train") + task.size(llama_tok, "test") == 120


def test_splits_and_draws_do_not_depend_on_row_order(ioi_file, llama_tok, tmp_path):
    _, path = ioi_file
    lines = path.read_text().splitlines()
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    for split in ("train", "test"):
        a = tasks.get_task(str(path)).items(5, tokenizer=llama_tok, split=split, seed=3)
        b = tasks.get_task(str(shuffled)).items(5, tokenizer=llama_tok, split=split, seed=3)
        assert a["prompt"] == b["prompt"]
    # as CSV, the same rows are the same items
    import csv

    rows = [json.loads(line) for line in lines]
    as_csv = tmp_path / "rows.csv"
    with as_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    c = tasks.get_task(str(as_csv)).items(5, tokenizer=llama_tok, split="test", seed=3)
    assert c["prompt"] == tasks.get_task(str(path)).items(
        5, tokenizer=llama_tok, split="test", seed=3)["prompt"]


GOOD = {"prompt": "When [[io:Mary]] and [[s1:John]] went to the store, [[s2:John]] gave a drink to",
        "answer": " Mary",
        "counterfactual_prompt": "When [[io:Anna]] and [[s1:Paul]] went to the store, [[s2:Kate]] "
                                 "gave a drink to",
        "counterfactual_answer": " John"}


@pytest.mark.parametrize(("change", "message"), [
    ({"answer": "Mary"}, r"row 2, column answer: the prompt and 'Mary' read 'toMary', one word; "
                         r"write the answer as it continues the text, e.g. ' Mary'"),
    ({"answer": " Maryanne-Lou"}, r"row 2, column answer ' Maryanne-Lou' is \d tokens"),
    ({"counterfactual_answer": ""}, r"row 2, column counterfactual_answer is empty"),
    ({"counterfactual_prompt": "When [[io:Anna]] and [[s1:Paul]] went to the big store, "
                               "[[s2:Kate]] gave a drink to"},
     r"row 2, column counterfactual_prompt: 16 tokens against the prompt's 15"),
    ({"counterfactual_prompt": "When [[s1:Anna]] and [[io:Paul]] went to the store, [[s2:Kate]] "
                               "gave a drink to"},
     r"row 2, column counterfactual_prompt: its marks"),
    ({"prompt": "When [[io:Mary and John went to the store, John gave a drink to"},
     r"row 2, column prompt: a \[\[ or \]\] that is not a span"),
    ({"prompt": "When [[io:]] and John went"}, r"row 2, column prompt: the span \[\[io:\]\]"),
    ({"prompt": "When [[last:Mary]] and John"}, r"position 'last' is reserved"),
    ({"prompt": "When [[a:Mary]] and [[a:John]]"}, r"position 'a' is marked twice"),
    ({"prompt": "   "}, r"row 2, column prompt: empty"),
    ({"pos_end": 99}, r"row 2, column pos_end: position 99 is outside the prompt's 15 tokens"),
    ({"pos_end": "middle"}, r"row 2, column pos_end: 'middle' is not a token index"),
])
def test_every_bad_row_is_refused_naming_its_row_and_column(llama_tok, tmp_path, change, message):
    first = dict(GOOD, prompt=GOOD["prompt"].replace("drink", "ring"))
    bad = dict(GOOD) | change
    if "pos_end" in change:
        first["pos_end"] = 3
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError, match=message) as info:
        TaskFile(path, llama_tok)
    assert "\n" not in str(info.value)


def test_bad_files_are_refused_in_one_line(llama_tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(InputError, match="row 2 repeats row 1"):
        TaskFile(path, llama_tok)
    path.write_text(json.dumps({"text": "x", "answer": " y"}) + "\n")
    with pytest.raises(InputError, match=r"lacks the column\(s\) \['prompt'\]"):
        TaskFile(path, llama_tok)
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(FileFormatError, match="line 2: not JSON"):
        TaskFile(path, llama_tok)
    path.write_text("[1, 2]\n")
    with pytest.raises(FileFormatError, match="line 1: a JSON list, not an object"):
        TaskFile(path, llama_tok)
    with pytest.raises(tasks.UnknownTaskError, match="or give a .jsonl or .csv file"):
        tasks.get_task("my_task")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TaskFile(tmp_path / "none.jsonl", llama_tok)


def test_a_files_sets_are_disjoint_and_a_split_too_small_is_refused(ioi_file, llama_tok):
    _, path = ioi_file
    cfg = pipeline.ExperimentConfig(task=str(path), task_kwargs={}, ood=(), regimes=(32,),
                                    val_items=10, reference_items=4, discovery_items=4,
                                    test_items=6)
    sets = pipeline.make_items(cfg, llama_tok)
    test_side = [sets.reference, sets.found_on, sets.test]
    prompts = [set(s["prompt"]) for s in test_side]
    assert sum(map(len, prompts)) == len(set().union(*prompts)) == 14
    train = set(sets.training(32, 0)["prompt"])
    assert not train & set(sets.val["prompt"]) and len(train) == 32
    assert set(sets.training(32, 1)["prompt"]) != train  # each run seed its own draw
    with pytest.raises(ConfigError, match=r"88 test items asked for \(--reference-items 4, "
                                          r"--discovery-items 4, --test-items 80\) but 16"):
        pipeline.make_items(replace(cfg, test_items=80), llama_tok)


def test_the_example_files_are_what_examples_make_writes_and_write_no_file_twice(tmp_path):
    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, str(root / "examples" / "make.py"), str(tmp_path)],
                   check=True, capture_output=True, env=os.environ | {"PYTHONPATH": str(root)})
    for name in ("ioi.jsonl", "boxes.jsonl"):
        assert (tmp_path / name).read_bytes() == (root / "examples" / name).read_bytes(), name
    before = (tmp_path / "ioi.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match="exists; give a new path"):
        write_task_file(tasks.ioi(2, tokenizer=llama3_tokenizer()), llama3_tokenizer(),
                        tmp_path / "ioi.jsonl")
    assert (tmp_path / "ioi.jsonl").read_bytes() == before


@pytest.mark.slow
def test_every_step_takes_the_example_file_on_the_zoo_pair(tmp_path):
    """The README's pipeline on ``examples/boxes.jsonl``, at small sizes: the file's positions make
    the teacher's path-patching search, and every step reads the file's sets."""
    root = Path(__file__).parents[1]
    out = str(tmp_path / "boxes")
    first = ["--task", str(root / "examples" / "boxes.jsonl"), "--teacher", "et-teacher",
             "--student", "et-student", "--val-items", "40", "--test-items", "40",
             "--reference-items", "24", "--discovery-items", "24", "--n-random", "2"]
    steps = [["discover", *first], ["match", "--matchers", "ablation"],
             ["distill", "--steps", "4", "--eval-every", "2", "--batch-size", "8",
              "--train-items", "16"], ["evaluate"],
             ["table", "--seeds", "1", "--regimes", "16", "--steps", "2", "--eval-every", "1",
              "--batch-size", "8", "--lrs", "1e-3", "--lambdas", "1", "--matchers", "ablation",
              "--arms", "base student", "circuit distilled, CE",
              "circuit distilled, CE + Align CKA"],
             ["report"]]
    for argv in steps:
        assert cli.main([*argv, "--out", out]) == 0, argv
    found = json.loads((tmp_path / "boxes" / "discovery-teacher.json").read_text())
    record = found["selection"]
    assert (record["method"], record["search"], record["metric"]) == \
        ("path_patching", "positions", "logit_diff")
    assert {step["position"] for step in record["steps"]} == \
        {"pos_last", "pos_prev_label", "pos_query_label"}  # the file's marks
    models = json.loads((tmp_path / "boxes" / "evaluation.json").read_text())["models"]
    assert models["teacher"]["full_accuracy"] > 0.9  # et-teacher does the file's items
    summary = json.loads((tmp_path / "boxes" / "results.json").read_text())
    assert summary["config"]["task"].endswith("boxes.jsonl")
    assert (tmp_path / "boxes" / "report.html").is_file()
