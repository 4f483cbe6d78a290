"""The catalogue of runs that must end well (issue 31): nothing lost, nothing hung, nothing wrong
accepted. Each case asserts its exact outcome:

- signals: ``cdist`` stopped by SIGINT or SIGTERM while it works exits with 130 or 143 after one
  line saying what the run folder kept (no traceback), and the same command then finishes with the
  results of a run never stopped (a distillation's, bit for bit);
- sizes: a count beyond what the machine can hold or the task can make (items, random circuits,
  batch, threads, seeds) is refused in one line naming the limit, before anything is allocated;
- inputs that look valid but are not (a hand-edited head map, a position no pair reads, objects
  that are also labels, a repeated value, an empty ``--out``, a circuit of another model) are
  refused in one line.

The command-line cases run ``cli.main`` in this process on ``test_bad_inputs``'s tiny checkpoints
and prepared run folder, through its harnesses; the signal cases run ``python -m cdist`` in a
subprocess and signal it once its progress shows it working.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import test_bad_inputs
import torch
from conftest import unchecked
from test_bad_inputs import RUN, SMALL, _et, _tree, folder_refuses, refused_before_writing
from test_finetune import _resumed_from

from cdist import cli
from cdist.errors import CdistError

world = test_bad_inputs.world  # its tiny checkpoints and prepared run folder, one per module
W8 = ["apple", "ball", "book", "cup", "key", "pen", "bell", "belt"]

# (id, argv, message fragment): test_bad_inputs.refused_before_writing's cases; {tmp} is the case's
# folder, which holds FILES
CLI = [
    # sizes
    ("threads-above-cores", ["discover", "--threads", "10000"], "this process may run on"),
    ("seed-2**64", ["distill", *RUN, "--seed", str(2**64)],
     "seed=18446744073709551616 is outside the seeds' range; give 0 to 4294967295"),
    ("seed-negative", ["distill", *RUN, "--seed", "-1"], "seed=-1 is outside the seeds' range"),
    ("data-seed-2**64", ["discover", "--data-seed", str(2**64)], "data_seed=18446744073709551616"),
    ("table-seeds-2**64", ["table", "--seeds", str(2**64)], "seeds=18446744073709551616"),
    ("train-items-1e8", ["distill", *RUN, "--train-items", "100000000"],
     "training items (--train-items, --regimes) 100,000,000: the items would take about"),
    ("batch-beyond-memory", ["distill", *RUN, "--train-items", "200000", "--batch-size",
                             "200000"], "--batch-size 200,000: one training step would take"),
    ("items-beyond-distinct", ["distill", *RUN, "--n-boxes", "2", "--ood-boxes", "--objects",
                               "apple", "ball", "book", "--labels", "A", "B", "C", "D",
                               "--train-items", "200"],
     "training items (--train-items, --regimes) 200: entity_tracking makes about 115 distinct "
     "train items with these words"),
    # inputs that look valid
    ("objects-are-labels", ["discover", "--objects", *W8, "--labels", *W8],
     "are both objects and labels; keep the lists apart"),
    ("ood-boxes-twice", ["discover", "--ood-boxes", "3", "3"],
     "ood=('3 boxes', '3 boxes', "),
    ("ood-templates-twice", ["discover", "--ood-templates", "compact", "compact"],
     "repeats a value"),
    ("lrs-twice", ["table", "--lrs", "1e-3", "1e-3"], "lrs=(0.001, 0.001) repeats a value"),
    ("arms-twice", ["table", "--arms", "teacher", "teacher"],
     "--arms 'teacher' 'teacher' repeats an arm; give each once"),
    ("roles-twice", ["evaluate", "--roles", "student", "student"],
     "--roles student student repeats a role"),
    ("teacher-positions-twice", ["distill", "--teacher-positions", "a0.h1=pos_last",
                                 "a0.h1=pos_prev_label"], "names a0.h1 twice"),
    ("out-empty", ["evaluate", "--out", ""],
     "argument --out: an empty value (an unset shell variable?)"),
    ("teacher-empty", ["discover", "--teacher", ""], "argument --teacher: an empty value"),
    ("config-empty", ["distill", "--config", ""], "argument --config: an empty value"),
    ("config-sets-out", ["distill", "--config", "{tmp}/out.yaml"],
     "sets out, which only the command line names; remove it and give --out"),
]
FILES = {"out.yaml": "out: elsewhere\nsteps: 2\n"}


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_a_count_beyond_its_limit_or_an_input_that_only_looks_valid_is_refused(
        argv, message, world, tmp_path, capsys):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    refused_before_writing(argv, message, world, tmp_path, capsys)


def _edit(path: Path, change) -> None:
    saved = json.loads(path.read_text())
    change(saved["value"])  # the store keeps {identity, value}
    path.write_text(json.dumps(saved))


def _maps(out: Path, change) -> None:
    _edit(out / "cache" / "head-maps.json",
          lambda value: [change(entry["map"]) for entry in value.values()])


def _stray(out: Path) -> str:
    """A teacher head outside the folder's teacher circuit."""
    circuit = json.loads((out / "circuit-teacher.json").read_text())
    inside = {h for heads in circuit["groups"].values() for h in heads}
    return next(f"a{layer}.h{head}" for layer in range(2) for head in range(4)
                if f"a{layer}.h{head}" not in inside)


