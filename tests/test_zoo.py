"""The organism trainer, the zoo's storage and loading, and the shipped zoo's manifests."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import unchecked
from transformers import LlamaForCausalLM

from cdist import cli, evaluate, tasks, zoo
from cdist.checkpoints import atomic_directory
from cdist.errors import RunFolderError
from cdist.models import load_llama
from cdist.zoo import organisms

REPO = Path(__file__).resolve().parents[1]
SHIPPED = zoo.names()


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    """Run the training script itself on its tiny config, into a temporary zoo."""
    root = tmp_path_factory.mktemp("zoo")
    env = {**os.environ, "CDIST_ZOO": str(root / "zoo")}
    cmd = [sys.executable, "experiments/zoo.py", "--tiny", "--run-dir", str(root / "runs"),
           "--eval-items", "300"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return root / "zoo"


@pytest.fixture
def use_zoo(tiny_zoo, monkeypatch):
    monkeypatch.setenv("CDIST_ZOO", str(tiny_zoo))
    return tiny_zoo


@pytest.mark.slow
def test_training_script_beats_chance(use_zoo):
    manifest = zoo.manifest("et-tiny")
    # Two boxes: chance is 0.5. The manifest's accuracy is on 300 fresh held-out items.
    assert manifest["accuracy"]["value"] >= 0.75, manifest["history"]
    assert manifest["steps"] == zoo.TINY_CONFIG.steps
    assert manifest["config"]["seed"] == zoo.TINY_CONFIG.seed
    assert manifest["commit"] != "" and manifest["wall_time_s"] > 0
    assert zoo.names() == ["et-tiny"]


@pytest.mark.slow
def test_zoo_load_and_export_round_trip(use_zoo, tmp_path):
    model, tokenizer = zoo.load("et-tiny")
    tokens = torch.as_tensor(organisms.held_out(zoo.TINY_CONFIG, tokenizer, 8)["input_ids"])
    out = zoo.export_hf("et-tiny", tmp_path / "hf")
    again = load_llama(out)
    assert torch.equal(again(tokens), model(tokens))
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert (hf(input_ids=tokens).logits - model(tokens)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_zoo_accuracy_matches_manifest_through_hooked_transformer(use_zoo):
    """The HookedTransformer copy scores the trained transformers model's exact held-out set the
    same."""
    model, tokenizer = zoo.load("et-tiny")
    manifest = zoo.manifest("et-tiny")
    data = organisms.held_out(zoo.TINY_CONFIG, tokenizer, 300, seed=manifest["accuracy"]["seed"])
    assert evaluate.accuracy(model, data) == pytest.approx(manifest["accuracy"]["value"], abs=1e-9)


def test_unknown_zoo_model_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CDIST_ZOO", str(tmp_path))  # an empty zoo: no training to miss a name
    with pytest.raises(FileNotFoundError) as err:
        zoo.load("et-giant")
    message = str(err.value)
    assert "\n" not in message and "et-giant" in message and "experiments/zoo.py" in message


@pytest.mark.slow
def test_cli_demo_prints_zoo_table(use_zoo, capsys):
    assert cli.main(["demo", "--items", "100", "--no-distill"]) == 0
    out = capsys.readouterr().out
    assert "et-tiny" in out and "accuracy" in out


def test_training_resumes_bit_identically(tmp_path):
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=12,
                  eval_every=4, eval_items=20)
    straight, _ = organisms.train_organism(cfg, tokenizer, tmp_path / "a", progress=False)
    organisms.train_organism(replace(cfg, steps=8), tokenizer, tmp_path / "b", progress=False)
    resumed, manifest = organisms.train_organism(cfg, tokenizer, tmp_path / "b", progress=False)
    assert manifest["steps"] == 12 and [h["step"] for h in manifest["history"]] == [4, 8, 12]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_student_stops_inside_its_window(tmp_path):
    """Early stopping: with a window that any accuracy satisfies, training ends at the first
    evaluation."""
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=50,
                  eval_every=5, eval_items=20, confirm_items=20, stop_window=(0.0, 1.0))
    _, manifest = organisms.train_organism(cfg, tokenizer, tmp_path, progress=False)
    assert manifest["steps"] == 5 and manifest["stopped_early"]
    assert manifest["history"][-1]["stop"] and "confirm_accuracy" in manifest["history"][-1]


def test_early_stop_needs_a_confirming_second_evaluation(tmp_path, monkeypatch):
    """An evaluation inside the window whose confirmation falls outside it does not stop
    training."""
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=50,
                  eval_every=5, eval_items=20, confirm_items=20, stop_window=(0.4, 0.6))
    # evaluations in order: in window, confirmation out; out; in window, confirmation in
    scores = iter([0.5, 0.9, 0.2, 0.55, 0.45])
    monkeypatch.setattr(organisms.evaluate, "accuracy", lambda *a, **k: next(scores))
    _, manifest = organisms.train_organism(cfg, tokenizer, tmp_path, progress=False)
    assert manifest["steps"] == 15 and manifest["stopped_early"]
    assert [h.get("stop") for h in manifest["history"]] == [False, None, True]


def test_multi_query_batches_supervise_only_answers():
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.ZOO_CONFIGS["et-teacher"], n_queries=3, batch_size=4, warmup_templates=())
    ids, targets = organisms.training_batch(cfg, 5, random.Random(0), tokenizer)
    objects = {tokenizer.convert_tokens_to_ids(o) for o in tasks.entity_tracking_words()[0]}
    for row, tgt in zip(ids.tolist(), targets.tolist(), strict=True):
        answers = [(i, t) for i, t in enumerate(tgt) if t != organisms.IGNORE]
        assert len(answers) == 3
        for i, t in answers:  # the target is the next token, and it is an object
            assert row[i + 1] == t and t in objects


def test_whole_warmup_batches_work_for_item_tasks():
    """Theory of mind with warmup_whole_batches: each batch is all warm-up rows or all stories."""
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.ZOO_CONFIGS["tom-teacher-dense"], batch_size=4, warmup_whole_batches=True)
    rng, believe = random.Random(0), tokenizer.convert_tokens_to_ids("believe")
    kinds = set()
    for _ in range(8):
        ids, _ = organisms.training_batch(cfg, 7, rng, tokenizer)
        stories = [believe in row for row in ids.tolist()]
        assert len(stories) == 4 and len(set(stories)) == 1
        kinds.add(stories[0])
    assert kinds == {True, False}


def test_zoo_dir_is_the_repository_zoo_folder(monkeypatch):
    monkeypatch.delenv("CDIST_ZOO", raising=False)
    assert zoo.zoo_dir() == REPO / "zoo"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_manifests_still_make_configs(name):
    """A manifest stores its training config, which must keep loading as the class grows."""
    config = zoo.manifest(name)["config"]
    cfg = organisms.OrganismConfig.from_dict(config)
    assert cfg.name == name and cfg.task == config["task"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"task": "greater_than"}, "unknown task 'greater_than'; choose from ['entity_tracking', 'io"),
    ({"template": "causaltom"}, "template 'causaltom' is not a template of entity_tracking"),
    ({"warmup_templates": ("causaltom",)}, "warmup_templates ['causaltom'] are not entity"),
    ({"batch_size": 0}, "batch_size=0; it must be at least 1"),
    ({"steps": -1}, "steps=-1; it must be at least 0"),
    ({"head_sparsity": -0.1}, "head_sparsity=-0.1; it must be at least 0"),
    ({"lr": 0.0}, "lr=0.0; it must be positive"),
    ({"n_kv_heads": 3}, "must be a multiple of n_kv_heads=3"),
    ({"curriculum_start": 3}, "curriculum_start=3; use None or 2 to n_boxes=2"),
    ({"curriculum_threshold": 1.5}, "curriculum_threshold=1.5 is not in [0, 1]"),
    ({"stop_window": (0.7, 0.4)}, "stop_window=(0.7, 0.4); give (low, high)"),
    ({"free_heads": ("k6",)}, "'k6' is not a head name"),
    ({"free_heads": ("a2.h0",)}, "free head a2.h0 is outside the model (2 layers x 8 heads)"),
    ({"self_distill": True}, "self_distill fits the init_from model's outputs"),
    ({"betas": (0.9, 1.0)}, "betas=(0.9, 1.0); give two numbers in [0, 1)"),
    ({"grad_clip": 0.0}, "grad_clip=0.0; it must be positive"),
    ({"max_positions": 1}, "max_positions=1; it must be at least 2"),
])
def test_organism_config_refuses_bad_values(changes, message):
    # Its own checks, as a caller without the type checker meets them.
    with unchecked(), pytest.raises(ValueError, match=re.escape(message)):
        replace(zoo.TINY_CONFIG, **changes)


class _Vocabulary:
    """A stand-in tokenizer whose special tokens are not the word tokenizer's 0, 1, 2."""

    bos_token_id, eos_token_id, pad_token_id = 7, 5, 3

    def __len__(self) -> int:
        return 40


