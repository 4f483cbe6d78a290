"""Linear centred kernel alignment (CKA): how similar two sets of representations of the same
examples are.

Circuit distillation aligns a student head with its matched teacher head by maximising the CKA
between their activations over a batch of m examples (Kornblith et al. 2019; Wadhwa et al. 2025,
arXiv 2509.25002):

    K = X X^T,  L = Y Y^T,  H = I - 11^T / m,  HSIC(K, L) = tr(K H L H) / (m - 1)^2,
    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

X is [m, p1] and Y is [m, p2]; the widths may differ (a student head of d_head 24 against a teacher
head of d_head 16), since only the m x m Gram matrices meet. CKA is invariant to orthogonal
transforms and isotropic scaling of either side, and lies in [0, 1].

The plain ("biased") estimator above is what the paper trains with. It is biased upwards on small
batches: for unrelated data it is about p / m rather than 0. The debiased estimator replaces HSIC by
Song et al.'s (2012) unbiased U-statistic, which needs m >= 4 and can be slightly negative; report
it next to the biased one. Neither is ever clamped.

Rules for degenerate input (each gives a finite value and finite gradients):
- A side with no variance over the batch (a constant block, all zeros, or m = 1) shares no structure
  with anything: CKA is 0.
- Debiased, with a self-similarity HSIC(K, K) or HSIC(L, L) that is not positive (which the unbiased
  estimator allows on tiny or near-constant batches): 0, as above.
- Debiased with m < 4, where the U-statistic is undefined: ``ValueError``, since silently returning
  another estimator would mislabel the number.
- NaN or inf anywhere in the input: ``ValueError`` (a 0 would hide a broken forward pass).

Exact over every scale a float32 (or bf16, fp16) input can hold: each side is divided by its
largest absolute value (CKA is invariant to that, and with the divisor a constant to autograd the
gradient stays exact), then centred and multiplied in float64, so neither the fourth powers in
HSIC(K, K) nor the centring of a large common offset (``1000 + 1e-3 * Z`` against ``Z`` is about 1)
lose the value. The result is float32, with autocast off, and gradients flow to both X and Y:
nothing here detaches.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from cdist.errors import InputError

__all__ = ["hsic", "linear_cka"]


def _gram(x: Float[Tensor, "m p"]) -> Float[Tensor, "m m"]:
    return x @ x.T


def hsic(
    k: Float[Tensor, "m m"], l: Float[Tensor, "m m"], *, debiased: bool = False  # noqa: E741
) -> Float[Tensor, ""]:
    """HSIC of two Gram matrices: the plain estimator tr(KHLH) / (m - 1)^2, or Song et al.'s
    unbiased one."""
    m = k.shape[0]
    if not debiased:
        kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()  # H K H
        return (kc * l).sum() / (m - 1) ** 2
    if m < 4:
        raise InputError(f"the debiased CKA needs at least 4 examples; got {m} "
                         "(use debiased=False or a larger batch)")
    k = k - torch.diag_embed(torch.diagonal(k))  # K~: zero diagonal
    l = l - torch.diag_embed(torch.diagonal(l))  # noqa: E741
    ones_k, ones_l = k.sum(1), l.sum(1)  # K~ 1, L~ 1
    term = ((k * l).sum() + ones_k.sum() * ones_l.sum() / ((m - 1) * (m - 2))
            - 2 * (ones_k @ ones_l) / (m - 2))
    return term / (m * (m - 3))


def linear_cka(
    x: Float[Tensor, "m p1"], y: Float[Tensor, "m p2"], *, debiased: bool = False
) -> Float[Tensor, ""]:
    """Linear CKA between two representations of the same ``m`` examples (module doc: estimators,
    rules).

    Args:
        x: one row per example (e.g. a student head's z at the task position).
        y: the same examples in the other representation; any width.
        debiased: use the unbiased HSIC estimator (needs m >= 4).

    Returns:
        A float32 scalar tensor, differentiable with respect to both inputs.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError(f"linear_cka takes tensors; got {type(x).__name__} and "
                         f"{type(y).__name__} (torch.as_tensor them first)")
    if x.ndim != 2 or y.ndim != 2:
        raise InputError("linear_cka takes [examples, features] matrices; got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)} (flatten the other axes first)")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"x has {x.shape[0]} examples and y has {y.shape[0]}; "
                         "CKA compares the same examples")
    m = x.shape[0]
    if m == 0:
        raise InputError("linear_cka got no examples (0 rows); give a batch of at least 1 "
                         "(4 for the debiased estimator)")
    if debiased and m < 4:
        raise InputError(f"the debiased CKA needs at least 4 examples; got {m} "
                         "(use debiased=False or a larger batch)")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise InputError("linear_cka got NaN or inf in its input; the activations are broken "
                         "upstream (check the loss scale, the dtype and the learning rate)")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _unit_scaled(x), _unit_scaled(y)
        # Centring the features first is what H K H does to a linear kernel; in float64 it keeps a
        # large common offset from swallowing the variation.
        xc, yc = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
        varied = _varies(x, xc) & _varies(y, yc)
        k, l = _gram(xc), _gram(yc)  # noqa: E741
        # a single example: nothing to estimate, and HSIC's (m - 1) would divide by 0
        if m < 2:
            return ((k.sum() + l.sum()) * 0.0).float()
        xy = hsic(k, l, debiased=debiased)
        xx, yy = hsic(k, k, debiased=debiased), hsic(l, l, debiased=debiased)
        ok = varied & (xx > 0) & (yy > 0)
        # where() alone would still send NaN gradients
        safe = torch.where(ok, xx * yy, torch.ones_like(xx))
        return torch.where(ok, xy / safe.sqrt(), torch.zeros_like(xy)).float()


def _unit_scaled(t: Tensor) -> Tensor:
    """``t`` in float64, divided by its largest absolute value (a constant to autograd)."""
    t = t.double()
    top = t.detach().abs().amax()
    return t / torch.where(top > 0, top, torch.ones_like(top))


def _varies(t: Tensor, centred: Tensor) -> Tensor:
    """Whether any feature varies over the examples. A constant float32 (bf16, fp16) feature
    centres to exactly 0 in float64; the margin is for float64 inputs, whose constant features
    keep their own rounding (1e-16 of the feature's size) after centring."""
    t, centred = t.detach(), centred.detach()
    return (centred.norm(dim=0) > 1e-12 * t.norm(dim=0)).any()