# (id, damage(folder), argv, message fragment): test_bad_inputs.folder_refuses's cases
FOLDER = [
    ("head-map-repeats-a-pair", lambda out: _maps(out, lambda m: m["pairs"].append(m["pairs"][0])),
     ["distill", *RUN, "--seed", "5"], "the ablation map repeats the pairs"),
    ("head-map-unknown-position", lambda out: _maps(
        out, lambda m: m["pairs"][0].update(teacher_position="pos_zz")),
     ["distill", *RUN, "--seed", "5"], "the ablation map reads positions ['pos_zz']"),
    ("circuit-unknown-position", lambda out: _edit(
        out / "cache" / "discovery-teacher.json",
        lambda v: v["circuit"]["positions"].update(dict.fromkeys(v["circuit"]["positions"],
                                                                 "pos_zz"))),
     ["match"], "the teacher circuit reads positions ['pos_zz']"),
    ("identity-an-array", lambda out: (out / "identity.json").write_text("[1, 2]"), ["match"],
     "identity.json holds an array, not a run folder's identity"),
    ("identity-a-number", lambda out: (out / "identity.json").write_text("5"), ["match"],
     "identity.json holds a number, not a run folder's identity"),
    ("teacher-position-outside-the-circuit", lambda out: None,
     ["distill", *RUN, "--seed", "5", "--teacher-positions", "{stray}=pos_last"],
     "which is not in the teacher's circuit"),
    ("n-random-beyond-distinct", lambda out: None,
     ["evaluate", "--roles", "student", "--n-random", "100000000"],
     "distinct random circuits of that size; give --n-random"),
]


@pytest.mark.parametrize(("damage", "argv", "message"), [c[1:] for c in FOLDER],
                         ids=[c[0] for c in FOLDER])
def test_a_run_folder_whose_files_or_settings_do_not_fit_its_models_is_refused(
        damage, argv, message, world, tmp_path, capsys):
    argv = [a.replace("{stray}", _stray(world["prepared"])) for a in argv]
    folder_refuses(damage, argv, message, world, tmp_path, capsys)


