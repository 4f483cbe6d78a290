"""Training runs and evaluations: one arm's run of the student at one lr, lambda, seed and
training regime, and the accuracies every row of the table is made of.

A run's record (its folder's ``eval.json``) holds its identity beside its results: the arm's
training config, the pairs and heads it trained, its items' fingerprints, the number of random
circuits its evaluation draws, and the teacher's and base student's fingerprints; the same
identity reuses the record (an untrained row's too: its model's fingerprint, circuit, items and
seed), and an interrupted run resumes from its checkpoint
(``cdist.distill``). Per-item correctness is kept as strings of 0/1 (test and OOD sets), so every
statistic can be recomputed from the records.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from cdist import arms, distill, matching
from cdist.discovery import ablation, circuit_eval
from cdist.evaluate import predictions
from cdist.matching import HeadMap
from cdist.models import HookedTransformer
from cdist.pipeline.circuits import Circuits
from cdist.pipeline.config import Role
from cdist.pipeline.context import Context
from cdist.types import Head

__all__ = ["bits", "evaluate_model", "evaluation_run", "ood_accuracies", "run_dir", "slug",
           "train_run", "unbits"]


def bits(correct: torch.Tensor) -> str:
    """Per-item correctness as a string of 0/1."""
    return "".join("1" if c else "0" for c in correct.tolist())


def unbits(text: str) -> torch.Tensor:
    return torch.tensor([b == "1" for b in text])


def ood_accuracies(ood: dict[str, str]) -> dict[str, float]:
    """Each OOD set's accuracy from its per-item bits (a record's ``ood``); empty sets left out."""
    return {name: text.count("1") / len(text) for name, text in ood.items() if text}


def slug(arm_name: str) -> str:
    """An arm's name as a folder name."""
    return (arm_name.replace(", ", "-").replace(" + ", "+").replace(" ", "_")
            .replace("(", "").replace(")", ""))


def run_dir(ctx: Context, arm: arms.Arm, n_train: int, seed: int) -> Path:
    """Where the table keeps ``arm``'s run of ``n_train`` items and ``seed``."""
    return ctx.out / "runs" / f"n{n_train}" / f"{slug(arm.name)}-seed{seed}"


def evaluate_model(ctx: Context, circuits: Circuits, model: HookedTransformer, role: Role,
                   seed: int = 0) -> dict:
    """Test accuracy of ``model`` in full and of ``role``'s circuit in it (every other head
    mean-ablated), random circuits of its size, faithfulness, and per-item bits (test and OOD).
    A trained model's means are its own, recomputed on the reference items."""
    items = ctx.items
    loaded = ctx.has(role) and model is ctx.model(role)
    means = ctx.means(role) if loaded else ablation.head_means(model, items.reference)
    result = circuit_eval.evaluate_circuit(model, circuits.of(role), items.test, means=means,
                                       n_random=ctx.cfg.n_random, seed=seed,
                                       progress=ctx.progress)
    keys = ("full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness")
    ood = {name: bits(predictions(model, d) == torch.tensor(d["answer_id"]))
           for name, d in items.ood.items()}
    return {**{k: result[k] for k in keys}, "test_full": bits(result["full_correct"]),
            "test_circuit": bits(result["circuit_correct"]), "ood": ood}


def evaluation_run(ctx: Context, circuits: Circuits, role: Role, seed: int) -> dict:
    """``role``'s model evaluated as it is (an untrained row: base student, teacher), its record
    kept in ``evaluations/<role>-seed<seed>.json`` and reused for the same model, circuit, items,
    random circuits and seed: at real depth each is minutes of test and OOD items, once per
    seed. Not under ``runs/``, whose folders are trained runs."""
    identity = {"models": {role: ctx.fingerprint(role)},
                "heads": [str(h) for h in circuits.heads(role)],
                "items": ctx.items.scored_on(), "n_random": ctx.cfg.n_random, "seed": seed}
    kept = ctx.store.record(f"evaluations/{role}-seed{seed}.json", identity,
                            lambda: evaluate_model(ctx, circuits, ctx.model(role), role, seed))
    return {k: v for k, v in kept.items() if k not in identity}  # a row as it was made


def _all_heads(model: HookedTransformer) -> list[Head]:
    return [Head(layer, h) for layer in range(model.cfg.n_layers)
            for h in range(model.cfg.n_heads)]


def train_run(ctx: Context, circuits: Circuits, arm: arms.Arm, *, n_train: int, seed: int,
              lr: float, lam: float, head_map: HeadMap, folder: Path) -> dict:
    """``arm``'s run (module doc), its record reused from ``folder/eval.json`` when it is the
    same run."""
    cfg, s_heads = ctx.cfg, circuits.heads("student")
    dcfg = arm.config(cfg.distill, lam=lam, lr=lr, control_lr=cfg.control_lr, seed=seed)
    used = head_map
    if arm.cka == "random":
        used = matching.random_control(head_map, _all_heads(ctx.model("teacher")), seed=seed,
                                       exclude=circuits.heads("teacher"))
    identity = {"config": asdict(dcfg), "pairs": [str(p) for p in used.pairs],
                "heads": [str(h) for h in s_heads], "train_items": n_train,
                "items": ctx.items.identity(n_train, seed), "n_random": cfg.n_random,
                "models": {"teacher": ctx.fingerprint("teacher"),
                           "student": ctx.fingerprint("student")}}

    def train() -> dict:
        model = ctx.fresh("student")
        history = distill.distill(model, ctx.model("teacher"), used,
                                  ctx.items.training(n_train, seed),
                                  ctx.items.val, dcfg, folder, heads=s_heads,
                                  progress=ctx.progress)
        return {"metrics": history["metrics"], "trainable": history["trainable"],
                "wall_time_s": history["wall_time_s"],
                **evaluate_model(ctx, circuits, model, "student")}

    # the store's names are relative to the run folder, where every run of it lies
    return ctx.store.record(folder.relative_to(ctx.out) / "eval.json", identity, train)
