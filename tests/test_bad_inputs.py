"""The catalogue of bad input: each case, through the command line or the Python API, is refused in
one line that names the problem (exit status 2 from ``cdist``, a ``cdist.errors`` exception from the
API), before the run folder is touched, and leaves every file as it was, byte for byte.

A case is ``(id, what it does, fragment of the message)``. The command-line cases run ``cli.main``
in this process against tiny checkpoints, damaged copies of them, and a run folder made by
``discover``, ``match`` and ``distill``; the API cases call the function directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import unchecked

from cdist import cli
from cdist.errors import CdistError
from cdist.models import new_llama, save_llama

SMALL = ["--val-items", "24", "--test-items", "40", "--ood-items", "16", "--reference-items", "32",
         "--discovery-items", "24", "--ood-boxes", "3", "--n-random", "2", "--min-effect", "0",
         "--min-faithfulness", "0", "--device", "cpu"]  # random models: no task, no faithfulness
RUN = ["--steps", "2", "--eval-every", "1", "--batch-size", "8", "--train-items", "16"]
ALIGN = "circuit_distilled-CE+Align_CKA"


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _damaged(good: Path, root: Path) -> dict[str, Path]:
    """Copies of the checkpoint ``good``, each damaged in one way a download or an edit can."""
    from safetensors.torch import load_file, save_file

    made = {}

    def copy(name: str) -> Path:
        made[name] = shutil.copytree(good, root / name)
        return made[name]

    weights = good / "model.safetensors"
    copy("truncated")
    with open(made["truncated"] / "model.safetensors", "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    (copy("config-not-json") / "config.json").write_text("{")
    (copy("no-safetensors") / "model.safetensors").unlink()
    (copy("missing-shard") / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if k.endswith("mlp.down_proj.weight")))
    save_file(tensors, copy("missing-weight") / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((good / "config.json").read_text())
    (copy("config-shape") / "config.json").write_text(
        json.dumps(config | {"intermediate_size": config["intermediate_size"] + 2}))
    data = weights.read_bytes()
    (copy("garbled-header") / "model.safetensors").write_bytes(
        struct.pack("<Q", 2**60) + data[8:])
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].replace(b'"F32"', b'"U32"', 1)
    (copy("unknown-dtype") / "model.safetensors").write_bytes(data[:8] + header + data[8 + length:])
    for f in copy("no-tokenizer").glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    (copy("tokenizer-not-json") / "tokenizer.json").write_text('{"x":')
    return made


@pytest.fixture(scope="module")
def world(tok, tmp_path_factory):
    """Tiny teacher and student checkpoints, damaged copies, config files, a plain file, and a run
    folder that ``discover``, ``match`` and ``distill`` have filled."""
    root = tmp_path_factory.mktemp("world")
    paths = {}
    for role, seed in (("teacher", 0), ("student", 1)):
        model = new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                          vocab_size=len(tok), seed=seed, tokenizer=tok)
        paths[role] = save_llama(model, root / role, tokenizer=tok)
    paths |= _damaged(paths["student"], root / "bad")
    files = {"bad.toml": "stepz = 3\n", "broken.yaml": "steps: [1,\n", "afile": "mine\n",
             "wrong-type.yaml": "steps: abc\n", "retired.yaml": "one_to_one: true\n",
             "bool-string.yaml": 'grow_circuits: "false"\n'}
    for name, text in files.items():
        (root / name).write_text(text)
        paths[name] = root / name
    models = ["--teacher", str(paths["teacher"]), "--student", str(paths["student"])]
    prepared = root / "prepared"
    for argv in (["discover", *models, *SMALL], ["match"], ["distill", *RUN, "--seed", "0"]):
        assert cli.main([*argv, "--out", str(prepared)]) == 0
    paths["prepared"] = prepared
    paths["models"] = models
    return paths


def _argv(argv: list[str], world: dict, tmp: Path) -> list[str]:
    names = {"tmp": tmp, **{k: v for k, v in world.items() if isinstance(v, Path)}}
    for name, path in names.items():
        argv = [a.replace(f"{{{name}}}", str(path)) for a in argv]
    return argv


def _main(argv: list[str]) -> int:
    """``cli.main``'s exit status; argparse's own refusals exit through ``SystemExit``."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