def test_a_zoo_name_that_is_also_a_folder_here_takes_the_zoo_model_and_says_so(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "et-student").mkdir()
    argv = ["distill", "--teacher", "et-teacher", "--student", "et-student", "--cka-position",
            "pos_nowhere", "--device", "cpu", "--out", "run"]
    assert cli.main(argv) == 2  # refused after the models are named, before anything loads
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("cdist distill: --student et-student is a zoo model and also a path here; "
                      "taking the zoo model (write ./et-student for the path)"), err
    assert len(err) == 2 and "'pos_nowhere' is not a position column" in err[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["et-student"]


# --------------------------------------------------------------------------------------------- API
def _other_models_circuit(fx):
    from cdist.discovery import ablation, circuit_eval
    from cdist.models import load_llama
    from cdist.types import Circuit, Head

    student, items = load_llama(fx["student"]), _et(8)
    circuit = Circuit({"circuit": [Head(0, 1)]}, model=str(fx["teacher"]))
    return circuit_eval.evaluate_circuit(student, circuit, items,
                                     means=ablation.head_means(student, items), batch_size=4)


def _teacher_cache(fx, rows: int):
    """A teacher cache of 8 items whose one shard then holds ``rows`` labels."""
    from safetensors.torch import load_file, save_file

    from cdist.teacher_cache import TeacherCache, build_teacher_cache
    from cdist.types import Head

    path = fx["tmp"] / "cache"
    build_teacher_cache(fx["model"], [(Head(0, 1), "pos_last")], {"val": _et(8)}, path)
    shard = next(path.glob("val-*.safetensors"))
    tensors = load_file(shard)
    tensors["labels"] = torch.zeros(rows, dtype=tensors["labels"].dtype)
    save_file(tensors, shard)
    try:
        return TeacherCache.load(path)
    finally:
        shutil.rmtree(path)  # the case's files are gone, as the harness checks


def _repeated_pair_distill(fx):
    from cdist import distill, matching
    from cdist.types import Head

    hmap = matching.random_matcher([Head(0, 1)], [Head(1, 2)], seed=0)
    hmap = replace(hmap, pairs=hmap.pairs * 2)
    return distill.distill(fx["model"], fx["model"], hmap, _et(16), _et(8, seed=1),
                           distill.DistillConfig(steps=1, batch_size=8, eval_every=1),
                           fx["tmp"] / "run", progress=False)


def _evaluate_random(fx, n_random):
    from cdist.discovery import ablation, circuit_eval
    from cdist.types import Head

    items = _et(8)
    return circuit_eval.evaluate_circuit(fx["model"], [Head(0, 1)], items, n_random=n_random,
                                     means=ablation.head_means(fx["model"], items), batch_size=4)


def _exp(**kw):
    from cdist.pipeline import ExperimentConfig

    return ExperimentConfig(**{"task": "entity_tracking", **kw})


API = [
    ("evaluate-another-models-circuit", _other_models_circuit,
     "the circuit was found in {teacher}, not in this model ({student})"),
    ("teacher-cache-rows-differ", lambda fx: _teacher_cache(fx, 40),
     "its tensors' rows {{'labels': 40, 'z.a0.h1@pos_last': 8}} differ"),
    ("distill-repeated-pair", _repeated_pair_distill,
     "the head map repeats the pairs ['a0.h1@pos_last -> a1.h2@pos_last']"),
    ("evaluate-n-random-beyond-distinct", lambda fx: _evaluate_random(fx, 9),
     "which make only 8 distinct random circuits of that size"),
    ("experiment-ood-twice", lambda fx: _exp(ood=(("3 boxes", {"n_boxes": 3}),) * 2),
     "ood=('3 boxes', '3 boxes') repeats a value"),
    ("experiment-lambdas-twice", lambda fx: _exp(lambdas=(1.0, 1.0)), "repeats a value"),
    ("experiment-seed-2**64", lambda fx: _exp(seeds=(2**64,)), "seeds=18446744073709551616"),
    ("experiment-select-seed-negative", lambda fx: _exp(select_seed=-1), "select_seed=-1"),
    ("distill-config-seed-2**64", lambda fx: __import__("cdist.distill").distill.DistillConfig(
        seed=2**64), "seed=18446744073709551616 is outside"),
    ("task-objects-are-labels", lambda fx: _et(4, objects=W8, labels=W8),
     "are both objects and labels"),
    ("threads-above-cores", lambda fx: __import__("cdist.limits").limits.check_threads(10**4),
     "--threads 10000: this process may run on"),
]


@pytest.fixture(scope="module")
def fx(world, model, tok, tmp_path_factory):
    return {**world, "model": model, "tok": tok, "tmp": tmp_path_factory.mktemp("api-runs")}


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in API], ids=[c[0] for c in API])
def test_the_api_refuses_what_only_looks_valid_in_one_typed_line(call, message, fx):
    message = message.format(teacher=fx["teacher"], student=fx["student"])
    before = _tree(fx["prepared"].parent), _tree(fx["tmp"])
    with unchecked(), pytest.raises(CdistError) as err:
        call(fx)
    text = str(err.value)
    assert "\n" not in text.strip() and message in text, text
    assert (_tree(fx["prepared"].parent), _tree(fx["tmp"])) == before


