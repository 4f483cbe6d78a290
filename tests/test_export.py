"""A trained run taken away (``cdist.distill.export``, ``cdist export``): the checkpoint is the
trained student by round trip through transformers and ``load_llama``, a circuit arm's export
differs from its base in the trained slices alone, and a folder that is not a finished run of that
base, or an output folder that is not a checkpoint, is refused in one line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from cdist import cli, distill, matching, tasks
from cdist.models import load_llama, new_llama, save_llama
from cdist.types import Head

TRAIN = [Head(1, 0), Head(1, 3)]  # kv groups 0 and 1 of layer 1 (4 heads, 2 kv heads)
CFG = distill.DistillConfig(steps=2, lr=3e-2, batch_size=8, cka_weight=1.0, eval_every=2,
                            kv_policy="group")
RUN = ("runs", "n16", "circuit_distilled-CE+Align_CKA-seed0")  # where cdist distill puts a run


def _llama(tok, seed, dtype=torch.float32):
    return new_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                     vocab_size=len(tok), seed=seed, tokenizer=tok, dtype=dtype).eval()


def _train(tok, tmp, cfg, dtype=torch.float32):
    """A base student checkpoint, a run trained from it in ``tmp/exp/runs/...`` (whose
    ``config.yaml`` names the student, as the command line's steps write it) and the trained
    student."""
    base = save_llama(_llama(tok, 1, dtype), tmp / "base")
    (tmp / "exp").mkdir()
    (tmp / "exp" / "config.yaml").write_text(yaml.safe_dump({"student": str(base)}))
    items = [tasks.entity_tracking(n, tokenizer=tok, n_boxes=3, template="compact", seed=seed,
                                   split=split) for n, seed, split in ((16, 0, "train"),
                                                                       (8, 1, "test"))]
    student = load_llama(base, dtype=dtype)
    head_map = matching.random_matcher(TRAIN, [Head(0, 1), Head(1, 2)], seed=0)
    run = tmp.joinpath("exp", *RUN)
    distill.distill(student, _llama(tok, 2, dtype), head_map, *items, cfg, run, progress=False)
    return base, run, student


@pytest.fixture(scope="module")
def circuit_run(tok, tmp_path_factory):
    return _train(tok, tmp_path_factory.mktemp("circuit"), CFG)


@torch.no_grad()
def _tokens(tok) -> torch.Tensor:
    return torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_circuit_run_round_trips_and_changes_only_the_trained_slices(tok, circuit_run, tmp_path):
    base, run, trained = circuit_run
    out = distill.export_run(run, load_llama(base), tmp_path / "student")
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        tokens = _tokens(tok)
        assert (hf(tokens).logits - trained(tokens)).abs().max().item() <= 1e-4
    reloaded, before = _weights(load_llama(out)), _weights(load_llama(base))
    assert reloaded.keys() == _weights(trained).keys()
    assert all(torch.equal(v, _weights(trained)[k]) for k, v in reloaded.items())
    # kv_policy="group": the heads' query/output rows and their key/value groups' rows, no other
    moved = {"blocks.1.attn.W_Q": {0, 3}, "blocks.1.attn.W_O": {0, 3},
             "blocks.1.attn._W_K": {0, 1}, "blocks.1.attn._W_V": {0, 1}}
    for name, value in reloaded.items():
        rows = range(value.shape[0]) if name in moved else [...]
        changed = {r for r in rows if not torch.equal(value[r], before[name][r])}
        assert changed == (moved[name] if name in moved else set()), name
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_full_run_exports_every_trained_weight(tok, tmp_path):
    base, run, trained = _train(tok, tmp_path, replace(CFG, trainable="all", cka_weight=0.0))
    out = distill.export_run(run, load_llama(base), tmp_path / "student")
    reloaded, before = _weights(load_llama(out)), _weights(load_llama(base))
    assert all(torch.equal(v, _weights(trained)[k]) for k, v in reloaded.items())
    assert not torch.equal(reloaded["blocks.0.mlp.W_in"], before["blocks.0.mlp.W_in"])


def test_a_bfloat16_run_exports_in_bfloat16_from_a_float32_base(tok, tmp_path):
    """A run on a GPU loads its student in bfloat16; the command line loads the base in float32,
    which the fingerprint tells to cast back."""
    base, run, trained = _train(tok, tmp_path, CFG, dtype=torch.bfloat16)
    model = distill.trained_student(load_llama(base, dtype=torch.float32), run)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(v, _weights(trained)[k]) for k, v in _weights(model).items())


def test_the_command_finds_the_base_student_in_the_run_folder(tok, circuit_run, tmp_path, capsys):
    base, run, trained = circuit_run
    out = tmp_path / "student"
    assert cli.main(["export", str(run), "--to", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    reloaded = _weights(load_llama(out))
    assert all(torch.equal(v, _weights(trained)[k]) for k, v in reloaded.items())
    # again onto its own earlier export: a checkpoint folder is replaced
    assert cli.main(["export", str(run), "--to", str(out), "--student", str(base)]) == 0


def _refused(argv, capsys, *words) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdist: error:"), err
    assert all(w in err[0] for w in words), err[0]


def test_bad_input_is_one_line(tok, circuit_run, tmp_path, capsys):
    base, run, _ = circuit_run
    out = str(tmp_path / "student")
    (tmp_path / "empty").mkdir()
    _refused(["export", str(tmp_path / "empty"), "--to", out], capsys, "no state.pt")
    _refused(["export", str(tmp_path / "absent"), "--to", out], capsys, "not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    _refused(["export", str(run), "--to", str(tmp_path / "notes")], capsys,
             "holds files cdist did not write (todo.txt)")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    _refused(["export", str(run), "--to", str(run)], capsys, "holds files cdist did not write")
    _refused(["export", str(run), "--to", str(base)], capsys, "base student's own")
    other = save_llama(_llama(tok, 5), tmp_path / "other")
    _refused(["export", str(run), "--to", out, "--student", str(other)], capsys,
             "not trained from this student")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "state.pt").write_bytes(b"not a checkpoint")
    _refused(["export", str(garbage), "--to", out, "--student", str(base)], capsys,
             "cannot be read")
    # an unfinished run: its checkpoint before the last step
    state = torch.load(run / "state.pt", weights_only=False)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    torch.save({**state, "step": 1}, unfinished / "state.pt")
    _refused(["export", str(unfinished), "--to", out, "--student", str(base)], capsys,
             "unfinished")
    _refused(["export", str(unfinished), "--to", out], capsys, "--student")  # no config.yaml
    assert not (tmp_path / "student").exists()
