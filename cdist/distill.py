"""Circuit distillation: train only the matched student heads, on the task loss plus CKA alignment.

The loss (SPEC section 1.4), per batch of m prompts:

    L = ce_weight * CE(student logits at pos_last, teacher's predicted answer)
        + cka_weight * sum over matched pairs (s, t) of (1 - CKA(z_s, z_t))
        + kd_weight * T^2 * KL(teacher || student at temperature T)

where z_s and z_t are the heads' outputs at the pair's own positions (``HeadPair.student_position``
and ``teacher_position``: where the teacher head does its work), one row per prompt, never a padding
position; ``cka_position`` puts every pair at one column instead. CE only, Align CKA only,
CE + Align CKA, CE + Rand CKA (a ``matching.random_control`` map), CE + Shuffled CKA
(``shuffle_teacher``: the aligned pairs, the teacher's rows permuted within each batch, so the
gradient has the same scale but no item correspondence) and logit KD are all settings of one
``DistillConfig``.

Only the chosen student heads change (``trainable="heads"``). They are trained as a frozen base plus
a trainable delta: for each head its ``W_Q`` and ``W_O`` slices (``kv_policy="qo"``, the default, so
only the trained heads change function), or also the ``W_K`` / ``W_V`` slices of its key/value group
(``kv_policy="group"``), which under grouped-query attention the group's other query heads share: on
et-student that changes 24 of its 32 heads' keys and values. The deltas are the only parameters the
optimizer sees, so AdamW's moments are as small as what is trained and weight decay cannot move a
frozen weight; the forward pass uses ``torch.func.functional_call`` with base + delta, so every
TransformerLens hook still fires. ``trainable="all"`` trains every weight (the "fully distilled"
rows; a bfloat16 student trains in float32 then, and is cast back); TransformerLens's zero biases,
which Llama does not have, stay frozen either way.

Every ``eval_every`` steps (and at step 0) the run logs, on the held-out ``eval_data``: accuracy,
the CE on the teacher's labels (``val_ce``, the paper's Fig. 5 on fixed items) and each pair's
debiased CKA (``cka_val``); and on a fixed probe batch of training items, the gradient norms of the
CE term and of the CKA term on the trained parameters (``grad_ce``, ``grad_cka``) and their weighted
ratio ``grad_ratio = cka_weight * grad_cka / grad_ce``: how hard the alignment pulls against the
task. A head map passed with ``cka_weight=0`` is monitored the same way without entering the loss.

The teacher may be a ``cdist.teacher_cache.TeacherCache`` instead of a model: its stored labels,
logits and head ``z`` replace the teacher's forward passes, so the teacher need not be in memory
(the same run, to float rounding: the test holds it to that).

Under ``torchrun`` (``cdist.distributed``) the run is data-parallel: every rank draws the same
global batch and takes its equal share of the rows, the trained weights are wrapped in
``DistributedDataParallel`` (which averages their gradients), and each CKA term is computed on the
global batch, its rows gathered from every rank with their gradients, so the loss and the gradients
are those of one process on the global batch (the test holds them to 1e-5). Rank 0 evaluates,
logs and checkpoints; the diagnostics are computed on it alone.

Runs are resumable: the deltas (or the whole state), optimizer, data order and metrics are
checkpointed atomically every evaluation; a finished run's checkpoint keeps the trained weights
without the optimizer's state. Metrics go to ``metrics.json`` and ``metrics.csv``. With
``labels="answers"`` and no teacher the same loop is plain task fine-tuning (how the real-LM
teacher and student are made, ``experiments/smollm2_models.py``).
bfloat16 autocast on a GPU, float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from cdist import distributed, evaluate, models, run_folder
from cdist.activations import Site, head_z, head_z_dataset
from cdist.checkpoints import atomic_torch_save, atomic_write_json, atomic_write_text
from cdist.cka import linear_cka
from cdist.errors import ConfigError, InputError, MismatchError, NumericsError, RunFolderError
from cdist.matching import HeadMap
from cdist.models import HookedTransformer
from cdist.store import items_fingerprint, model_fingerprint
from cdist.teacher_cache import TeacherCache, teacher_outputs, tokenizer_fingerprint
from cdist.types import Head, HeadPair

__all__ = ["DistillConfig", "HeadDelta", "distill", "trainable_share"]


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run.

    Attributes:
        steps: optimizer steps.
        lr: AdamW learning rate. The paper uses 2e-5 for Llama; the zoo's students need about 1e-3
            for CE to move in a few hundred steps, and at that rate Adam also follows a CKA target
            with no task signal (Align CKA only fell to 0.02 at 1e-3 with a flat target): pick lr
            and ``cka_weight`` on validation items and read ``grad_ratio``.
        batch_size: prompts per step (also the m of CKA).
        ce_weight: weight of CE on the teacher's labels (0 for "Align CKA only").
        cka_weight: lambda, the weight of sum (1 - CKA) over the head map's pairs (0 for "CE only").
        kd_weight: weight of logit KD (the standard-distillation baseline); temperature
            ``kd_temperature``.
        trainable: "heads" (the head map's student heads) or "all" (full-parameter training).
        kv_policy: "qo" (only the heads' W_Q and W_O) or "group" (their key/value groups train too).
        cka_position: None (each pair at its own positions) or one position column for every pair.
        shuffle_teacher: permute the teacher's rows within each batch before CKA (the Shuffled CKA
            control).
        debiased_cka: train on the debiased estimator instead of the plain one (the plain one is
            logged too).
        weight_decay: AdamW weight decay on the trained parameters (deltas decay towards the base
            weights).
        eval_every: steps between evaluations (and checkpoints).
        seed: data order and the shuffled control's permutations.
        labels: what CE is taken against: "teacher" (the teacher's predicted answer, distillation)
            or "answers" (the items' own answers: plain task fine-tuning, which needs no teacher
            unless a CKA or KD term or a head map does).
    """

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    ce_weight: float = 1.0
    cka_weight: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    trainable: str = "heads"
    kv_policy: str = "qo"
    cka_position: str | None = None
    shuffle_teacher: bool = False
    debiased_cka: bool = False
    weight_decay: float = 0.0
    eval_every: int = 50
    seed: int = 0
    labels: str = "teacher"

    def __post_init__(self) -> None:
        for name, choices in (("labels", ("teacher", "answers")), ("trainable", ("heads", "all")),
                              ("kv_policy", ("qo", "group"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {choices}")
        for name in ("steps", "batch_size", "eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r}; give a whole number")
        for name in ("shuffle_teacher", "debiased_cka"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}; give True or False")
        for name in ("lr", "ce_weight", "cka_weight", "kd_weight", "kd_temperature",
                     "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r}; give a finite number")
        if min(self.ce_weight, self.cka_weight, self.kd_weight, self.weight_decay) < 0:
            raise ConfigError("loss weights and weight_decay must be >= 0; got ce_weight="
                              f"{self.ce_weight}, cka_weight={self.cka_weight}, kd_weight="
                              f"{self.kd_weight}, weight_decay={self.weight_decay}")
        if self.ce_weight == self.cka_weight == self.kd_weight == 0:
            raise ConfigError("every loss weight is 0; set ce_weight, cka_weight or kd_weight")
        if self.steps < 1 or self.batch_size < 2 or self.eval_every < 1 or not self.lr > 0:
            raise ConfigError("steps, eval_every >= 1, batch_size >= 2 and lr > 0 are needed; "
                              f"got steps={self.steps}, batch_size={self.batch_size}, "
                              f"eval_every={self.eval_every}, lr={self.lr}")
        if self.lr > 1:  # AdamW moves each weight by about lr a step: past 1, it wipes them
            raise ConfigError(f"lr={self.lr} is above 1, which overwrites the weights within a "
                              "step; fine-tuning rates are about 1e-5 to 1e-2")
        if not self.kd_temperature > 0:
            raise ConfigError(f"kd_temperature={self.kd_temperature}; it divides the logits, so "
                              "give a number > 0 (2.0 is usual)")
        if self.cka_position is not None and not str(self.cka_position).startswith("pos_"):
            raise ConfigError(f"cka_position={self.cka_position!r}; name a position column, "
                              "e.g. 'pos_last', or None")


class HeadDelta(torch.nn.Module):
    """Trainable additions to some heads' weight slices, on top of a frozen model.

    For each trained query head: ``q[layer]`` ([heads, d_model, d_head], added to ``W_Q``) and
    ``o[layer]`` ([heads, d_head, d_model], added to ``W_O``); with ``kv_policy="group"`` also
    ``k[layer]`` and ``v[layer]`` ([kv heads, d_model, d_head], added to ``_W_K`` / ``_W_V``) for
    the heads' key/value groups. All start at zero, so the patched model starts as the student.
    """

    def __init__(self, model: HookedTransformer, heads: Sequence[Head], kv_policy: str = "group"):
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

    def n_params(self) -> int:
        return sum(p.numel() for p in self.deltas.values())


def trainable_share(model: HookedTransformer, cfg: DistillConfig, heads: Sequence[Head]) -> dict:
    """Trained heads and parameters, and their shares of the model's heads and parameters."""
    n_total = sum(p.numel() for p in model.parameters())
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    if cfg.trainable == "all":
        n = sum(p.numel() for name, p in model.named_parameters() if not _zero_bias(name, p))
        return {"heads": n_heads, "head_share": 1.0, "params": n, "param_share": n / n_total}
    n = HeadDelta(model, heads, cfg.kv_policy).n_params()
    return {"heads": len(set(heads)), "head_share": len(set(heads)) / n_heads, "params": n,
            "param_share": n / n_total}


def _zero_bias(name: str, p: Tensor) -> bool:
    # TransformerLens gives Llama zero biases it does not have; they stay frozen and zero.
    return name.split(".")[-1].startswith(("b_", "_b_")) and not torch.any(p)


def _reads_teacher(cfg: DistillConfig, plan: _Plan) -> bool:
    """Whether a run needs the teacher at all (plain fine-tuning on the answers does not)."""
    return cfg.labels == "teacher" or bool(cfg.kd_weight) or bool(plan.pairs)


def _batches(data, batch_size: int, seed: int, pad: int, columns: Sequence[str]) -> Iterator[dict]:
    """Endless shuffled batches (a new order every epoch, from ``seed``), each with its items'
    ``index`` in ``data`` (a teacher cache's rows); the last short batch is dropped."""
    rng = random.Random(seed)
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield _batch(data, order[start : start + batch_size], pad, columns)


def _batch(data, index: list[int], pad: int, columns: Sequence[str]) -> dict:
    batch = next(evaluate.batches(data.select(index), len(index), pad, columns))
    return batch | {"index": torch.tensor(index)}


def _permutation(m: int, seed: int, step: int) -> Tensor:
    """The shuffled control's permutation of a batch's teacher rows at ``step`` (the same after a
    resume)."""
    return torch.randperm(m, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


@dataclass(frozen=True)
class _Plan:
    """What a run reads and trains, checked against its inputs before any model is touched."""

    pairs: list[HeadPair]
    heads: tuple[Head, ...]  # the student heads trained when trainable="heads"
    student_sites: list[Site]
    teacher_sites: list[Site]
    columns: list[str]  # position columns the batches must carry


def _plan(head_map: HeadMap | None, heads, train_data, eval_data, cfg: DistillConfig) -> _Plan:
    if len(train_data) < cfg.batch_size:
        raise InputError(f"{len(train_data)} training items cannot fill one batch of "
                         f"{cfg.batch_size}; lower batch_size or give more items")
    if len(eval_data) < 4:
        raise InputError(f"eval_data has {len(eval_data)} items; the debiased CKA and accuracy "
                         "need at least 4")
    if head_map is not None and cfg.cka_position is not None:
        head_map = head_map.at(cfg.cka_position)
    pairs = list(head_map.pairs) if head_map is not None else []
    if cfg.cka_weight and not pairs:
        raise InputError("cka_weight > 0 needs a head map with pairs (cdist.matching); got none")
    train_heads = tuple(sorted(set(heads if heads is not None else (p.student for p in pairs))))
    if cfg.trainable == "heads" and not train_heads:
        raise InputError("trainable='heads' needs heads to train: pass a head map or heads=[...]")
    s_sites, t_sites = head_map.sites() if head_map is not None else ([], [])
    columns = sorted({col for _, col in s_sites + t_sites} - {"pos_last"})
    needed = {"input_ids", "answer_id", "pos_last"}  # what every batch and evaluation reads
    for name, items in (("train_data", train_data), ("eval_data", eval_data)):
        if not needed <= set(items.column_names):
            raise InputError(f"{name} lacks the columns {sorted(needed - set(items.column_names))}"
                             "; make the items with a task generator (cdist.tasks)")
    missing = sorted(set(columns) - set(train_data.column_names)
                     | set(columns) - set(eval_data.column_names))
    if missing:
        raise InputError(f"the head map reads position columns {missing} that the items lack; "
                         "build the items with the task generator or place the pairs at existing "
                         "columns (HeadMap.placed / at)")
    return _Plan(pairs, train_heads, s_sites, t_sites, columns)


class _LiveTeacher:
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


class _CachedTeacher:
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


class _StudentForward(torch.nn.Module):
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


class _Run:
    """One distillation run's state and steps: the losses, the logged diagnostics, checkpoints,
    results.

    The student's weights change only through ``trained`` (``HeadDelta``'s slices, or every
    parameter that is not a zero bias); the teacher is only ever read under ``torch.no_grad``.
    """

    def __init__(self, student: HookedTransformer, teacher: HookedTransformer | TeacherCache | None,
                 plan: _Plan, cfg: DistillConfig, train_data, eval_data, evaluate_fn):
        self.student, self.plan, self.cfg = student, plan, cfg
        self.eval_data, self.evaluate_fn = eval_data, evaluate_fn
        self.device = evaluate.device_of(student)
        self.pad = evaluate.pad_id(student)
        heads_only = cfg.trainable == "heads"
        self.delta = HeadDelta(student, plan.heads, cfg.kv_policy) if heads_only else None
        if self.delta is not None:
            self.trained = list(self.delta.parameters())
        else:
            self.trained = [p for name, p in student.named_parameters() if not _zero_bias(name, p)]
            for p in self.trained:
                p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        on_gpu = self.device.type == "cuda"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu
                         else contextlib.nullcontext())
        self.forward = _StudentForward(student, self.delta, plan.student_sites)
        self.ddp = None
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            # with no CE or KD term a head's W_O slice may reach no CKA term
            self.ddp = DistributedDataParallel(
                self.forward, device_ids=[self.device] if on_gpu else None,
                find_unused_parameters=not (cfg.ce_weight or cfg.kd_weight))
        if isinstance(teacher, TeacherCache):
            self.teacher = _CachedTeacher(teacher, train_data, self.device)
        else:
            self.teacher = _LiveTeacher(teacher) if teacher is not None else None
        # What else must match for a saved run to be this run: the models it started from, the
        # heads and the training items (a finished run resumed on other items would be relabelled
        # as trained on them).
        self.identity = {"student": model_fingerprint(student),
                         "teacher": self.teacher.fingerprint if teacher is not None else None,
                         "heads": [str(h) for h in plan.heads],
                         "pairs": [str(p) for p in plan.pairs],
                         "train": items_fingerprint(train_data)}
        # Fixed items for the logged diagnostics: a probe batch of training items, the teacher's
        # view of eval_data.
        self.probe = _batch(train_data, list(range(cfg.batch_size)), self.pad, plan.columns)
        self.probe_perm = (_permutation(cfg.batch_size, cfg.seed, -1) if cfg.shuffle_teacher
                           else None)
        self.reads_teacher = _reads_teacher(cfg, plan)
        if distributed.is_main():  # the diagnostics are rank 0's (module doc)
            # what CE is measured against on eval_data: the teacher's answers, or the items' own
            self.t_labels = (self.teacher.labels(eval_data) if cfg.labels == "teacher"
                             else torch.tensor(eval_data["answer_id"]))
            self.t_val = self.teacher.z(eval_data, plan.teacher_sites) if plan.pairs else {}

    @property
    def weights(self) -> torch.nn.Module:
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
        if state.get("identity") != self.identity:
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
        moments are twice the trained weights: 1.9 GB for a fully trained 135M model)."""
        state = {"config": asdict(self.cfg), "weights": self.weights.state_dict(), "step": step,
                 "wall": wall, "metrics": metrics, "identity": self.identity}
        if step < self.cfg.steps:
            state["opt"] = self.opt.state_dict()
        atomic_torch_save(state, state_path)

    def losses(self, batch: dict, perm: Tensor | None, *, split: bool = True) -> dict[str, Tensor]:
        """CE, KD and each pair's CKA on one batch, differentiable in the trained parameters.

        With ``split`` (training) and several ranks, this rank's share of the batch's rows goes
        through DDP and each CKA term is taken over the rows gathered from every rank; CE and KD
        are this rank's means, which DDP's gradient average makes the global ones. Without it
        (the diagnostics) the whole batch runs here, as in one process.
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

    def step(self, batch: dict, perm: Tensor | None, step: int) -> tuple[dict[str, Tensor], Tensor]:
        """One optimizer step; returns the terms and loss, averaged over the ranks (the
        single-process values on the global batch)."""
        out = self.losses(batch, perm)
        loss = self.total(out)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        _check_finite(step, loss, out, self.trained)
        self.opt.step()
        world = distributed.world_size()
        for name in ("ce", "kd"):
            if name in out:
                out[name] = distributed.sum_across(out[name].detach()) / world
        return out, self.total(out).detach()

    def measure(self) -> dict:
        """The logged diagnostics: gradient norms on the probe batch, then accuracy, validation CE
        and each pair's debiased CKA on ``eval_data``; computed on rank 0 and given to every
        rank."""
        row = self._measure() if distributed.is_main() else None
        return distributed.broadcast(row)

    def _measure(self) -> dict:
        pairs = self.plan.pairs
        out = self.losses(self.probe, self.probe_perm, split=False)
        row = {"grad_ce": _grad_norm(out["ce"], self.trained)}
        if pairs:
            grad_cka = _grad_norm((1 - out["cka"]).sum(), self.trained)
            ratio = self.cfg.cka_weight * grad_cka / row["grad_ce"] if row["grad_ce"] else None
            row |= {"grad_cka": grad_cka, "grad_ratio": ratio}
        merged = (self.delta.merged(self.student) if self.delta is not None
                  else contextlib.nullcontext())
        with merged, torch.no_grad():
            correct, ce, s_val = _evaluation_pass(self.student, self.eval_data, self.t_labels,
                                                  self.plan.student_sites, self.pad)
            row |= {"accuracy": correct.float().mean().item(), "val_ce": ce}
            if pairs:
                cka_val = [float(linear_cka(s_val[(p.student, p.student_position)],
                                            self.t_val[(p.teacher, p.teacher_position)],
                                            debiased=True))
                           for p in pairs]
                row |= {"cka_val": cka_val, "cka_val_mean": sum(cka_val) / len(cka_val)}
            if self.evaluate_fn is not None:
                row |= self.evaluate_fn(self.student)
        return row

    def keep(self) -> None:
        """Write the trained slices into the student's own weights, so that it keeps what it
        learnt."""
        if self.delta is not None:
            params = dict(self.student.named_parameters())
            with torch.no_grad():
                for name, value in self.delta.patched(self.student).items():
                    params[name].copy_(value)


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
    """Distil ``teacher`` into ``student`` in place (module doc); resumes from ``run_dir``.

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
    run_dir, state_path = Path(run_dir), Path(run_dir) / "state.pt"
    if teacher is not None:
        check_pair(teacher, student)
    plan = _plan(head_map, heads, train_data, eval_data, cfg)
    models.check_heads(student, [*plan.heads, *(p.student for p in plan.pairs)],
                       "the student's heads")
    if isinstance(teacher, TeacherCache):
        teacher.check_sites(plan.teacher_sites)
        if cfg.kd_weight and not teacher.has_logits:
            raise InputError("kd_weight > 0 needs the teacher's logits; build the teacher cache "
                             "with logits=True")
    elif teacher is not None:
        models.check_heads(teacher, [p.teacher for p in plan.pairs], "the teacher's heads")
    if teacher is None and _reads_teacher(cfg, plan):
        raise InputError("teacher=None only fine-tunes: it needs labels='answers', kd_weight=0 and "
                         "no head map")
    flags = [p.requires_grad for p in student.parameters()]
    # one process per run folder, and an unwritable one refused before any step is taken
    held = run_folder.claim(run_dir)
    dtype = next(student.parameters()).dtype
    # AdamW on bfloat16 weights drops every update below their precision (an lr of 2e-5 on a weight
    # of 0.02 is under half its spacing), so a fully trained student trains in float32 (under
    # autocast on a GPU) and is cast back after; the heads' deltas are float32 anyway.
    upcast = cfg.trainable == "all" and dtype != torch.float32
    try:
        if upcast:
            models.cast(student, torch.float32)
        # Frozen, so that gradients reach only the trained slices (HeadDelta) or the parameters set
        # below.
        student.requires_grad_(False)
        run = _Run(student, teacher, plan, cfg, train_data, eval_data, evaluate_fn)
        step, wall, metrics = run.resume(state_path)
        stream = _batches(train_data, cfg.batch_size, cfg.seed, run.pad, plan.columns)
        for _ in range(step):  # the data order continues where the run stopped
            next(stream)
        if not metrics:
            metrics.append({"step": 0, **run.measure()})
        # disable=None: tqdm stays quiet when stderr is not a terminal (logs, CI)
        bar = tqdm(total=cfg.steps, initial=step, desc="distill",
                   disable=None if progress and distributed.is_main() else True)
        t0 = time.time() - wall
        while step < cfg.steps:
            perm = _permutation(cfg.batch_size, cfg.seed, step) if cfg.shuffle_teacher else None
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
        bar.close()
        run.keep()
        result = {"config": asdict(cfg), "trainable": trainable_share(student, cfg, plan.heads),
                  "trained_heads": [str(h) for h in plan.heads],
                  "pairs": [p.to_dict() for p in plan.pairs],
                  "metrics": metrics, "wall_time_s": round(time.time() - t0, 1)}
        _write_results(result, run_dir)
    finally:
        held.release()
        if upcast:
            models.cast(student, dtype)
        for p, flag in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return result


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


def check_pair(teacher: HookedTransformer | TeacherCache, student: HookedTransformer) -> None:
    """Refuse a teacher (or a teacher cache) and a student that do not share a vocabulary and
    tokenizer: the teacher's labels are token ids of the student's output, and KD compares the two
    logit vectors entry by entry."""
    from cdist.tokenizers import tokenizer_difference

    d_vocab = teacher.d_vocab if isinstance(teacher, TeacherCache) else teacher.cfg.d_vocab
    if d_vocab != student.cfg.d_vocab:
        raise MismatchError(f"the teacher has {d_vocab} output tokens and the student "
                            f"{student.cfg.d_vocab}; distil between models of one tokenizer")
    if isinstance(teacher, TeacherCache):
        if teacher.tokenizer != tokenizer_fingerprint(student.tokenizer):
            raise MismatchError("the teacher cache was built with another tokenizer than the "
                                "student's; distil between models of one tokenizer")
        return
    if teacher.tokenizer is not None and student.tokenizer is not None:
        difference = tokenizer_difference(teacher.tokenizer, student.tokenizer)
        if difference:
            raise MismatchError(f"the teacher's and the student's tokenizers differ: {difference}; "
                                "distil between models of one tokenizer")


def _check_finite(step: int, loss: Tensor, out: dict[str, Tensor], params: list[Tensor]) -> None:
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


def _grad_norm(loss: Tensor, params: list[Tensor]) -> float:
    """The norm of ``loss``'s gradient over ``params`` (0 where it does not reach them)."""
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return float(torch.sqrt(sum((g.float().square().sum() for g in grads if g is not None),
                                torch.zeros((), device=params[0].device))))


@torch.no_grad()
def _evaluation_pass(model: HookedTransformer, data, labels: Tensor, sites, pad: int,
                     batch_size: int = 64) -> tuple[Tensor, float, dict]:
    """Per-item top-1 correctness, the mean CE on ``labels`` and each site's z over ``data``, in one
    pass."""
    columns = sorted({col for _, col in sites} - {"pos_last"})
    correct, ce_sum, z = [], 0.0, {site: [] for site in sites}
    starts = range(0, len(data), batch_size)
    for start, batch in zip(starts, evaluate.batches(data, batch_size, pad, columns), strict=True):
        last, z_batch = head_z(model, batch["input_ids"], sites, batch)
        last = last.float()
        correct.append(last.argmax(-1).cpu() == batch["answer_id"])
        batch_labels = labels[start : start + len(last)].to(last.device)
        ce_sum += float(F.cross_entropy(last, batch_labels, reduction="sum"))
        for site in sites:
            z[site].append(z_batch[site].float().cpu())
    z_all = {site: torch.cat(rows) for site, rows in z.items()}
    return torch.cat(correct), ce_sum / len(data), z_all