def test_a_large_item_set_is_made_with_a_progress_bar(tok, monkeypatch, capsys):
    from cdist.tasks import common

    monkeypatch.setattr(common, "LARGE", 8)  # as large as a real one, for the bar
    _et(8)
    err = capsys.readouterr().err
    assert "train items: 8 items" in err and "train items: done, 8/8 items" in err, err


# ------------------------------------------------------------------------------------------ signals
def _stopped(argv: list[str], trigger: str | Path, signum: int) -> tuple[int, list[str]]:
    """``python -m cdist ARGV`` sent ``signum`` once a line of its stderr holds ``trigger`` (or
    once the file ``trigger`` is there): its exit status and its stderr's lines."""
    import time

    root = Path(__file__).parents[1]
    env = os.environ | {"PYTHONPATH": str(root), "CDIST_TRACEBACK": ""}
    proc = subprocess.Popen([sys.executable, "-m", "cdist", *argv], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env, cwd=root)
    watchdog = threading.Timer(300, proc.kill)  # a hang fails the test, not the suite
    watchdog.start()

    def when_there(path: Path) -> None:
        while proc.poll() is None and not path.exists():
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signum)

    if isinstance(trigger, Path):
        threading.Thread(target=when_there, args=(trigger,), daemon=True).start()
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if isinstance(trigger, str) and trigger in line:
                proc.send_signal(signum)
                break
        lines += proc.stderr.read().splitlines()
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, lines


def _check_stopped(status: int, lines: list[str], signum: int, command: str, out: Path) -> None:
    name = signal.Signals(signum).name
    said = [line for line in lines if "interrupted" in line]
    assert status == 128 + signum, lines
    assert not any("Traceback" in line for line in lines), lines
    assert said == [f"cdist {command}: interrupted by {name}; {out.resolve()} keeps the finished "
                    "work; run the same command to resume"], lines
    assert lines[-1] == said[0]


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    """The JSON files ``names`` hold the same in ``a`` and ``b`` (a circuit's groups are written
    in the order its search found them, or sorted once read back from the store)."""
    for name in names:
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


@pytest.mark.slow
def test_discover_stopped_by_sigint_in_its_search_resumes_to_the_same_circuits(world,
                                                                                tmp_path):
    out = tmp_path / "out"
    argv = ["discover", *world["models"], *SMALL, "--roles", "teacher", "--out", str(out)]
    status, lines = _stopped(argv, "path patching:", signal.SIGINT)
    _check_stopped(status, lines, signal.SIGINT, "discover", out)
    assert cli.main(argv) == 0
    assert not list(out.rglob(".*.tmp"))
    _same_files(out, world["prepared"], ["circuit-teacher.json", "discovery-teacher.json"])


@pytest.mark.slow
def test_match_stopped_by_sigterm_while_it_maps_resumes_to_the_same_maps(world, tmp_path):
    out = shutil.copytree(world["prepared"], tmp_path / "out")
    for made in ("cache/head-maps.json", "diagnostics.json"):
        (out / made).unlink()
    shutil.rmtree(out / "head_maps")
    status, lines = _stopped(["match", "--out", str(out)], "head maps:", signal.SIGTERM)
    _check_stopped(status, lines, signal.SIGTERM, "match", out)
    assert cli.main(["match", "--out", str(out)]) == 0
    names = sorted(str(p.relative_to(out)) for p in (out / "head_maps").glob("*.json"))
    _same_files(out, world["prepared"], [*names, "diagnostics.json"])


def _untimed(record):
    """``record`` (JSON) without its clock readings, which no two runs share."""
    if isinstance(record, dict):
        return {k: _untimed(v) for k, v in record.items() if "time" not in k and k != "wall"}
    return [_untimed(v) for v in record] if isinstance(record, list) else record


def _run_files(run: Path) -> tuple[dict, list, dict]:
    """A trained run's weights, metrics and evaluation, less its times."""
    state = torch.load(run / "state.pt", weights_only=False)
    return (state["weights"], _untimed(json.loads((run / "metrics.json").read_text())),
            _untimed(json.loads((run / "eval.json").read_text())))


