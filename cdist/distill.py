"""Circuit distillation: train only the matched student heads, on the task loss plus CKA alignment.

The loss (SPEC section 1.4), per batch of m prompts:

    L = ce_weight * CE(student logits at pos_last, teacher's predicted answer)
        + cka_weight * sum over matched pairs (s, t) of (1 - CKA(z_s, z_t))
        + kd_weight * T^2 * KL(teacher || student at temperature T)

where z_s and z_t are the heads' outputs at ``cka_position`` (one row per prompt, never a padding position).
CE only, Align CKA only, CE + Align CKA, CE + Rand CKA (a random ``HeadMap``) and logit KD are all settings of
one ``DistillConfig``.

Only the chosen student heads change (``trainable="heads"``). They are trained as a frozen base plus a
trainable delta: for each head its ``W_Q`` and ``W_O`` slices, and (``kv_policy="group"``, the default) the
``W_K`` / ``W_V`` slices of its key/value group, which under grouped-query attention the group's other query
heads share; ``kv_policy="qo"`` leaves keys and values alone. The deltas are the only parameters the
optimizer sees, so AdamW's moments are as small as what is trained and weight decay cannot move a frozen
weight; the forward pass uses ``torch.func.functional_call`` with base + delta, so every TransformerLens hook
still fires. ``trainable="all"`` trains every weight (the "fully distilled" rows); TransformerLens's zero
biases, which Llama does not have, stay frozen either way.

Runs are resumable: the deltas (or the whole state), optimizer, data order and metrics are checkpointed
atomically every evaluation. Metrics go to ``metrics.json`` and ``metrics.csv`` with the CE component logged
on its own (the paper's Fig. 5). bfloat16 autocast on a GPU, float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from cdist import evaluate
from cdist.activations import head_z
from cdist.checkpoints import atomic_torch_save, atomic_write_json, atomic_write_text
from cdist.cka import linear_cka
from cdist.matching import HeadMap
from cdist.types import Head

__all__ = ["DistillConfig", "HeadDelta", "distill", "trainable_share"]


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run.

    Attributes:
        steps: optimizer steps.
        lr: AdamW learning rate (the paper: 2e-5 for Llama; organisms need more).
        batch_size: prompts per step (also the m of CKA).
        ce_weight: weight of CE on the teacher's labels (0 for "Align CKA only").
        cka_weight: lambda, the weight of sum (1 - CKA) over the head map's pairs (0 for "CE only").
        kd_weight: weight of logit KD (the standard-distillation baseline); temperature ``kd_temperature``.
        trainable: "heads" (the head map's student heads) or "all" (full-parameter training).
        kv_policy: "group" (a head's key/value group trains with it) or "qo" (only W_Q and W_O).
        cka_position: position column the heads' z is read at.
        debiased_cka: train on the debiased estimator instead of the plain one (the plain one is logged too).
        weight_decay: AdamW weight decay on the trained parameters (deltas decay towards the base weights).
        eval_every: steps between evaluations (and checkpoints).
        seed: data order.
    """

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    ce_weight: float = 1.0
    cka_weight: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    trainable: str = "heads"
    kv_policy: str = "group"
    cka_position: str = "pos_last"
    debiased_cka: bool = False
    weight_decay: float = 0.0
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trainable not in ("heads", "all"):
            raise ValueError(f"trainable={self.trainable!r}; choose 'heads' or 'all'")
        if self.kv_policy not in ("group", "qo"):
            raise ValueError(f"kv_policy={self.kv_policy!r}; choose 'group' or 'qo'")
        if self.ce_weight == self.cka_weight == self.kd_weight == 0:
            raise ValueError("every loss weight is 0; set ce_weight, cka_weight or kd_weight")


