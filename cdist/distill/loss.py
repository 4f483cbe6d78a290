"""The training loss on one batch: CE, logit KD and each matched pair's CKA, and the step's check
that the loss and its gradient are finite.

Per batch of m prompts (Wadhwa et al. 2025):

    L = ce_weight * CE(student logits at pos_last, labels)
        + cka_weight * sum over matched pairs (s, t) of (1 - CKA(z_s, z_t))
        + kd_weight * T^2 * KL(teacher || student at temperature T)

with linear CKA (Kornblith et al. 2019, ``cdist.cka``) over the batch's rows and KD as in Hinton et
al. (2015), whose T^2 keeps the soft targets' gradient on the scale of CE's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from cdist import distributed
from cdist.cka import linear_cka
from cdist.distill.config import DistillConfig
from cdist.distill.params import HeadDelta, StudentForward
from cdist.distill.plan import Plan, reads_teacher
from cdist.distill.teachers import CachedTeacher, LiveTeacher
from cdist.errors import NumericsError
from cdist.models import HookedTransformer

__all__ = ["Objective", "check_finite"]


class Objective:
    """The loss's terms and their weighted sum, differentiable in the trained parameters.

    The student runs under bfloat16 autocast on a GPU and in its own dtype on the CPU. Under
    ``torchrun`` its forward pass is wrapped in ``DistributedDataParallel`` (Li et al. 2020), which
    averages the trained weights' gradients over the ranks.
    """

    def __init__(self, student: HookedTransformer, delta: HeadDelta | None,
                 teacher: LiveTeacher | CachedTeacher | None, plan: Plan, cfg: DistillConfig,
                 device: torch.device):
        self.plan, self.cfg, self.teacher, self.device = plan, cfg, teacher, device
        on_gpu = device.type == "cuda"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu
                         else contextlib.nullcontext())
        self.forward = StudentForward(student, delta, plan.student_sites)
        self.ddp = None
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            # with no CE or KD term a head's W_O slice may reach no CKA term
            self.ddp = DistributedDataParallel(
                self.forward, device_ids=[device] if on_gpu else None,
                find_unused_parameters=not (cfg.ce_weight or cfg.kd_weight))
        self.reads_teacher = reads_teacher(cfg, plan)

    def terms(self, batch: dict, perm: Tensor | None, *, split: bool = True) -> dict[str, Tensor]:
        """CE, KD and each pair's CKA on one batch (``perm``: the shuffled control's order of the
        teacher's rows).

        With ``split`` (training) and several ranks, this rank's share of the batch's rows goes
        through DDP and each CKA term is taken over the rows gathered from every rank with their
        gradients, so that it is the global batch's CKA; CE and KD are this rank's means, which
        DDP's gradient average makes the global ones. Without it (the diagnostics) the whole batch
        runs here, as in one process.
        """
        cfg, device = self.cfg, self.device
        split = split and distributed.active()
        if split:
            take = distributed.rows(len(batch["input_ids"]))
            batch = {k: v[take] for k, v in batch.items()}
        gather = distributed.gather_rows if split else (lambda x: x)
        ids = batch["input_ids"].to(device)
        with self.autocast:
            s_logits, s_z = (self.ddp if split else self.forward)(ids, batch)
            s_logits = s_logits.float()
        answers = torch.as_tensor(batch["answer_id"], device=device)
        if not self.reads_teacher:
            return {"ce": F.cross_entropy(s_logits, answers), "cka": torch.zeros(0, device=device)}
        t_logits, t_labels, t_z = self.teacher.on_batch(batch, self.plan.teacher_sites)
        out = {"ce": F.cross_entropy(s_logits, t_labels if cfg.labels == "teacher" else answers)}
        if t_logits is not None:  # a teacher cache built without logits has no KD
            temp = cfg.kd_temperature
            out["kd"] = F.kl_div(F.log_softmax(s_logits / temp, -1),
                                 F.log_softmax(t_logits / temp, -1),
                                 log_target=True, reduction="batchmean") * temp**2
        order = slice(None) if perm is None else perm.to(device)
        terms = [linear_cka(gather(s_z[(p.student, p.student_position)]),
                            gather(t_z[(p.teacher, p.teacher_position)])[order],
                            debiased=cfg.debiased_cka) for p in self.plan.pairs]
        out["cka"] = torch.stack(terms) if terms else torch.zeros(0, device=device)
        return out

    def total(self, out: dict[str, Tensor]) -> Tensor:
        """The weighted loss (module doc)."""
        cfg = self.cfg
        loss = cfg.ce_weight * out["ce"]
        if cfg.cka_weight:
            loss = loss + cfg.cka_weight * (1 - out["cka"]).sum()
        if cfg.kd_weight:
            loss = loss + cfg.kd_weight * out["kd"]
        return loss


def check_finite(step: int, loss: Tensor, out: dict[str, Tensor], params: list[Tensor]) -> None:
    """Refuse a step whose loss or gradient is not finite, before the optimizer takes it: the run's
    last checkpoint stays the last finite state."""
    grads = [p.grad for p in params if p.grad is not None]
    finite = torch.isfinite(loss) & torch.stack([g.isfinite().all() for g in grads]).all() \
        if grads else torch.isfinite(loss)
    # every rank decides alike, or one would stop while the others wait for it
    if int(distributed.sum_across(finite.float().cpu())) == distributed.world_size():
        return
    terms = ", ".join(f"{k} {v.detach().float().sum().item():.4g}" for k, v in out.items())
    what = "loss" if not torch.isfinite(loss) else "gradient"
    raise NumericsError(f"step {step}: the {what} is not finite (loss {loss.item():.4g}: {terms}); "
                        "nothing from this step was applied or saved; lower the lr or the loss "
                        "weights, or check kd_temperature and the inputs")
