"""What a run logs at each evaluation besides its loss.

On the held-out ``eval_data``: accuracy, the CE on the labels (``val_ce``, Wadhwa et al. 2025's
Fig. 5, here on fixed items) and each pair's debiased CKA (``cka_val``). On a fixed probe batch of
training items: the gradient norms of the CE term and of the CKA term on the trained parameters
(``grad_ce``, ``grad_cka``) and their weighted ratio ``grad_ratio = cka_weight * grad_cka /
grad_ce``: how hard the alignment pulls against the task. A head map passed with ``cka_weight=0``
is measured the same way without entering the loss. Under ``torchrun`` rank 0 measures and gives
the row to every rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from cdist import distributed, evaluate
from cdist.activations import head_z
from cdist.cka import linear_cka
from cdist.distill.batches import batch, permutation
from cdist.distill.config import DistillConfig
from cdist.distill.loss import Objective
from cdist.distill.params import HeadDelta
from cdist.distill.plan import Plan
from cdist.distill.teachers import CachedTeacher, LiveTeacher
from cdist.models import HookedTransformer

__all__ = ["Diagnostics"]


class Diagnostics:
    """The fixed items a run is measured on, and the measurement (module doc)."""

    def __init__(self, teacher: LiveTeacher | CachedTeacher | None, plan: Plan,
                 cfg: DistillConfig, train_data, eval_data, pad: int, evaluate_fn=None):
        self.plan, self.cfg, self.eval_data, self.pad = plan, cfg, eval_data, pad
        self.evaluate_fn = evaluate_fn
        self.probe = batch(train_data, list(range(cfg.batch_size)), pad, plan.columns)
        self.probe_perm = permutation(cfg.batch_size, cfg.seed, -1) if cfg.shuffle_teacher else None
        if distributed.is_main():
            # what CE is measured against on eval_data: the teacher's answers, or the items' own
            self.t_labels = (teacher.labels(eval_data) if cfg.labels == "teacher"
                             else torch.tensor(eval_data["answer_id"]))
            self.t_val = teacher.z(eval_data, plan.teacher_sites) if plan.pairs else {}

    def measure(self, objective: Objective, student: HookedTransformer, delta: HeadDelta | None,
                trained: list[Tensor]) -> dict:
        """One row of diagnostics for the student with its trained weights, on every rank."""
        row = self._measure(objective, student, delta, trained) if distributed.is_main() else None
        return distributed.broadcast(row)

    def _measure(self, objective: Objective, student: HookedTransformer, delta: HeadDelta | None,
                 trained: list[Tensor]) -> dict:
        pairs = self.plan.pairs
        out = objective.terms(self.probe, self.probe_perm, split=False)
        row = {"grad_ce": grad_norm(out["ce"], trained)}
        if pairs:
            grad_cka = grad_norm((1 - out["cka"]).sum(), trained)
            ratio = self.cfg.cka_weight * grad_cka / row["grad_ce"] if row["grad_ce"] else None
            row |= {"grad_cka": grad_cka, "grad_ratio": ratio}
        merged = delta.merged(student) if delta is not None else contextlib.nullcontext()
        with merged, torch.no_grad():
            correct, ce, s_val = evaluation_pass(student, self.eval_data, self.t_labels,
                                                 self.plan.student_sites, self.pad)
            row |= {"accuracy": correct.float().mean().item(), "val_ce": ce}
            if pairs:
                cka_val = [float(linear_cka(s_val[(p.student, p.student_position)],
                                            self.t_val[(p.teacher, p.teacher_position)],
                                            debiased=True))
                           for p in pairs]
                row |= {"cka_val": cka_val, "cka_val_mean": sum(cka_val) / len(cka_val)}
            if self.evaluate_fn is not None:
                row |= self.evaluate_fn(student)
        return row


def grad_norm(loss: Tensor, params: list[Tensor]) -> float:
    """The norm of ``loss``'s gradient over ``params`` (0 where it does not reach them)."""
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return float(torch.sqrt(sum((g.float().square().sum() for g in grads if g is not None),
                                torch.zeros((), device=params[0].device))))


@torch.no_grad()
def evaluation_pass(model: HookedTransformer, data, labels: Tensor, sites, pad: int,
                    batch_size: int = 64) -> tuple[Tensor, float, dict]:
    """Per-item top-1 correctness, the mean CE on ``labels`` and each site's z over ``data``, in one
    pass."""
    columns = sorted({col for _, col in sites} - {"pos_last"})
    correct, ce_sum, z = [], 0.0, {site: [] for site in sites}
    starts = range(0, len(data), batch_size)
    for start, chunk in zip(starts, evaluate.batches(data, batch_size, pad, columns), strict=True):
        last, z_batch = head_z(model, chunk["input_ids"], sites, chunk)
        last = last.float()
        correct.append(last.argmax(-1).cpu() == chunk["answer_id"])
        batch_labels = labels[start : start + len(last)].to(last.device)
        ce_sum += float(F.cross_entropy(last, batch_labels, reduction="sum"))
        for site in sites:
            z[site].append(z_batch[site].float().cpu())
    z_all = {site: torch.cat(rows) for site, rows in z.items()}
    return torch.cat(correct), ce_sum / len(data), z_all