def test_new_organism_takes_its_special_ids_from_the_tokenizer():
    config = organisms.new_organism(replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2,
                                            d_mlp=64), _Vocabulary()).config
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id,
            config.pad_token_id) == (40, 7, 5, 3)
    tokenizer = zoo.organism_tokenizer()
    config = organisms.new_organism(zoo.TINY_CONFIG, tokenizer).config
    assert (config.bos_token_id, config.pad_token_id) == (tokenizer.bos_token_id,
                                                          tokenizer.pad_token_id)


def test_training_uses_the_configured_betas_and_clipping(tmp_path, monkeypatch):
    seen = {}
    real_clip, real_adamw = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW

    def clip(parameters, max_norm):
        seen.setdefault("clip", max_norm)
        return real_clip(parameters, max_norm)

    def adamw(params, **kw):
        seen.setdefault("betas", kw["betas"])
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=1,
                  eval_items=10, betas=(0.8, 0.9), grad_clip=0.25)
    organisms.train_organism(cfg, zoo.organism_tokenizer(), tmp_path, progress=False)
    assert seen == {"clip": 0.25, "betas": (0.8, 0.9)}


def test_training_leaves_no_hooks_on_the_model(tmp_path, monkeypatch):
    """The head-output penalty's hooks go when training ends, normally or by an error: the returned
    model (and one whose training failed) collects nothing."""
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=2,
                  eval_every=1, eval_items=10, head_sparsity=0.2)

    def hooked(model) -> list:
        modules = [m for layer in model.model.layers for m in (layer, layer.self_attn.o_proj)]
        return [m for m in modules if m._forward_pre_hooks or m._forward_hooks]

    model, _ = organisms.train_organism(cfg, tokenizer, tmp_path / "a", progress=False)
    assert hooked(model) == []
    made, new_organism = [], organisms.new_organism

    def recorded(*args):
        made.append(new_organism(*args))
        return made[-1]

    monkeypatch.setattr(organisms, "new_organism", recorded)

    def interrupted(*args, **kwargs):
        assert hooked(made[0]) != []  # the penalty is collecting while training runs
        raise RuntimeError("interrupted")

    monkeypatch.setattr(organisms.evaluate, "accuracy", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        organisms.train_organism(cfg, tokenizer, tmp_path / "b", progress=False)
    assert len(made) == 1 and hooked(made[0]) == []


def test_atomic_directory_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="holds files cdist did not write"):
        atomic_directory(tmp_path, lambda tmp: None)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------- the shipped zoo


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_accuracy_matches_manifest(name):
    model, tokenizer = zoo.load(name)
    manifest = zoo.manifest(name)
    cfg = organisms.OrganismConfig.from_dict({**manifest["config"], "stop_window": None})
    fresh = organisms.held_out(cfg, tokenizer, 1000, seed=99)  # not the manifest's seed
    assert abs(evaluate.accuracy(model, fresh) - manifest["accuracy"]["value"]) <= 0.03


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("-student")])
def test_shipped_students_are_warm_and_smaller(name):
    student = zoo.manifest(name)
    teacher = zoo.manifest(name.replace("-student", "-teacher"))
    s, t = student["config"], teacher["config"]
    assert 0.35 <= student["accuracy"]["value"] <= 0.80
    assert student["accuracy"]["value"] <= teacher["accuracy"]["value"] - 0.10
    assert s["n_layers"] * s["n_heads"] >= 32
    assert s["n_layers"] < t["n_layers"] or s["d_model"] < t["d_model"]


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("-teacher")])
def test_shipped_teachers_have_learnt_the_task(name):
    assert zoo.manifest(name)["accuracy"]["value"] >= 0.90