# (id, argv, message fragment); {name} is a path of the world fixture, {tmp} the case's folder.
# Commands that take --out write into {tmp}/out unless they name another.
CLI = [
    # models, devices, tasks
    ("unknown-model", ["discover", "--teacher", "no-such-model", "--roles", "teacher"],
     "is neither a zoo model"),
    ("device-absent-gpu", ["discover", "--device", "cuda:7"], "'cuda:7' is not on this machine"),
    ("device-not-a-name", ["discover", "--device", "tpu"], "'tpu' is not a device name"),
    ("model-of-another-task", ["discover", "--task", "entity_tracking", "--student",
                               "tom-student"], "tom-student was trained on theory_of_mind"),
    ("boxes-in-theory-of-mind", ["discover", "--n-boxes", "3", "--task", "theory_of_mind"],
     "theory_of_mind has no boxes"),
    # config files
    ("config-unknown-key", ["distill", "--config", "{bad.toml}"], "unknown setting 'stepz'"),
    ("config-not-yaml", ["distill", "--config", "{broken.yaml}"], "is not valid YAML"),
    ("config-missing", ["distill", "--config", "{tmp}/missing.toml"], "missing.toml"),
    ("config-wrong-type", ["distill", "--config", "{wrong-type.yaml}"],
     "wrong-type.yaml: argument --steps: invalid int value: 'abc'"),
    ("config-bool-string", ["distill", "--config", "{bool-string.yaml}"],
     "grow_circuits = 'false'; write true or false"),
    ("config-retired-setting", ["distill", "--config", "{retired.yaml}"],
     "one_to_one is no longer a setting; name the one-to-one matchers instead"),
    # training settings
    ("steps-0", ["distill", "--steps", "0"], "steps, eval_every >= 1"),
    ("steps-negative", ["distill", "--steps", "-5"], "steps=-5"),
    ("lambda-negative", ["distill", "--lam", "-1"], "a lambda >= 0"),
    ("lambda-negative-ce-arm", ["distill", "--arm", "circuit distilled, CE", "--lam", "-1"],
     "a lambda >= 0"),
    ("lr-nan", ["distill", "--lr", "nan"], "lr=nan; give a finite number"),
    ("lr-inf", ["distill", "--lr", "inf"], "lr=inf; give a finite number"),
    ("lr-negative", ["distill", "--lr", "-1e-3"], "lr=-0.001"),
    ("lr-huge", ["distill", "--lr", "1e8"], "is above 1"),
    ("batch-0", ["distill", "--batch-size", "0"], "batch_size=0"),
    ("eval-every-0", ["distill", "--eval-every", "0"], "eval_every=0"),
    ("train-items-below-batch", ["distill", "--train-items", "4", "--batch-size", "8"],
     "--train-items 4 cannot fill one batch of 8"),
    ("train-items-0", ["distill", "--train-items", "0"], "give at least 1 training item"),
    ("threads-0", ["discover", "--threads", "0"], "--threads 0: give 1 or more"),
    ("arm-unknown", ["table", "--arms", "CE + Magic"], "unknown arm 'CE + Magic'"),
    ("seeds-repeated", ["table", "--seeds", "0", "0"], "repeats a value"),
    ("regimes-0", ["table", "--regimes", "0"], "regimes [0]"),
    ("regime-below-batch", ["table", "--regimes", "4", "16", "--batch-size", "8"],
     "4 training items cannot fill one batch of 8"),
    ("lrs-inf", ["table", "--lrs", "inf"], "must be a finite number"),
    ("matcher-unknown", ["match", "--matchers", "nosuch"], "invalid choice: 'nosuch'"),
    # circuits
    ("min-share-above-1", ["discover", "--min-share", "1.5"], "'1.5' is not a number in [0, 1]"),
    ("min-faithfulness-negative", ["match", "--min-faithfulness", "-0.5"],
     "'-0.5' is not a number >= 0"),
    ("grow-max-share-0", ["table", "--grow-max-share", "0"], "'0' is not a number in (0, 1]"),
    # items
    ("val-items-3", ["distill", "--val-items", "3"], "at least 4 validation items"),
    ("test-items-0", ["distill", "--test-items", "0"], "test_items=0"),
    ("boxes-1", ["distill", "--n-boxes", "1"], "n_boxes=1 leaves nothing to track"),
    ("boxes-100", ["distill", "--n-boxes", "100"], "an item needs 100"),
    ("ood-boxes-1", ["distill", "--ood-boxes", "1"], "n_boxes=1 leaves nothing to track"),
    ("objects-not-tokens", ["distill", "--objects", "zzaqq", "apple", "ball", "book", "box",
                            "car", "cup", "key"], "'zzaqq' is not a single token"),
    ("objects-too-few", ["distill", "--objects", "apple", "ball"], "has 2 words but an item"),
    ("template-unknown", ["distill", "--template", "nosuch"],
     "argument --template: invalid choice: 'nosuch'"),
    ("ood-template-unknown", ["distill", "--ood-templates", "nosuch"],
     "--ood-templates nosuch: entity_tracking has templates"),
    ("cka-position-unknown", ["distill", "--cka-position", "pos_nowhere"],
     "'pos_nowhere' is not a position column"),
    ("teacher-position-outside", ["distill", "--teacher-positions", "a9.h99=pos_last"],
     "a9.h99 are outside the model"),
    ("teacher-position-column", ["distill", "--teacher-positions", "a0.h1=pos_zz"],
     "'pos_zz' is not a position column"),
    ("teacher-position-form", ["distill", "--teacher-positions", "a0.h1"], "write HEAD=COLUMN"),
    # output locations
    ("out-is-a-file", ["distill", "--out", "{afile}"], "is a file, not a folder"),
    ("out-under-a-file", ["discover", "--out", "{afile}/run"], "is a file, not a folder"),
    ("figures-under-a-file", ["table", "--figures", "{afile}/figures"], "is a file, not a folder"),
    ("page-under-a-file", ["report", "{prepared}", "--page", "{afile}/page.html"],
     "is a file, not a folder"),
    ("report-not-a-run", ["report", "{tmp}"], "holds nothing cdist wrote"),
    ("report-out-not-a-run", ["report", "--out", "{tmp}"], "holds nothing cdist wrote"),
    ("report-no-folder", ["report"], "give the run folder: cdist report --out RUN_DIR"),
    ("report-two-folders", ["report", "{tmp}", "--out", "{prepared}"], "two run folders"),
    ("export-unknown", ["zoo", "export", "no-such-model", "{tmp}/x"], "not a zoo model"),
    ("export-into-a-file", ["zoo", "export", "et-student", "{afile}"], "is a file, not a folder"),
    ("survey-no-names", ["zoo", "circuits", "--only"], "(none named)"),
    ("survey-threads", ["zoo", "circuits", "--threads", "-1"], "--threads -1: give 1 or more"),
    ("survey-figures-a-file", ["zoo", "circuits", "--only", "et-student", "--figures", "{afile}"],
     "is a file, not a folder"),
    ("zoo-train-unknown", ["zoo", "train", "--only", "nosuch"], "unknown zoo model(s) ['nosuch']"),
    ("zoo-train-eval-items-0", ["zoo", "train", "--tiny", "--eval-items", "0"],
     "--eval-items 0: give at least 1"),
    ("demo-items-0", ["demo", "--items", "0"], "--items 0: give at least 1"),
    # damaged checkpoints: named, before anything loads
    *[(f"checkpoint-{name}", ["discover", "--roles", "student", "--student", f"{{{name}}}"], frag)
      for name, frag in (
          ("truncated", "is truncated"), ("config-not-json", "config.json is not valid JSON"),
          ("no-safetensors", "no *.safetensors"),
          ("missing-shard", "names model-00002-of-00002.safetensors, which is not in"),
          ("missing-weight", "lacks 1 weights of its config.json"),
          ("config-shape", "but config.json makes it"),
          ("garbled-header", "is not a readable safetensors file"),
          ("unknown-dtype", "dtype U32"), ("no-tokenizer", "has no tokenizer files"),
          ("tokenizer-not-json", "tokenizer files cannot be read"))],
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_the_command_line_refuses_in_one_line_before_writing(argv, message, world, tmp_path,
                                                             capsys):
    refused_before_writing(argv, message, world, tmp_path, capsys)


def refused_before_writing(argv: list[str], message: str, world: dict, tmp_path: Path,
                           capsys) -> None:
    """A ``CLI`` case: refused with exit status 2 in one line holding ``message``, every file as
    it was (also the harness of ``test_catalogue_runs``)."""
    argv = _argv(argv, world, tmp_path)
    if argv[0] not in ("zoo", "demo", "report") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if argv[0] in ("discover", "distill", "table", "match"):  # small sets; the case's flags win
        argv = [argv[0], *SMALL, *argv[1:]]
    before = _tree(world["prepared"].parent), _tree(tmp_path)
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith("cdist")
    assert (_tree(world["prepared"].parent), _tree(tmp_path)) == before


def test_a_table_script_refuses_another_task(capsys):
    assert cli.table_script("entity_tracking", ["--task", "theory_of_mind"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this script makes the entity_tracking table" in err[0]


# A run folder that is accepted, then meets a damaged file: refused naming it; the folder's own
# bookkeeping (its lock, settings and command log) is the only thing written.
BOOKKEEPING = {".cdist.lock", "config.yaml", "commands.log"}
EVAL = f"runs/n16/{ALIGN}-seed0/eval.json"


def _break(name: str, out: Path) -> None:
    if name == "eval-not-json":
        (out / EVAL).write_text("{")
    elif name == "eval-without-accuracies":
        (out / EVAL).write_text("{}")
    elif name == "identity-not-json":
        (out / "identity.json").write_text("{")
    elif name == "results-not-json":
        (out / "results.json").write_text("{")
    elif name == "cached-circuit-outside":
        path = out / "cache" / "discovery-teacher.json"
        saved = json.loads(path.read_text())
        groups = saved["value"]["circuit"]["groups"]  # the store keeps {identity, value}
        saved["value"]["circuit"]["groups"] = {name: ["a9.h99"] for name in groups}
        path.write_text(json.dumps(saved))
    elif name == "cached-head-map-outside":
        path = out / "cache" / "head-maps.json"
        saved = json.loads(path.read_text())
        for entry in saved["value"].values():
            entry["map"]["pairs"][0]["teacher"] = "a0.h99"
        path.write_text(json.dumps(saved))


FOLDER = [
    ("other-items", [], ["distill", *RUN, "--val-items", "30"], "val_items: 24 there, 30 now"),
    ("other-discovery-rule", [], ["discover", "--min-effect", "0.5"],
     "(discovery.min_effect: 0.0 there, 0.5 now; student_discovery.min_effect: 0.0 there, "
     "0.5 now); keep the folder's settings (leave those flags out), or write to another "
     "folder (--out)"),
    ("other-run-settings", [], ["distill", *RUN, "--steps", "3", "--seed", "0"],
     "other settings (steps: 2 there, 3 now"),
    ("eval-not-json", ["eval-not-json"], ["evaluate"], "eval.json is not valid JSON"),
    ("eval-without-accuracies", ["eval-without-accuracies"], ["evaluate"],
     "is not a run's evaluation"),
    ("identity-not-json", ["identity-not-json"], ["match"], "identity.json is not valid JSON"),
    ("results-not-json", ["results-not-json"], ["report", "{out}"],
     "results.json is not valid JSON"),
    ("cached-circuit-outside", ["cached-circuit-outside"], ["match"],
     "delete the file to find the circuit again"),
    ("cached-head-map-outside", ["cached-head-map-outside"], ["distill", *RUN, "--seed", "5"],
     "map's teacher heads a0.h99 are outside the model"),
]


@pytest.mark.parametrize(("damage", "argv", "message"), [c[1:] for c in FOLDER],
                         ids=[c[0] for c in FOLDER])
def test_a_run_folder_with_other_settings_or_damaged_files_is_refused(damage, argv, message,
                                                                      world, tmp_path, capsys):
    folder_refuses(lambda out: [_break(name, out) for name in damage], argv, message, world,
                   tmp_path, capsys)


def folder_refuses(damage, argv: list[str], message: str, world: dict, tmp_path: Path,
                   capsys) -> None:
    """A ``FOLDER`` case: a copy of the prepared run folder, ``damage(folder)`` done to it, is
    refused in one line holding ``message``, only its bookkeeping written (also the harness of
    ``test_catalogue_runs``)."""
    out = shutil.copytree(world["prepared"], tmp_path / "out")
    damage(out)
    before = _tree(out)
    argv = [a.format(out=out) for a in argv]
    assert _main([*argv, "--out", str(out)] if argv[0] != "report" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the settings the folder lent the step are said first (cdist.cli.settings.announce)
    said = [line for line in err if " settings kept in " in line]
    assert err[:len(said)] == said and len(said) <= 1
    err = err[len(said):]
    assert len(err) == 1 and message in err[0], err
    after = _tree(out)
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if k not in BOOKKEEPING} \
        == {k: v for k, v in before.items() if k not in BOOKKEEPING}


# ---------------------------------------------------------------------------------------------- API
def _et(n=4, **kw):
    from cdist import tasks, zoo

    return tasks.entity_tracking(n, **{"tokenizer": zoo.organism_tokenizer(), **kw})


def _distill(fx, teacher_heads=("a0.h1", "a1.h2"), **kw):
    """``distill.distill`` of the tiny model from itself, with ``kw`` overriding."""
    from cdist import distill, matching
    from cdist.types import Head

    hmap = matching.random_matcher([Head(0, 1), Head(1, 2)],
                                   [Head.parse(h) for h in teacher_heads], seed=0)
    args = {"train": _et(16), "cfg": distill.DistillConfig(steps=2, batch_size=8, cka_weight=1.0,
                                                           eval_every=1)} | kw
    return distill.distill(fx["model"], fx["model"], hmap, args["train"], _et(8, seed=1),
                           args["cfg"], fx["tmp"] / "run", progress=False)


def _evaluate(fx, **kw):
    from cdist.discovery import ablation, circuit_eval
    from cdist.types import Head

    items = _et(8)
    args = {"means": ablation.head_means(fx["model"], items), "batch_size": 4} | kw
    heads = args.pop("heads", [Head(0, 1)])
    return circuit_eval.evaluate_circuit(fx["model"], heads, items, **args)


def _cfg(**kw):
    from cdist import distill

    return distill.DistillConfig(**kw)


def _exp(**kw):
    from cdist.pipeline import ExperimentConfig

    return ExperimentConfig(**{"task": "entity_tracking", **kw})


def _load(fx, name, **kw):
    from cdist.models import load_llama

    return load_llama(fx[name], **kw)


def _cka(x, y, **kw):
    from cdist.cka import linear_cka

    return linear_cka(x, y, **kw)


NAN = torch.ones(8, 4).index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(math.nan))

# (id, call(fixtures), message fragment)
API = [
    ("config-seed-none", lambda fx: _cfg(seed=None), "seed=None"),
    ("config-seed-str", lambda fx: _cfg(seed="abc"), "seed='abc'"),
    ("config-seed-float", lambda fx: _cfg(seed=1.5), "seed=1.5"),
    ("config-kd-temperature-0", lambda fx: _cfg(kd_weight=1.0, kd_temperature=0),
     "kd_temperature=0"),
    ("config-lr-huge", lambda fx: _cfg(lr=1e8), "is above 1"),
    ("config-weight-negative", lambda fx: _cfg(cka_weight=-1.0), "must be >= 0"),
    ("config-no-loss", lambda fx: _cfg(ce_weight=0.0), "every loss weight is 0"),
    ("config-shuffle-int", lambda fx: _cfg(shuffle_teacher=1), "shuffle_teacher=1"),
    ("config-debiased-str", lambda fx: _cfg(debiased_cka="no"), "debiased_cka='no'"),
    ("config-kv-policy", lambda fx: _cfg(kv_policy="all"), "kv_policy='all'"),
    ("experiment-val-items", lambda fx: _exp(val_items=3), "at least 4 validation items"),
    ("experiment-seeds-repeat", lambda fx: _exp(seeds=(0, 0)), "repeats a value"),
    ("experiment-seed-float", lambda fx: _exp(seeds=(0.5,)), "give whole numbers"),
    ("experiment-lr-inf", lambda fx: _exp(lrs=(math.inf,)), "finite number"),
    ("experiment-lr-huge", lambda fx: _exp(lrs=(5.0,)), "is above 1"),
    ("experiment-matcher", lambda fx: _exp(matchers=("nosuch",)), "matchers ['nosuch']"),
    ("experiment-task", lambda fx: _exp(task="nosuch"), "unknown task 'nosuch'"),
    ("head-float", lambda fx: __import__("cdist.types").types.Head(1.5, 0), "1.5"),
    ("head-name", lambda fx: __import__("cdist.types").types.Head.parse("a9"),
     "'a9' is not a head name"),
    ("circuit-a-string", lambda fx: __import__("cdist.types").types.Circuit("a0.h1"),
     "groups (and positions) are a dict"),
    ("circuit-group-a-string", lambda fx: __import__("cdist.types").types.Circuit(
        {"c": "a0.h1"}), "where a list of heads goes"),
    ("circuit-json-broken", lambda fx: __import__("cdist.records").records.read_record(
        __import__("cdist.types").types.Circuit, '{"groups": '), "Circuit"),
    ("task-n-0", lambda fx: _et(0), "n=0"),
    ("task-n-str", lambda fx: _et("5"), "n='5'"),
    ("task-n-float", lambda fx: _et(2.5), "n=2.5"),
    ("task-tokenizer-none", lambda fx: _et(4, tokenizer=None), "pass a Hugging Face tokenizer"),
    ("task-seed-none", lambda fx: _et(4, seed=None), "seed=None"),
    ("task-template", lambda fx: _et(4, template="nosuch"), "'nosuch'"),
    ("task-tom-corrupt", lambda fx: __import__("cdist.tasks").tasks.theory_of_mind(
        4, tokenizer=fx["tok"], corrupt="foo"), "corrupt='foo'"),
    ("cka-nan", lambda fx: _cka(NAN, torch.ones(8, 4)), "NaN"),
    ("cka-no-examples", lambda fx: _cka(torch.ones(0, 4), torch.ones(0, 4)), "0"),
    ("cka-debiased-3", lambda fx: _cka(torch.randn(3, 4), torch.randn(3, 4), debiased=True),
     "at least 4"),
    ("evaluate-batch-0", lambda fx: _evaluate(fx, batch_size=0), "batch_size=0"),
    ("evaluate-heads-outside", lambda fx: _evaluate(
        fx, heads=[__import__("cdist.types").types.Head(0, 99)]), "a0.h99 are outside the model"),
    ("evaluate-other-means", lambda fx: _evaluate(fx, means=torch.zeros(3, 8, 4, 8)),
     "are not this model's"),
    ("distill-fewer-items-than-batch", lambda fx: _distill(fx, train=_et(4)),
     "cannot fill one batch of 8"),
    ("distill-heads-outside", lambda fx: _distill(fx, teacher_heads=("a0.h1", "a7.h1")),
     "outside the model"),
    ("load-device", lambda fx: _load(fx, "student", device="cuda:7"), "'cuda:7'"),
    ("load-dtype-str", lambda fx: _load(fx, "student", dtype="bfloat16"), "dtype='bfloat16'"),
    ("load-truncated", lambda fx: _load(fx, "truncated"), "is truncated"),
    ("load-missing-weight", lambda fx: _load(fx, "missing-weight"), "lacks 1 weights"),
    ("load-garbled", lambda fx: _load(fx, "garbled-header"), "not a readable safetensors file"),
    ("experiment-regime-below-batch", lambda fx: _exp(
        regimes=(4,), distill=_cfg(batch_size=8)), "cannot fill one batch of 8"),
    ("experiment-task-kwarg", lambda fx: _exp(task_kwargs={"nboxes": 3}), "take no ['nboxes']"),
    ("cka-lists", lambda fx: _cka([[1.0, 2.0]] * 4, [[1.0, 2.0]] * 4), "takes tensors"),
    ("head-pair-half", lambda fx: __import__("cdist.types").types.HeadPair.from_dict(
        {"student": "a0.h1"}), "names its 'student' and 'teacher'"),
    ("head-map-matrix", lambda fx: __import__("cdist.matching").matching.HeadMap.from_dict(
        {"pairs": [], "student_heads": ["a0.h1"], "teacher_heads": ["a0.h1"],
         "matrix": [[0.1, 0.2]], "kind": "distance", "method": "ablation"}), "has 2 entries"),
    ("distill-items-without-columns", lambda fx: _distill(fx, train=_et(16).remove_columns(
        "pos_last")), "train_data lacks the columns ['pos_last']"),
    ("claim-a-file", lambda fx: __import__("cdist.run_folder").run_folder.claim(fx["afile"]),
     "is a file, not a folder"),
]


@pytest.fixture(scope="module")
def fx(world, model, tok, tmp_path_factory):
    return {**world, "model": model, "tok": tok, "tmp": tmp_path_factory.mktemp("api")}


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in API], ids=[c[0] for c in API])
def test_the_api_raises_one_typed_line(call, message, fx):
    before = _tree(fx["prepared"].parent), _tree(fx["tmp"])
    with unchecked(), pytest.raises(CdistError) as err:  # the function's own checks, unaided
        call(fx)
    text = str(err.value)
    assert "\n" not in text.strip() and message in text, text
    assert (_tree(fx["prepared"].parent), _tree(fx["tmp"])) == before