@pytest.mark.slow
def test_distill_stopped_by_sigint_in_training_resumes_bit_for_bit(world, tmp_path):
    train = ["--steps", "8", "--eval-every", "2", "--batch-size", "8", "--train-items", "16",
             "--seed", "3"]
    straight = shutil.copytree(world["prepared"], tmp_path / "straight")
    assert cli.main(["distill", *train, "--out", str(straight)]) == 0
    out = shutil.copytree(world["prepared"], tmp_path / "out")
    argv = ["distill", *train, "--out", str(out)]
    run = "runs/n16/circuit_distilled-CE+Align_CKA-seed3"
    # stopped in training after its first checkpoint (step 2 of 8)
    status, lines = _stopped(argv, out / run / "state.pt", signal.SIGINT)
    _check_stopped(status, lines, signal.SIGINT, "distill", out)
    stopped_at = torch.load(out / run / "state.pt", weights_only=False)["step"]
    assert 0 < stopped_at < 8
    assert not (out / run / "eval.json").exists()
    with _resumed_from() as steps:
        assert cli.main(argv) == 0
    assert steps == [stopped_at]  # resumed, not trained again from step 0
    (want, *records), (got, *resumed) = _run_files(straight / run), _run_files(out / run)
    assert resumed == records
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_evaluate_stopped_by_sigterm_resumes_to_the_same_evaluation(world, tmp_path):
    argv = ["evaluate", "--roles", "student", "--out"]
    straight = shutil.copytree(world["prepared"], tmp_path / "straight")
    assert cli.main([*argv, str(straight)]) == 0
    out = shutil.copytree(world["prepared"], tmp_path / "out")
    status, lines = _stopped([*argv, str(out)], "circuit evaluation:", signal.SIGTERM)
    _check_stopped(status, lines, signal.SIGTERM, "evaluate", out)
    assert not (out / "evaluation.json").exists()
    assert cli.main([*argv, str(out)]) == 0
    _same_files(out, straight, ["evaluation.json"])


def test_a_figure_cut_short_leaves_no_file_and_a_cut_short_script_is_replaced(tmp_path,
                                                                              monkeypatch):
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from cdist import plots, static_png

    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    (tmp_path / "plotly.min.js").write_text(get_plotlyjs()[:1000])  # an earlier run, stopped

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(static_png.plt.Figure, "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        plots.save_figure(fig, tmp_path / "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html", "plotly.min.js"]
    assert (tmp_path / "plotly.min.js").read_text() == get_plotlyjs()


@pytest.mark.slow
def test_table_stopped_by_sigint_between_its_runs_resumes_to_the_same_table(world, tmp_path):
    # three runs after the one whose record triggers the signal: a loaded machine must not finish
    # them all before the signal lands (with one, a fresh clone under xdist once did)
    table = ["table", "--steps", "2", "--eval-every", "1", "--batch-size", "8", "--regimes", "16",
             "--seeds", "1", "--lrs", "1e-3", "--lambdas", "1", "--matchers", "ablation", "--arms",
             "circuit distilled, CE", "circuit distilled, CE + Align CKA",
             "circuit distilled, CE + Shuffled CKA", "circuit distilled, CE + Rand CKA"]
    straight = shutil.copytree(world["prepared"], tmp_path / "straight")
    assert cli.main([*table, "--out", str(straight)]) == 0
    out = shutil.copytree(world["prepared"], tmp_path / "out")
    first = out / "runs/n16/circuit_distilled-CE-seed1/eval.json"  # the second run is under way
    status, lines = _stopped([*table, "--out", str(out)], first, signal.SIGINT)
    _check_stopped(status, lines, signal.SIGINT, "table", out)
    assert not (out / "results.json").exists()
    finished = first.stat().st_mtime_ns
    assert cli.main([*table, "--out", str(out)]) == 0
    assert first.stat().st_mtime_ns == finished  # the finished run was kept, not redone
    assert _untimed(json.loads((out / "results.json").read_text())) == \
        _untimed(json.loads((straight / "results.json").read_text()))
    _same_files(out, straight, ["per_item.json"])