def test_shipped_zoo_is_small():
    size = (sum(f.stat().st_size for f in zoo.zoo_dir().rglob("*") if f.is_file())
            if SHIPPED else 0)
    assert size < 40e6
    for name in SHIPPED:
        assert json.loads((zoo.zoo_dir() / name / "manifest.json").read_text())["name"] == name


def _penalty_of(model, ids, power):
    penalty = organisms.HeadOutputPenalty(model, power)
    model.train()
    model(ids)
    return penalty.take(), penalty


def test_head_output_penalty_ignores_the_stream_scale_and_evaluation_passes():
    """Scaling the whole residual stream (embeddings, o_proj, down_proj) by c leaves the penalty
    unchanged; silencing any one head's o_proj lowers it; eval-mode passes add nothing."""
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)
    model = organisms.new_organism(cfg, tokenizer)
    # the norms' epsilon is the only thing that sees the stream's scale
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-20
    ids = torch.randint(4, len(tokenizer), (3, 11), generator=torch.Generator().manual_seed(0))
    base, penalty = _penalty_of(model, ids, 1.0)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert penalty.terms == []
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(3.0)
            layer.mlp.down_proj.weight.mul_(3.0)
    scaled, _ = _penalty_of(model, ids, 1.0)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-4)
    d_head = cfg.d_model // cfg.n_heads
    per_head = []
    for h in range(cfg.n_heads):  # the first layer's heads one at a time: each term is one head's
        w = model.model.layers[0].self_attn.o_proj.weight
        saved = w[:, h * d_head:(h + 1) * d_head].clone()
        with torch.no_grad():
            w[:, h * d_head:(h + 1) * d_head] = 0
        per_head.append(scaled.item() - _penalty_of(model, ids, 1.0)[0].item())
        with torch.no_grad():
            w[:, h * d_head:(h + 1) * d_head] = saved
    assert all(t > 0 for t in per_head)
    concave, _ = _penalty_of(model, ids, 0.5)
    assert concave.item() > scaled.item()  # each ratio is below 1, so its square root is larger