class HeadDelta(torch.nn.Module):
    """Trainable additions to some heads' weight slices, on top of a frozen model.

    For each trained query head: ``q[layer]`` ([heads, d_model, d_head], added to ``W_Q``) and ``o[layer]``
    ([heads, d_head, d_model], added to ``W_O``); with ``kv_policy="group"`` also ``k[layer]`` and
    ``v[layer]`` ([kv heads, d_model, d_head], added to ``_W_K`` / ``_W_V``) for the heads' key/value groups.
    All start at zero, so the patched model starts as the student.
    """

    def __init__(self, model, heads: Sequence[Head], kv_policy: str = "group"):
        super().__init__()
        cfg = model.cfg
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.heads = tuple(sorted(set(heads)))
        self.index: dict[str, Tensor] = {}
        self.deltas = torch.nn.ParameterDict()
        for layer in sorted({h.layer for h in self.heads}):
            q_heads = [h.head for h in self.heads if h.layer == layer]
            attn = model.blocks[layer].attn
            self._add(f"blocks.{layer}.attn.W_Q", q_heads, attn.W_Q)
            self._add(f"blocks.{layer}.attn.W_O", q_heads, attn.W_O)
            if kv_policy == "group":
                groups = sorted({Head(layer, h).kv_head(cfg.n_heads, n_kv) for h in q_heads})
                gqa = cfg.n_key_value_heads is not None and cfg.n_key_value_heads != cfg.n_heads
                suffix = ("_W_K", "_W_V") if gqa else ("W_K", "W_V")
                for name in suffix:
                    self._add(f"blocks.{layer}.attn.{name}", groups, getattr(attn, name))

    def _add(self, name: str, rows: list[int], weight: Tensor) -> None:
        self.index[name] = torch.tensor(rows, dtype=torch.long)
        self.deltas[name.replace(".", "__")] = torch.nn.Parameter(
            torch.zeros(len(rows), *weight.shape[1:], dtype=torch.float32, device=weight.device)
        )

    def patched(self, model) -> dict[str, Tensor]:
        """Parameter name -> base + delta, for ``functional_call``; only the touched tensors."""
        params = dict(model.named_parameters())
        out = {}
        for name, rows in self.index.items():
            base = params[name]
            delta = self.deltas[name.replace(".", "__")]
            out[name] = base.index_add(0, rows.to(base.device), delta.to(base.dtype))
        return out

    @contextlib.contextmanager
    def merged(self, model) -> Iterator[None]:
        """Within the block, the model's own weights are base + delta (for evaluation with any code)."""
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

    def n_params(self) -> int:
        return sum(p.numel() for p in self.deltas.values())


def trainable_share(model, cfg: DistillConfig, heads: Sequence[Head]) -> dict:
    """Trained heads and parameters, and their shares of the model's heads and parameters."""
    n_total = sum(p.numel() for p in model.parameters())
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    if cfg.trainable == "all":
        n = sum(p.numel() for name, p in model.named_parameters() if not _zero_bias(name, p))
        return {"heads": n_heads, "head_share": 1.0, "params": n, "param_share": n / n_total}
    n = HeadDelta(model, heads, cfg.kv_policy).n_params()
    return {"heads": len(set(heads)), "head_share": len(set(heads)) / n_heads, "params": n,
            "param_share": n / n_total}


def _fingerprint(model) -> list[float]:
    """Two sums over all weights, in float64: equal for the same model, apart for almost any other."""
    with torch.no_grad():
        total = sum(p.double().sum() for p in model.parameters())
        squares = sum(p.double().square().sum() for p in model.parameters())
    return [round(float(total), 6), round(float(squares), 6)]


def _zero_bias(name: str, p: Tensor) -> bool:
    # TransformerLens gives Llama zero biases it does not have; they stay frozen and zero.
    return name.split(".")[-1].startswith(("b_", "_b_")) and not torch.any(p)


def _batches(data, batch_size: int, seed: int, pad: int, columns: Sequence[str]) -> Iterator[dict]:
    """Endless shuffled batches (a new order every epoch, from ``seed``); the last short batch is dropped."""
    rng = random.Random(seed)
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield next(evaluate.batches(data.select(order[start : start + batch_size]), batch_size, pad, columns))


