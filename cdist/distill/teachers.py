"""What a run reads from its teacher: by running the model, or from a ``TeacherCache``.

A cache's stored labels, logits and head ``z`` replace the teacher's forward passes, so that a
large teacher need not be in memory while its student trains; the run is the same, to float
rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdist import evaluate
from cdist.activations import Site, head_z_dataset
from cdist.models import HookedTransformer
from cdist.store import model_fingerprint
from cdist.teacher_cache import TeacherCache, teacher_outputs

__all__ = ["CachedTeacher", "LiveTeacher", "teacher_source"]


class LiveTeacher:
    """What a run reads from its teacher, by running it (under ``torch.no_grad``)."""

    def __init__(self, teacher: HookedTransformer):
        self.model = teacher
        self.fingerprint = model_fingerprint(teacher)

    def labels(self, data) -> Tensor:
        """The teacher's answers on ``data`` (what the validation CE is taken against)."""
        with torch.no_grad():
            return evaluate.predictions(self.model, data)

    def z(self, data, sites: list[Site]) -> dict:
        """Its sites' ``z`` on ``data`` (the diagnostics' per-pair CKA)."""
        return head_z_dataset(self.model, data, sites)

    def on_batch(self, batch: dict, sites: list[Site]) -> tuple[Tensor | None, Tensor, dict]:
        """Logits at ``pos_last``, top-1 answers and the sites' ``z`` for a batch's rows."""
        return teacher_outputs(self.model, batch, sites)


class CachedTeacher:
    """The same, read from a ``TeacherCache`` (rows by the batch's item ``index``)."""

    def __init__(self, cache: TeacherCache, train_data, device: torch.device):
        self.cache, self.device = cache, device
        self.fingerprint = cache.fingerprint
        self.train = cache.items(train_data, "training items")

    def labels(self, data) -> Tensor:
        return self.cache.items(data, "evaluation items").labels

    def z(self, data, sites: list[Site]) -> dict:
        cached = self.cache.items(data, "evaluation items")
        return {site: cached.z[site] for site in sites}

    def on_batch(self, batch: dict, sites: list[Site]) -> tuple[Tensor | None, Tensor, dict]:
        rows, train = batch["index"], self.train
        logits = train.logits[rows].to(self.device) if train.logits is not None else None
        return (logits, train.labels[rows].to(self.device),
                {site: train.z[site][rows].to(self.device) for site in sites})


def teacher_source(teacher: HookedTransformer | TeacherCache | None, train_data,
                   device: torch.device) -> LiveTeacher | CachedTeacher | None:
    """The reader for ``teacher`` (None for none)."""
    if isinstance(teacher, TeacherCache):
        return CachedTeacher(teacher, train_data, device)
    return LiveTeacher(teacher) if teacher is not None else None
