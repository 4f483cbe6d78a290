"""Which of the student's weights a run trains, and the forward pass that sees them.

Circuit distillation (Wadhwa et al. 2025) changes only the matched student heads
(``trainable="heads"``). They train as a frozen base plus a trainable delta (``HeadDelta``): for
each head its ``W_Q`` and ``W_O`` slices (``kv_policy="qo"``, so only the trained heads change
function), or also the ``W_K`` / ``W_V`` slices of its key/value group (``kv_policy="group"``),
which under grouped-query attention the group's other query heads share, so their keys and values
change too. The deltas are the only parameters the optimizer sees, so AdamW's moments are as small
as what is trained and weight decay cannot move a frozen weight; the forward pass uses
``torch.func.functional_call`` with base + delta, so every TransformerLens hook still fires.

``trainable="all"`` trains every weight (the "fully distilled" rows). TransformerLens's zero
biases, which Llama does not have, stay frozen either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from cdist import models
from cdist.activations import Site, head_z
from cdist.distill.config import DistillConfig, KVPolicy
from cdist.models import HookedTransformer
from cdist.types import Head

__all__ = ["HeadDelta", "StudentForward", "trainable_share", "trained_parameters",
           "training_weights"]


class HeadDelta(torch.nn.Module):
    """Trainable additions to some heads' weight slices, on top of a frozen model.

    For each trained query head: ``q[layer]`` ([heads, d_model, d_head], added to ``W_Q``) and
    ``o[layer]`` ([heads, d_head, d_model], added to ``W_O``); with ``kv_policy="group"`` also
    ``k[layer]`` and ``v[layer]`` ([kv heads, d_model, d_head], added to ``_W_K`` / ``_W_V``) for
    the heads' key/value groups. All start at zero, so the patched model starts as the student.
    """

    def __init__(self, model: HookedTransformer, heads: Sequence[Head],
                 kv_policy: KVPolicy = "group"):
        super().__init__()
        cfg = model.cfg
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.heads = tuple(sorted(set(heads)))
        self.index: dict[str, Tensor] = {}
        self.deltas = torch.nn.ParameterDict()
        params = dict(model.named_parameters())
        kinds = ("q", "o", "k", "v") if kv_policy == "group" else ("q", "o")
        for layer in sorted({h.layer for h in self.heads}):
            q_heads = [h.head for h in self.heads if h.layer == layer]
            names = models.head_weights(cfg, layer, kinds)
            for kind, name in names.items():
                rows = q_heads if kind in ("q", "o") else sorted(
                    {Head(layer, h).kv_head(cfg.n_heads, n_kv) for h in q_heads})
                self._add(name, rows, params[name])

    def _add(self, name: str, rows: list[int], weight: Tensor) -> None:
        self.index[name] = torch.tensor(rows, dtype=torch.long)
        self.deltas[name.replace(".", "__")] = torch.nn.Parameter(
            torch.zeros(len(rows), *weight.shape[1:], dtype=torch.float32, device=weight.device)
        )

    def patched(self, model: HookedTransformer) -> dict[str, Tensor]:
        """Parameter name -> base + delta, for ``functional_call``; only the touched tensors."""
        params = dict(model.named_parameters())
        out = {}
        for name, rows in self.index.items():
            base = params[name]
            delta = self.deltas[name.replace(".", "__")]
            out[name] = base.index_add(0, rows.to(base.device), delta.to(base.dtype))
        return out

    @contextlib.contextmanager
    def merged(self, model: HookedTransformer) -> Iterator[None]:
        """Within the block, the model's own weights are base + delta (for evaluation with any
        code)."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.index}
        with torch.no_grad():
            for name, value in self.patched(model).items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def keep(self, model: HookedTransformer) -> None:
        """Write base + delta into the model's own weights, so that it keeps what it learnt."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.patched(model).items():
                params[name].copy_(value)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.deltas.values())


def trainable_share(model: HookedTransformer, cfg: DistillConfig, heads: Sequence[Head]) -> dict:
    """Trained heads and parameters, and their shares of the model's heads and parameters."""
    n_total = sum(p.numel() for p in model.parameters())
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    if cfg.trainable == "all":
        n = sum(p.numel() for name, p in model.named_parameters() if not is_zero_bias(name, p))
        return {"heads": n_heads, "head_share": 1.0, "params": n, "param_share": n / n_total}
    n = HeadDelta(model, heads, cfg.kv_policy).n_params()
    return {"heads": len(set(heads)), "head_share": len(set(heads)) / n_heads, "params": n,
            "param_share": n / n_total}


def is_zero_bias(name: str, p: Tensor) -> bool:
    """Whether ``p`` is one of the zero biases TransformerLens gives a Llama model, which has none;
    they stay frozen and zero."""
    return name.split(".")[-1].startswith(("b_", "_b_")) and not torch.any(p)


@contextlib.contextmanager
def training_weights(student: HookedTransformer, cfg: DistillConfig) -> Iterator[None]:
    """Within the block the student is frozen (``requires_grad`` off, so that gradients reach only
    what ``trained_parameters`` turns on) and, when every weight trains, in float32; afterwards its
    dtype and its parameters' ``requires_grad`` flags are as they were.

    AdamW on bfloat16 weights drops every update below their precision (an lr of 2e-5 on a weight
    of 0.02 is under half its spacing), so a fully trained student trains in float32 (under
    autocast on a GPU) and is cast back after; the heads' deltas are float32 anyway.
    """
    flags = [p.requires_grad for p in student.parameters()]
    dtype = next(student.parameters()).dtype
    upcast = cfg.trainable == "all" and dtype != torch.float32
    try:
        if upcast:
            models.cast(student, torch.float32)
        student.requires_grad_(False)
        yield
    finally:
        if upcast:
            models.cast(student, dtype)
        for p, flag in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def trained_parameters(student: HookedTransformer, cfg: DistillConfig, heads: Sequence[Head]
                       ) -> tuple[HeadDelta | None, list[Tensor]]:
    """The heads' delta (None when every weight trains) and the tensors the optimizer steps:
    the delta's, or every parameter of the student that is not a zero bias (turned trainable)."""
    if cfg.trainable == "heads":
        delta = HeadDelta(student, heads, cfg.kv_policy)
        return delta, list(delta.parameters())
    trained = [p for name, p in student.named_parameters() if not is_zero_bias(name, p)]
    for p in trained:
        p.requires_grad_(True)
    return None, trained


class StudentForward(torch.nn.Module):
    """The student's forward pass with the trained weights (base + delta, or its own weights when
    all train): the module ``DistributedDataParallel`` wraps. Only the trained tensors are its
    parameters, so DDP broadcasts and averages nothing else."""

    def __init__(self, student: HookedTransformer, delta: HeadDelta | None, sites: list[Site]):
        super().__init__()
        if delta is None:
            self.student = student
        else:
            self.delta = delta
            self._frozen = [student]  # a list, so that the base weights are not registered
        self.sites = sites

    def forward(self, ids: Tensor, positions: dict) -> tuple[Tensor, dict]:
        if not hasattr(self, "delta"):
            return head_z(self.student, ids, self.sites, positions)
        student = self._frozen[0]
        return head_z(student, ids, self.sites, positions, params=self.delta.patched(student))
