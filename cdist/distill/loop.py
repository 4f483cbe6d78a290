"""One distillation run from start (or its last checkpoint) to its results: ``distill``.

Runs are resumable: the trained weights (the deltas, or the whole state), optimizer, data order
and metrics are checkpointed atomically at every evaluation, and a saved run of other settings or
of another student, teacher, head set or training set is refused rather than continued. A finished
run's checkpoint keeps the trained weights without the optimizer's state. Metrics go to
``metrics.json`` and ``metrics.csv``. Under ``torchrun`` rank 0 evaluates, logs and checkpoints.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from cdist import distributed, evaluate, run_folder
from cdist.checkpoints import atomic_torch_save, atomic_write_json, atomic_write_text
from cdist.distill.batches import batch_stream, permutation
from cdist.distill.config import DistillConfig
from cdist.distill.diagnostics import Diagnostics
from cdist.distill.loss import Objective, check_finite
from cdist.distill.params import trainable_share, trained_parameters, training_weights
from cdist.distill.plan import Plan, checked_plan
from cdist.distill.teachers import teacher_source
from cdist.errors import InputError, RunFolderError
from cdist.matching import HeadMap
from cdist.models import HookedTransformer
from cdist.progress import bar as progress_bar
from cdist.store import items_fingerprint, model_fingerprint
from cdist.teacher_cache import TeacherCache
from cdist.types import Head

__all__ = ["Run", "distill"]


class Run:
    """One distillation run's state and steps: optimizer, checkpoints, the logged diagnostics.

    The student's weights change only through ``trained`` (``HeadDelta``'s slices, or every
    parameter that is not a zero bias); the teacher is only ever read under ``torch.no_grad``.
    """

    def __init__(self, student: HookedTransformer, teacher: HookedTransformer | TeacherCache | None,
                 plan: Plan, cfg: DistillConfig, train_data, eval_data, evaluate_fn):
        self.student, self.plan, self.cfg = student, plan, cfg
        self.device = evaluate.device_of(student)
        self.pad = evaluate.pad_id(student)
        self.delta, self.trained = trained_parameters(student, cfg, plan.heads)
        self.opt = torch.optim.AdamW(self.trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.teacher = teacher_source(teacher, train_data, self.device)
        self.objective = Objective(student, self.delta, self.teacher, plan, cfg, self.device)
        # What else must match for a saved run to be this run: the models it started from, the
        # heads and the training items (a finished run resumed on other items would be relabelled
        # as trained on them).
        self.identity = {"student": model_fingerprint(student),
                         "teacher": self.teacher.fingerprint if teacher is not None else None,
                         "heads": [str(h) for h in plan.heads],
                         "pairs": [str(p) for p in plan.pairs],
                         "train": items_fingerprint(train_data)}
        self.diagnostics = Diagnostics(self.teacher, plan, cfg, train_data, eval_data, self.pad,
                                       evaluate_fn)

    @property
    def weights(self) -> torch.nn.Module:
        """What a checkpoint keeps of the student: the deltas, or the whole model."""
        return self.delta if self.delta is not None else self.student

    def resume(self, state_path: Path) -> tuple[int, float, list[dict]]:
        """(step, wall time, metrics) of the saved run at ``state_path``, loaded into the run; zeros
        if none."""
        if not state_path.exists():
            return 0, 0.0, []
        fix = f"delete {state_path.parent} to train it anew, or write the run elsewhere"
        try:
            state = torch.load(state_path, weights_only=False, map_location=self.device)
            saved_config = state["config"]
        except Exception as err:  # noqa: BLE001 - torch.load's unpickling errors have no one type
            raise RunFolderError(f"{state_path} cannot be read ({type(err).__name__}); {fix}"
                                 ) from None
        if saved_config != asdict(self.cfg):
            differ = ", ".join(f"{k}: {saved_config.get(k)!r} there, {v!r} now"
                               for k, v in asdict(self.cfg).items() if saved_config.get(k) != v)
            raise RunFolderError(f"{state_path.parent} holds a run with other settings ({differ})"
                                 f"; {fix}")
        saved_identity = state.get("identity") or {}
        if not isinstance(saved_identity.get("student"), str):
            # fingerprints were two float sums before cdist.store's hash: this cannot tell
            raise RunFolderError(f"{state_path.parent} holds a run saved by an earlier cdist, "
                                 f"whose model fingerprints this one cannot compare; {fix}")
        if saved_identity != self.identity:
            raise RunFolderError(f"{state_path.parent} holds a run of another student, teacher, "
                                 f"head set or training set; {fix}")
        self.weights.load_state_dict(state["weights"])
        if "opt" in state:  # a finished run keeps no optimizer state (``save``)
            self.opt.load_state_dict(state["opt"])
        elif state["step"] < self.cfg.steps:
            raise InputError(f"{state_path} holds an unfinished run without its optimizer state; "
                             "delete it to start that run again")
        return state["step"], state["wall"], state["metrics"]

    def save(self, state_path: Path, step: int, wall: float, metrics: list[dict]) -> None:
        """Checkpoint the run; the optimizer's state only while it still has steps to take (AdamW's
        two moments are each the size of the trained weights, so keeping them in a finished run
        would triple its checkpoint for nothing)."""
        state = {"config": asdict(self.cfg), "weights": self.weights.state_dict(), "step": step,
                 "wall": wall, "metrics": metrics, "identity": self.identity}
        if step < self.cfg.steps:
            state["opt"] = self.opt.state_dict()
        atomic_torch_save(state, state_path)

    def step(self, batch: dict, perm: torch.Tensor | None, step: int
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step; returns the terms and loss, averaged over the ranks (the
        single-process values on the global batch)."""
        out = self.objective.terms(batch, perm)
        loss = self.objective.total(out)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        check_finite(step, loss, out, self.trained)
        self.opt.step()
        world = distributed.world_size()
        for name in ("ce", "kd"):
            if name in out:
                out[name] = distributed.sum_across(out[name].detach()) / world
        return out, self.objective.total(out).detach()

    def measure(self) -> dict:
        """The logged diagnostics (``cdist.distill.diagnostics``), computed on rank 0 and given to
        every rank."""
        return self.diagnostics.measure(self.objective, self.student, self.delta, self.trained)

    def keep(self) -> None:
        """Write the trained slices into the student's own weights, so that it keeps what it
        learnt."""
        if self.delta is not None:
            self.delta.keep(self.student)