def distill(
    student,
    teacher,
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
    """Distil ``teacher`` into ``student`` in place (module doc); resumes from ``run_dir``.

    Args:
        student: a HookedTransformer; its weights change (only the trained slices, unless trainable="all").
        teacher: a HookedTransformer on the same tokenizer; never changes.
        head_map: student -> teacher head pairs (``cdist.matching``); needed when ``cka_weight`` > 0, and its
            student heads are the trained heads unless ``heads`` is given.
        train_data: task items the loss is computed on (train split).
        eval_data: held-out items for the periodic accuracy.
        cfg: the run's settings.
        run_dir: checkpoints and metrics go here.
        heads: the student heads to train (default: the head map's student heads).
        evaluate_fn: optional ``f(student) -> dict`` of extra metrics at each evaluation (e.g. circuit accuracy).
        progress: tqdm bar.

    Returns:
        ``{"config", "trainable", "metrics": [...], "wall_time_s"}`` (also written to ``run_dir``).
    """
    run_dir = Path(run_dir)
    pairs = list(head_map.pairs) if head_map is not None else []
    if cfg.cka_weight and not pairs:
        raise ValueError("cka_weight > 0 needs a head map with pairs (cdist.matching); got none")
    train_heads = tuple(sorted(set(heads if heads is not None else (s for s, _ in pairs))))
    if cfg.trainable == "heads" and not train_heads:
        raise ValueError("trainable='heads' needs heads to train: pass a head map or heads=[...]")
    device = evaluate.device_of(student)
    on_gpu = device.type == "cuda"
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    delta = HeadDelta(student, train_heads, cfg.kv_policy) if cfg.trainable == "heads" else None
    if delta is not None:
        trained = list(delta.parameters())
    else:
        trained = [p for name, p in student.named_parameters() if not _zero_bias(name, p)]
        for p in trained:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, wall, metrics = 0, 0.0, []
    state_path = run_dir / "state.pt"
    # What else must match for a saved run to be this run: the models it started from and the heads.
    identity = {"student": _fingerprint(student), "teacher": _fingerprint(teacher),
                "heads": [str(h) for h in train_heads], "pairs": [[str(s), str(t)] for s, t in pairs]}
    if state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location=device)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{run_dir} holds a run with another config; use a new run_dir or the same config")
        if state.get("identity") != identity:
            raise ValueError(f"{run_dir} holds a run of another student, teacher or head set; use a new run_dir "
                             "(or delete that one)")
        (delta if delta is not None else student).load_state_dict(state["weights"])
        opt.load_state_dict(state["opt"])
        step, wall, metrics = state["step"], state["wall"], state["metrics"]
    s_heads = sorted({s for s, _ in pairs})
    t_heads = sorted({t for _, t in pairs})
    columns = () if cfg.cka_position == "pos_last" else (cfg.cka_position,)
    stream = _batches(train_data, cfg.batch_size, cfg.seed, evaluate.pad_id(student), columns)
    for _ in range(step):  # the data order continues where the run stopped
        next(stream)
    share = trainable_share(student, cfg, train_heads)

    def measure() -> dict:
        with delta.merged(student) if delta is not None else contextlib.nullcontext(), torch.no_grad():
            row = {"accuracy": evaluate.accuracy(student, eval_data)}
            if evaluate_fn is not None:
                row |= evaluate_fn(student)
        return row

    if not metrics:
        metrics.append({"step": 0, **measure()})
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="distill")
    t0 = time.time() - wall
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    while step < cfg.steps:
        batch = next(stream)
        ids, last = batch["input_ids"].to(device), batch["pos_last"].to(device)
        at = batch[cfg.cka_position]
        with torch.no_grad(), autocast:
            t_logits, t_z = head_z(teacher, ids, t_heads, at)
            t_logits = evaluate.logits_at(t_logits, last).float()
        params = delta.patched(student) if delta is not None else None
        with autocast:
            s_logits, s_z = head_z(student, ids, s_heads, at, params=params)
            s_logits = evaluate.logits_at(s_logits, last).float()
        ce = F.cross_entropy(s_logits, t_logits.argmax(-1))
        loss = cfg.ce_weight * ce
        cka_terms = [linear_cka(s_z[s], t_z[t], debiased=cfg.debiased_cka) for s, t in pairs]
        if cfg.cka_weight:
            loss = loss + cfg.cka_weight * sum(1 - c for c in cka_terms)
        temp = cfg.kd_temperature
        kd = F.kl_div(F.log_softmax(s_logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                      reduction="batchmean") * temp**2
        if cfg.kd_weight:
            loss = loss + cfg.kd_weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(ce=f"{ce.item():.3f}")
        if step % cfg.eval_every and step != cfg.steps:
            continue
        with torch.no_grad():
            debiased = [float(linear_cka(s_z[s], t_z[t], debiased=True)) for s, t in pairs] if len(ids) >= 4 else []
        metrics.append({
            "step": step, "loss": loss.item(), "ce": ce.item(), "kd": kd.item(),
            "cka_mean": sum(float(c.detach()) for c in cka_terms) / len(cka_terms) if cka_terms else None,
            "cka_debiased_mean": sum(debiased) / len(debiased) if debiased else None,
            **measure(),
        })
        weights = (delta if delta is not None else student).state_dict()
        atomic_torch_save({"config": asdict(cfg), "weights": weights, "opt": opt.state_dict(), "step": step,
                           "wall": time.time() - t0, "metrics": metrics, "identity": identity}, state_path)
    bar.close()
    if delta is not None:  # the student keeps what it learnt
        with torch.no_grad():
            for name, value in delta.patched(student).items():
                dict(student.named_parameters())[name].copy_(value)
    for p in student.parameters():
        p.requires_grad_(False)
    result = {"config": asdict(cfg), "trainable": share, "trained_heads": [str(h) for h in train_heads],
              "pairs": [[str(s), str(t)] for s, t in pairs], "metrics": metrics,
              "wall_time_s": round(time.time() - t0, 1)}
    atomic_write_json(result, run_dir / "metrics.json")
    table = io.StringIO()
    fields = sorted({k for row in metrics for k in row}, key=lambda k: (k != "step", k))
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(metrics)
    atomic_write_text(table.getvalue(), run_dir / "metrics.csv")
    return result