@pytest.mark.slow
def test_discovery_and_figure_scripts_run_on_a_zoo(use_zoo, tmp_path):
    from cdist.records import read_record
    from cdist.types import Circuit

    env = {**os.environ, "CDIST_ZOO": str(use_zoo)}
    out, figures = tmp_path / "discovery", tmp_path / "figures"
    cmd = [sys.executable, "experiments/discovery.py", "--only", "et-tiny", "--out", str(out),
           "--figures", str(figures), "--reference-items", "60", "--discovery-items", "16",
           "--eval-items", "60", "--n-random", "2"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text())
    # both, for ET
    assert [r["method"] for r in results["results"]] == ["path_patching", "mean_ablation"]
    for row in results["results"]:
        assert row["model"] == "et-tiny" and results["commit"]
        assert results["command"].startswith("cdist zoo circuits --only et-tiny")
        assert results["config"]["eval_items"] == 60
        assert 0 <= row["circuit_accuracy"] <= 1 and row["n_heads"] == 16
        assert row["faithfulness"] == pytest.approx(row["circuit_accuracy"] / row["full_accuracy"])
        circuit = read_record(Circuit, out / "circuits" / f"et-tiny-{row['method']}.json")
        assert [str(h) for h in circuit.heads] == row["circuit"]
        assert circuit.method == row["method"]
        assert f"| et-tiny | {row['method']} |" in (out / "results.md").read_text()
    drawn = sorted(p.name for p in figures.glob("*.png"))
    assert "et-tiny-path_patching_value_fetcher.png" in drawn
    assert "et-tiny-ablation_prob_drop.png" in drawn
    # the figure script redraws them from the saved scores alone
    again = tmp_path / "again"
    cmd = [sys.executable, "experiments/figures.py", "--out", str(out), "--figures", str(again)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    assert sorted(p.name for p in again.glob("*.png")) == drawn


def test_early_stop_waits_for_stop_after(tmp_path, monkeypatch):
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=50,
                  eval_every=5, eval_items=20, confirm_items=20, stop_window=(0.4, 0.6),
                  stop_after=10)
    # always inside the window
    monkeypatch.setattr(organisms.evaluate, "accuracy", lambda *a, **k: 0.5)
    _, manifest = organisms.train_organism(cfg, tokenizer, tmp_path, progress=False)
    assert manifest["steps"] == 10 and manifest["stopped_early"]


