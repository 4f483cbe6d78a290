"""The experiment's design where it meets the data and the models: each run seed draws its own
training items (the run is the unit of replication), and a model whose weights are not the ones a
config or a run folder's results name is refused."""

import json

import pytest

from cdist.distill import DistillConfig
from cdist.errors import ConfigError, RunFolderError
from cdist.models import keep_layers, new_llama
from cdist.pipeline import Context, ExperimentConfig, make_items
from cdist.store import model_fingerprint

CFG = dict(task="entity_tracking", task_kwargs={"n_boxes": 3}, regimes=(16, 40), val_items=60,
           test_items=30, reference_items=20, discovery_items=20, seeds=(0, 1, 2),
           distill=DistillConfig(batch_size=8))


def test_each_seed_draws_its_own_training_items_apart_from_validation(tok):
    items = make_items(ExperimentConfig(**CFG), tok)
    val = set(items.val["prompt"])
    sets = {seed: items.training(40, seed)["prompt"] for seed in (0, 1, 2, 100)}
    for seed, prompts in sets.items():
        assert len(prompts) == 40 and not set(prompts) & val, seed
        assert items.training(16, seed)["prompt"] == prompts[:16]  # a seed's small set in its large
    assert len({tuple(p) for p in sets.values()}) == 4
    # the same config makes the same items, seed by seed
    again = make_items(ExperimentConfig(**CFG), tok)
    assert again.training(40, 1)["prompt"] == sets[1]
    assert again.identity(16, 1) == items.identity(16, 1) != items.identity(16, 2)


def _tiny(tok, seed):
    return new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                     vocab_size=len(tok), seed=seed, tokenizer=tok).eval()


def test_a_model_is_refused_unless_its_weights_are_those_named(tok, tmp_path):
    teacher, other = _tiny(tok, 1), _tiny(tok, 2)
    good = model_fingerprint(teacher)
    cfg = ExperimentConfig(**CFG, fingerprints={"teacher": good})
    assert Context(cfg, tmp_path / "a", {"teacher": lambda: teacher}).model("teacher") is teacher
    ctx = Context(cfg, tmp_path / "b", {"teacher": lambda: other})
    with pytest.raises(ConfigError, match="is not the model this experiment names"):
        ctx.model("teacher")
    with pytest.raises(ConfigError, match="64-digit hex fingerprint"):
        ExperimentConfig(**CFG, fingerprints={"teacher": "abc"})


def test_a_run_folder_refuses_a_rebuilt_model(tok, tmp_path):
    """Results made with one checkpoint are not trained over by another one at the same path."""
    cfg, out = ExperimentConfig(**CFG), tmp_path / "run"
    first = Context(cfg, out, {"teacher": lambda: _tiny(tok, 1)})
    with first.claim():
        first.model("teacher")
    kept = json.loads((out / "identity.json").read_text())["models"]
    assert kept == {"teacher": model_fingerprint(_tiny(tok, 1))}
    same = Context(cfg, out, {"teacher": lambda: _tiny(tok, 1)})
    with same.claim():
        same.model("teacher")
    rebuilt = Context(cfg, out, {"teacher": lambda: _tiny(tok, 2)})
    with rebuilt.claim(), pytest.raises(RunFolderError, match="another teacher .* rebuilt"):
        rebuilt.model("teacher")
    loaded_first = Context(cfg, out, {"teacher": lambda: _tiny(tok, 2)})
    loaded_first.model("teacher")  # loaded before the claim: checked when the folder is claimed
    with pytest.raises(RunFolderError, match="another teacher"):
        loaded_first.claim()


def test_the_layer_origin_comes_from_the_checkpoint_or_the_config(tok, tmp_path):
    teacher = new_llama(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                        vocab_size=len(tok), seed=1, tokenizer=tok).eval()
    cut = keep_layers(teacher, [0, 1, 3])
    loaders = {"teacher": lambda: teacher, "student": lambda: cut}
    assert Context(ExperimentConfig(**CFG), tmp_path, loaders).layer_origin() == (0, 1, 3)
    given = ExperimentConfig(**CFG, student_layer_origin=(0, 2, 3))
    assert Context(given, tmp_path, loaders).layer_origin() == (0, 2, 3)
    plain = {"teacher": lambda: teacher, "student": lambda: _tiny(tok, 3)}
    assert Context(ExperimentConfig(**CFG), tmp_path, plain).layer_origin() is None
    wrong = ExperimentConfig(**CFG, student_layer_origin=(0, 1, 2, 3))
    with pytest.raises(ValueError, match="is this student cut from this teacher"):
        Context(wrong, tmp_path, loaders).layer_origin()


def test_one_model_as_teacher_and_student_is_loaded_once(tok, tmp_path):
    """Roles given one loader (the command line does so for one model named twice) share one
    loaded model; other loaders, and fresh copies for training, still load their own."""
    loads = []

    def load():
        loads.append(1)
        return _tiny(tok, 1)

    ctx = Context(ExperimentConfig(**CFG), tmp_path / "a", {"teacher": load, "student": load})
    assert ctx.model("student") is ctx.model("teacher") and len(loads) == 1
    assert ctx.fresh("student") is not ctx.model("student") and len(loads) == 2
    apart = Context(ExperimentConfig(**CFG), tmp_path / "b",
                    {"teacher": load, "student": lambda: load()})
    assert apart.model("student") is not apart.model("teacher") and len(loads) == 4