def distill(
    student: HookedTransformer,
    teacher: HookedTransformer | TeacherCache | None,
    head_map: HeadMap | None,
    train_data,
    eval_data,
    cfg: DistillConfig,
    run_dir: str | Path,
    *,
    heads: Sequence[Head] | None = None,
    evaluate_fn=None,
    progress: bool = True,
) -> dict:
    """Distil ``teacher`` into ``student`` in place (``cdist.distill``'s package doc); resumes from
    ``run_dir``.

    Args:
        student: a HookedTransformer; its weights change (only the trained slices, unless
            trainable="all"); its parameters' ``requires_grad`` flags are as they were when
            ``distill`` returns.
        teacher: a HookedTransformer on the same tokenizer; never changes, not even its flags.
            Or a ``cdist.teacher_cache.TeacherCache`` built on ``train_data`` and ``eval_data``
            with the head map's teacher sites. None for plain fine-tuning (``labels="answers"``,
            no KD, no head map).
        head_map: student -> teacher head pairs with positions (``cdist.matching``); needed when
            ``cka_weight`` > 0 and monitored whenever given; its student heads are the trained heads
            unless ``heads`` is given.
        train_data: task items the loss is computed on (train split).
        eval_data: held-out items for the periodic accuracy, validation CE and per-pair CKA (at
            least 4).
        cfg: the run's settings.
        run_dir: checkpoints and metrics go here.
        heads: the student heads to train (default: the head map's student heads).
        evaluate_fn: optional ``f(student) -> dict`` of extra metrics at each evaluation (e.g.
            circuit accuracy).
        progress: tqdm bar.

    Returns:
        ``{"config", "trainable", "trained_heads", "pairs", "metrics": [...], "wall_time_s"}`` (also
        written to ``run_dir``).
    """
    run_dir = Path(run_dir)
    plan = checked_plan(student, teacher, head_map, heads, train_data, eval_data, cfg)
    # one process per run folder, and an unwritable one refused before any step is taken
    held = run_folder.claim(run_dir)
    try:
        with training_weights(student, cfg):
            run = Run(student, teacher, plan, cfg, train_data, eval_data, evaluate_fn)
            metrics, t0 = _train(run, train_data, run_dir / "state.pt", progress)
            run.keep()
            result = {"config": asdict(cfg),
                      "trainable": trainable_share(student, cfg, plan.heads),
                      "trained_heads": [str(h) for h in plan.heads],
                      "pairs": [p.to_dict() for p in plan.pairs],
                      "metrics": metrics, "wall_time_s": round(time.time() - t0, 1)}
            _write_results(result, run_dir)
    finally:
        held.release()
    return result


def _train(run: Run, train_data, state_path: Path, progress: bool) -> tuple[list[dict], float]:
    """Take the run's remaining steps from its checkpoint, evaluating and checkpointing every
    ``eval_every`` steps and at the last; returns the metrics and the run's start time (its wall
    time so far subtracted)."""
    cfg = run.cfg
    step, wall, metrics = run.resume(state_path)
    stream = batch_stream(train_data, cfg.batch_size, cfg.seed, run.pad, run.plan.columns)
    for _ in range(step):  # the data order continues where the run stopped
        next(stream)
    if not metrics:
        metrics.append({"step": 0, **run.measure()})
    with progress_bar(cfg.steps, "distill", enabled=progress and distributed.is_main(),
                      initial=step) as bar:
        t0 = time.time() - wall
        while step < cfg.steps:
            perm = permutation(cfg.batch_size, cfg.seed, step) if cfg.shuffle_teacher else None
            out, loss = run.step(next(stream), perm, step + 1)
            step += 1
            bar.update(1)
            bar.set_postfix(ce=f"{out['ce'].item():.3f}")
            if step % cfg.eval_every and step != cfg.steps:
                continue
            cka = out["cka"].detach()
            metrics.append({
                "step": step, "loss": loss.item(), "ce": out["ce"].item(),
                "kd": out["kd"].item() if "kd" in out else None,
                "cka_mean": cka.mean().item() if len(cka) else None,
                **run.measure(),
            })
            run.save(state_path, step, time.time() - t0, metrics)
    return metrics, t0


def _write_results(result: dict, run_dir: Path) -> None:
    """``metrics.json`` (everything) and ``metrics.csv`` (the scalar columns of each evaluation)."""
    atomic_write_json(result, run_dir / "metrics.json")
    metrics = result["metrics"]
    table = io.StringIO()
    fields = sorted({k for row in metrics for k, v in row.items() if not isinstance(v, list)},
                    key=lambda k: (k != "step", k))
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(metrics)
    atomic_write_text(table.getvalue(), run_dir / "metrics.csv")