def test_free_heads_are_spared_by_the_penalty_and_only_they():
    """The penalty with some heads spared equals the full penalty minus exactly those heads'
    terms."""
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)
    model = organisms.new_organism(cfg, tokenizer)
    ids = torch.randint(4, len(tokenizer), (3, 11), generator=torch.Generator().manual_seed(0))
    full, _ = _penalty_of(model, ids, 0.5)
    spared = organisms.HeadOutputPenalty(model, 0.5, ("a1.h2",))
    model(ids)
    with_free = spared.take()
    spared.remove()
    w = model.model.layers[1].self_attn.o_proj.weight
    with torch.no_grad():  # silencing a1.h2 leaves its term at (0 + 1e-8) ** 0.5 = 1e-4
        w[:, 2 * 8:3 * 8] = 0
    without, _ = _penalty_of(model, ids, 0.5)
    assert with_free.item() == pytest.approx(without.item() - 1e-4, abs=1e-5)
    assert with_free.item() < full.item()
    with pytest.raises(ValueError, match="outside the model"):
        organisms.HeadOutputPenalty(model, 0.5, ("a2.h0",))


def test_init_from_starts_at_the_given_weights_and_is_required(tmp_path):
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=0)
    base = organisms.new_organism(replace(cfg, seed=7), tokenizer).state_dict()
    tuned = replace(cfg, init_from="base")
    model, _ = organisms.train_organism(tuned, tokenizer, tmp_path / "a", init=base, progress=False)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="init_from"):
        organisms.train_organism(tuned, tokenizer, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="init_from"):
        organisms.train_organism(cfg, tokenizer, tmp_path / "c", init=base, progress=False)


def test_self_distillation_fits_the_init_model_not_the_labels(tmp_path):
    """Its loss is KL(init || model) at the answers: 0 on the first step (the model is its init),
    > 0 once the penalty has moved it; without init_from it is refused."""
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=6,
                  eval_every=1, eval_items=20, head_sparsity=1.0, init_from="base",
                  self_distill=True, lr=1e-2, warmup=1)
    base = organisms.new_organism(replace(cfg, seed=7), tokenizer).state_dict()
    _, manifest = organisms.train_organism(cfg, tokenizer, tmp_path / "a", init=base,
                                           progress=False)
    losses = [h["loss"] for h in manifest["history"]]
    assert losses[0] == pytest.approx(0.0, abs=1e-6) and losses[-1] > 1e-4
    with pytest.raises(ValueError, match="self_distill"):
        organisms.train_organism(replace(cfg, init_from=None), tokenizer, tmp_path / "b",
                                 progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith(("-teacher", "-student"))])
def test_shipped_organisms_have_small_faithful_circuits(name):
    """The zoo's point (SPEC 3, issue 3's aim): the top 20% of the heads by mean-ablation impact,
    ranked on some items, keep at least 0.8 of the accuracy on others and beat random circuits of
    their size. The *-dense models are the ones that do not (README, "The zoo")."""
    from cdist.discovery import ablation, circuit_eval, circuits

    model, tokenizer = zoo.load(name)
    cfg = organisms.OrganismConfig.from_dict(zoo.manifest(name)["config"])
    reference, found_on, evaluation = (organisms.held_out(cfg, tokenizer, n, seed=seed)
                                       for n, seed in ((500, 71), (200, 72), (1000, 73)))
    means = ablation.head_means(model, reference)
    scan = ablation.head_ablation_scan(model, found_on, means=means)
    circuit = circuits.ranked_circuit(scan, int(0.2 * cfg.n_layers * cfg.n_heads))
    result = circuit_eval.evaluate_circuit(model, circuit, evaluation, means=means, n_random=5,
                                           seed=0)
    assert result["faithfulness"] >= 0.8
    assert result["circuit_accuracy"] > result["random_accuracy"] + 0.05


def test_head_penalty_weight_ramps_up_linearly(tmp_path):
    tokenizer = zoo.organism_tokenizer()
    cfg = replace(zoo.TINY_CONFIG, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, steps=6,
                  eval_every=1, eval_items=10, head_sparsity=0.2, head_sparsity_ramp=4)
    _, manifest = organisms.train_organism(cfg, tokenizer, tmp_path, progress=False)
    weights = [h["head_penalty_weight"] for h in manifest["history"]]
    assert weights == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])


def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path):
    import os

    from cdist.checkpoints import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text("x", tmp_path / "atomic.txt")
    assert os.stat(tmp_path / "atomic.txt").st_mode == os.stat(plain).st_mode
