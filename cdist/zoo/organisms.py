"""Train the model organisms: small Llama-3-shaped models that learn a cdist task from scratch.

No machine of this project can download Llama-3 weights, so the science runs on a zoo of small
models that mirror the paper's cast (SPEC section 3): a teacher that has learnt the task well and
smaller "warm" students with a nascent ability. This module is the training loop behind
``experiments/zoo.py``.

The organisms are trained as transformers ``LlamaForCausalLM`` (RMS norm, rotary, gated SiLU MLP,
grouped-query attention, tied embeddings as in Llama-3.2) and saved as ordinary Llama checkpoints,
so cdist loads them with the same ``cdist.models.load_llama`` that loads a real Llama-3.

Choices that are ours:
- Only answer tokens are supervised. Entity-tracking sequences may carry several queries about one
  context (``n_queries``); queries are drawn *with* replacement, because a permutation of all boxes
  teaches an elimination shortcut (the last answer is the one object not yet named). Evaluation
  always uses the single-query prompts of the task generator's test split.
- A curriculum on the number of boxes: training starts with ``curriculum_start`` boxes and adds one
  whenever held-out accuracy at the current number reaches ``curriculum_threshold``. Entity tracking
  from scratch otherwise sits at chance for thousands of steps (measured: SPEC/issue notes and the
  closing notes).
- ``warmup_templates`` mixes easier entity-tracking forms into half of each batch (``adjacent``: the
  object right before its label, the label as the query), which gives a lookup head a gradient
  before the longer form's offset heads exist. Theory of mind gets the same warm-up with two boxes,
  since its stories bind two containers to two states; without it both tasks sat at their trivial
  baseline for thousands of steps. ``warmup_whole_batches`` makes each batch all warm-up or all task
  instead (the mix under which the two-layer entity-tracking prototype left chance, where
  half-and-half batches sat at chance for 5,000 steps).
- A student is "warm" by early stopping: training ends as soon as held-out accuracy on the real task
  (all ``n_boxes`` boxes, whatever the curriculum's stage) enters ``stop_window`` and a second,
  larger held-out set (``confirm_items``, another seed) confirms it, so its ability is real but
  partial. Without the confirmation a 500-item evaluation stopped a theory-of-mind student on a
  noise spike (0.552 at step 10,875, where two 1,000-item sets then gave 0.488 and 0.529).
- Sparse circuits: ``head_sparsity`` weights ``HeadOutputPenalty`` (optionally ramped in over
  ``head_sparsity_ramp`` steps, sparing ``free_heads``). A student that is warm *and* sparse is made
  in two runs: a penalty-free one stopped early, then a *consolidation* that starts from it
  (``init_from``) and fits its answer distribution (``self_distill``, KL at the answer positions)
  under the penalty, so most heads fall silent while the behaviour, warmth included, stays
  (``cdist.zoo`` has the measured reasons).
- The training state is checkpointed atomically every evaluation, and a run resumes from it.

What differs between tasks is read from the task's registry record (``cdist.tasks.get_task``),
never from its name: ``organism_rows`` (multi-query entity-tracking rows or the generator's items),
``warmup_boxes`` and ``curriculum``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from cdist import evaluate, tasks
from cdist.checkpoints import atomic_torch_save
from cdist.errors import ConfigError, InputError
from cdist.types import Head

IGNORE = -100
# Held-out items that confirm an early stop; evaluation uses seed 12345, the zoo script 2024.
CONFIRM_SEED = 54321


@dataclass(frozen=True)
class OrganismConfig:
    """Shape, data and schedule of one zoo model; a bad value fails here, in one line naming it."""

    name: str
    task: str  # a registered task (cdist.tasks.get_task)
    template: str = "compact"
    n_boxes: int = 7
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 8
    n_kv_heads: int = 4
    d_mlp: int = 512
    max_positions: int = 512  # rotary positions the model is built for; prompts are far shorter
    rms_norm_eps: float = 1e-5  # Llama-3's
    steps: int = 20_000
    batch_size: int = 64
    n_queries: int = 1
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's; a shorter second-moment memory than 0.999
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    curriculum_start: int | None = 2  # entity tracking: boxes at the start; None = always n_boxes
    curriculum_threshold: float = 0.9
    # Entity tracking: the curriculum stops here (an easier task than n_boxes).
    train_boxes: int | None = None
    warmup_templates: tuple[str, ...] = ()
    # A coin flip makes each batch all warm-up or all task, not half and half.
    warmup_whole_batches: bool = False
    eval_every: int = 250
    eval_items: int = 500
    # Students stop once test accuracy lies inside stop_window, but not before step stop_after (let
    # the head-output penalty thin the heads out first), and only if accuracy on confirm_items other
    # held-out items lies inside it too.
    stop_window: tuple[float, float] | None = None
    stop_after: int = 0
    confirm_items: int = 1000
    head_sparsity: float = 0.0  # weight of the head-output penalty (HeadOutputPenalty); 0 = none
    # Each head's term is (mean output ratio) ** power; a power below 1 favours few heads.
    head_sparsity_power: float = 0.5
    head_sparsity_ramp: int = 0  # the penalty's weight grows linearly from 0 over this many steps
    free_heads: tuple[str, ...] = ()  # heads the penalty spares ("a1.h5"): where the task may live
    init_from: str | None = None  # start from this other organism's trained weights (its name)
    self_distill: bool = False  # with init_from: fit init's answer distribution, not the labels
    seed: int = 0
    task_kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> OrganismConfig:
        """The config a manifest stores (``asdict`` as JSON, so its tuples read back as lists)."""
        tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v
                      for k, v in config.items()})

    def __post_init__(self) -> None:
        task = tasks.get_task(self.task)  # UnknownTaskError lists the registered tasks
        where = f"organism {self.name!r}"
        if self.template not in task.templates:
            raise ConfigError(f"{where}: template {self.template!r} is not a template of "
                              f"{task.name}; choose from {sorted(task.templates)}")
        # The warm-up rows are entity-tracking contexts, whatever the task.
        unknown = sorted(set(self.warmup_templates) - set(tasks.ET_TEMPLATES))
        if unknown:
            raise ConfigError(f"{where}: warmup_templates {unknown} are not entity-tracking "
                              f"templates; choose from {sorted(tasks.ET_TEMPLATES)}")
        least = {"n_layers": 1, "d_model": 1, "n_heads": 1, "n_kv_heads": 1, "d_mlp": 1,
                 "batch_size": 1, "n_queries": 1, "warmup": 1, "eval_every": 1, "eval_items": 1,
                 "confirm_items": 1, "n_boxes": 2, "steps": 0, "stop_after": 0,
                 "head_sparsity_ramp": 0, "weight_decay": 0.0, "head_sparsity": 0.0,
                 "max_positions": 2}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{where}: {name}={getattr(self, name)}; it must be at least "
                                  f"{low}")
        for name in ("lr", "head_sparsity_power", "grad_clip", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}: {name}={getattr(self, name)}; it must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}: betas={self.betas}; give two numbers in [0, 1)")
        if self.n_heads % self.n_kv_heads or self.d_model % self.n_heads:
            raise ConfigError(f"{where}: n_heads={self.n_heads} must be a multiple of "
                              f"n_kv_heads={self.n_kv_heads}, and d_model={self.d_model} a "
                              "multiple of n_heads")
        for name in ("curriculum_start", "train_boxes"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= self.n_boxes:
                raise ConfigError(f"{where}: {name}={value}; use None or 2 to "
                                  f"n_boxes={self.n_boxes}")
        if not 0 <= self.curriculum_threshold <= 1:
            raise ConfigError(f"{where}: curriculum_threshold={self.curriculum_threshold} is not "
                              "in [0, 1]")
        window = self.stop_window
        if window is not None and (len(window) != 2 or not 0 <= window[0] <= window[1] <= 1):
            raise ConfigError(f"{where}: stop_window={window}; give (low, high) with "
                              "0 <= low <= high <= 1")
        for head in map(Head.parse, self.free_heads):  # a bad name raises ValueError
            if head.layer >= self.n_layers or head.head >= self.n_heads:
                raise ConfigError(f"{where}: free head {head} is outside the model "
                                  f"({self.n_layers} layers x {self.n_heads} heads)")
        if self.self_distill and self.init_from is None:
            raise ConfigError(f"{where}: self_distill fits the init_from model's outputs; set "
                              "init_from too")
        if not isinstance(self.task_kwargs, dict):
            raise ConfigError(f"{where}: task_kwargs must be a dict of generator arguments")


def new_organism(cfg: OrganismConfig, tokenizer) -> LlamaForCausalLM:
    """A randomly initialised Llama of the organism's shape (seeded by ``cfg.seed``), its vocabulary
    and special-token ids those of ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def _generate_kwargs(cfg: OrganismConfig, n_boxes: int | None = None) -> dict:
    """The generator's keyword arguments for the organism's items (``n_boxes``: other boxes)."""
    kwargs = {k: getattr(cfg, k) for k in tasks.get_task(cfg.task).organism_kwargs}
    if n_boxes and "n_boxes" in kwargs:
        kwargs["n_boxes"] = n_boxes
    return {"template": cfg.template, **kwargs, **cfg.task_kwargs}


def _entity_tracking_rows(cfg: OrganismConfig, n: int, n_boxes: int, rng: random.Random, tokenizer,
                          templates):
    objects_pool, labels_pool = tasks.entity_tracking_words()
    rows = []
    for i in range(n):
        template = templates[i % len(templates)]
        objects, labels = rng.sample(objects_pool, n_boxes), rng.sample(labels_pool, n_boxes)
        ids = tokenizer(tasks.render_context(objects, labels, template)).input_ids
        targets = [IGNORE] * len(ids)
        for _ in range(cfg.n_queries):
            q = rng.randrange(n_boxes)
            query = tokenizer(tasks.render_query(labels[q], template),
                              add_special_tokens=False).input_ids
            answer = tokenizer(f" {objects[q]} .", add_special_tokens=False).input_ids
            ids += query + answer
            targets += [IGNORE] * (len(query) - 1) + [answer[0]] + [IGNORE] * len(answer)
        rows.append((ids, targets))
    return rows


def _multi_query_rows(cfg: OrganismConfig, n: int, n_boxes: int, rng: random.Random, tokenizer):
    return _entity_tracking_rows(cfg, n, n_boxes, rng, tokenizer, [cfg.template])


def _item_rows(cfg: OrganismConfig, n: int, n_boxes: int, rng: random.Random, tokenizer):
    if not n:  # a warm-up-only batch (warmup_whole_batches): no items, and no draw from rng
        return []
    seed = rng.randrange(2**31)
    data = tasks.get_task(cfg.task).items(n, tokenizer=tokenizer, seed=seed, split="train",
                                          **_generate_kwargs(cfg, n_boxes))
    rows = []
    columns = data["input_ids"], data["answer_id"], data["pos_last"]
    for ids, answer, last in zip(*columns, strict=True):
        targets = [IGNORE] * len(ids)
        targets[last] = answer
        rows.append((list(ids), targets))
    return rows


# Task.organism_rows -> how a batch's task rows are made: (cfg, n, n_boxes, rng, tokenizer).
_ROWS = {"multi_query": _multi_query_rows, "items": _item_rows}


def training_batch(cfg: OrganismConfig, n_boxes: int, rng: random.Random, tokenizer):
    """One batch of (input ids, next-token targets), right-padded; targets are IGNORE except at
    answers."""
    n_aux = cfg.batch_size // 2 if cfg.warmup_templates else 0
    if cfg.warmup_templates and cfg.warmup_whole_batches:
        n_aux = cfg.batch_size if rng.random() < 0.5 else 0
    n_main = cfg.batch_size - n_aux
    task = tasks.get_task(cfg.task)
    rows = _ROWS[task.organism_rows](cfg, n_main, n_boxes, rng, tokenizer)
    if n_aux:
        aux_boxes = task.warmup_boxes or n_boxes
        rows += _entity_tracking_rows(cfg, n_aux, aux_boxes, rng, tokenizer, cfg.warmup_templates)
    ids = evaluate.pad_right([r[0] for r in rows], tokenizer.pad_token_id)
    targets = evaluate.pad_right([r[1] for r in rows], IGNORE)
    return ids, targets


def held_out(cfg: OrganismConfig, tokenizer, n: int, *, n_boxes: int | None = None,
             seed: int = 12345):
    """Fresh single-query test-split items of the organism's task (``n_boxes``: another box count,
    where the task has one)."""
    kwargs = _generate_kwargs(cfg, n_boxes)
    task = tasks.get_task(cfg.task)
    return task.items(n, tokenizer=tokenizer, seed=seed, split="test", **kwargs)


class HeadOutputPenalty:
    """A sparsity penalty on attention heads' outputs, so that a task is carried by few heads.

    Trained on one task alone, an organism spreads the answer over every head of a layer (each head
    a small vote), so no small circuit is faithful: keeping 6 of et-teacher's 16 heads gave 0.33
    accuracy against 0.99. Real models hold many tasks and a task's circuit is a few heads; this
    penalty makes the organisms alike. For each layer, head and token it takes the norm of the
    head's residual-stream output ``z_h @ W_O[h]`` divided by the norm of the residual stream
    entering the layer (so that shrinking the whole stream cannot lower it), averages over tokens,
    raises each head's average to ``power`` and sums over heads and layers. With ``power`` 1 this is
    a group lasso, which cannot tell one head writing the answer from four heads writing a quarter
    each (on et-teacher, 5 heads were still needed); with ``power`` 0.5 the sum is concave and
    favours few heads, as Voita et al. 2019's head gates do. Hooks on each decoder layer and its
    ``o_proj`` collect it during a training-mode forward pass; ``take()`` returns the sum and
    resets. The hooks are registered on construction and removed by ``remove()``, or on leaving a
    ``with`` block (``with HeadOutputPenalty(model) as penalty: ...``).
    """

    def __init__(self, model: LlamaForCausalLM, power: float = 0.5,
                 free_heads: tuple[str, ...] = ()):
        self.n_heads, self.power = model.config.num_attention_heads, power
        self.terms, self.resid = [], None
        n_layers = len(model.model.layers)
        # [layer, head]: 0 for the heads the penalty spares
        self.weight = torch.ones(n_layers, self.n_heads)
        for head in map(Head.parse, free_heads):
            if head.layer >= n_layers or head.head >= self.n_heads:
                raise InputError(f"free head {head} is outside the model ({n_layers} layers x "
                                 f"{self.n_heads} heads)")
            self.weight[head.layer, head.head] = 0.0
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_pre_hook(self._keep_resid, with_kwargs=True))
            o_proj = layer.self_attn.o_proj
            self.handles.append(o_proj.register_forward_pre_hook(self._penaliser(i)))

    def _keep_resid(self, module, args, kwargs):
        if not module.training:  # evaluation passes are not penalised
            return
        self.resid = (args[0] if args else kwargs["hidden_states"]).norm(dim=-1)  # [batch, pos]

    def _penaliser(self, layer: int):
        def penalise(o_proj, args):
            if not o_proj.training:
                return
            x = args[0]  # [batch, pos, n_heads * d_head]
            z = x.unflatten(-1, (self.n_heads, -1))
            w = o_proj.weight.unflatten(1, (self.n_heads, -1))  # [d_model, n_heads, d_head]
            out = torch.einsum("bphd,mhd->bphm", z, w).norm(dim=-1)  # [batch, pos, n_heads]
            ratio = (out / (self.resid[..., None] + 1e-6)).mean((0, 1))  # [n_heads]
            weight = self.weight[layer].to(ratio.device)
            self.terms.append((weight * (ratio + 1e-8).pow(self.power)).sum())

        return penalise

    def take(self) -> torch.Tensor:
        total, self.terms = torch.stack(self.terms).sum(), []
        return total

    def remove(self) -> None:
        """Remove the hooks (the model stops collecting terms)."""
        for h in self.handles:
            h.remove()
        self.handles, self.terms = [], []

    def __enter__(self) -> HeadOutputPenalty:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class LogitsOf(torch.nn.Module):
    """``model(input_ids) -> logits``, the calling convention of ``cdist.evaluate``."""

    def __init__(self, model: LlamaForCausalLM, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def train_organism(cfg: OrganismConfig, tokenizer, run_dir, *, init: dict | None = None,
                   progress: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """Train one organism from scratch (or from ``init``), or resume it from ``run_dir``.

    Args:
        cfg: the organism's shape, data and schedule.
        tokenizer: the word-level organism tokenizer (``cdist.zoo.organism_tokenizer()``).
        run_dir: where the training state is checkpointed; an existing ``train_state.pt`` there is
            resumed.
        init: the state dict of the organism named by ``cfg.init_from``, trained already; required
            when that is set, and only read when the run starts (a fresh optimizer, step 0).
        progress: show a tqdm bar.

    Returns:
        The trained ``LlamaForCausalLM`` (eval mode) and a manifest (config, steps, wall time,
        history).
    """
    if (init is None) != (cfg.init_from is None):
        raise InputError(f"{cfg.name}: pass init= exactly when the config has init_from "
                         f"(it is {cfg.init_from!r})")
    model = new_organism(cfg, tokenizer)
    if init is not None:
        model.load_state_dict(init)
    reference = None
    if cfg.self_distill:
        reference = new_organism(cfg, tokenizer).eval().requires_grad_(False)
        reference.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=cfg.betas)
    rng = random.Random(cfg.seed)
    state_path = Path(run_dir) / "train_state.pt"
    run = _Progress.resume(cfg, state_path, model, opt, rng)
    logits_of = LogitsOf(model, tokenizer)
    tests = {k: held_out(cfg, tokenizer, cfg.eval_items, n_boxes=k)
             for k in {run.n_boxes, cfg.n_boxes}}
    done = bool(run.history) and run.history[-1].get("stop", False)
    t0 = time.time() - run.wall
    # The penalty's hooks live only while training runs: none are left after it, error or not.
    # disable=None: quiet when stderr is not a terminal (logs, CI)
    bar = tqdm(total=cfg.steps, initial=run.step, disable=None if progress else True,
               desc=cfg.name)
    penalty = None
    if cfg.head_sparsity:
        penalty = HeadOutputPenalty(model, cfg.head_sparsity_power, cfg.free_heads)
    with penalty or contextlib.nullcontext(), bar:
        model.train()
        while run.step < cfg.steps and not done:
            losses = _train_step(cfg, run, logits_of, reference, penalty, opt, rng)
            run.step += 1
            bar.update(1)
            if run.step % cfg.eval_every and run.step != cfg.steps:
                continue
            done = _evaluate(cfg, run, logits_of, tests, losses)
            bar.set_postfix(boxes=run.history[-1]["n_boxes"], loss=f"{losses[0].item():.3f}",
                            acc=f"{run.history[-1]['test_accuracy']:.3f}")
            run.wall = time.time() - t0
            run.save(state_path, model, opt, rng)
    manifest = {"config": asdict(cfg), "steps": run.step, "wall_time_s": round(time.time() - t0, 1),
                "stopped_early": done and run.step < cfg.steps, "history": run.history}
    return model.eval(), manifest


@dataclass
class _Progress:
    """Where a training run stands; checkpointed with the model, optimizer and data rng."""

    step: int
    wall: float
    history: list[dict]
    n_boxes: int  # the curriculum's current number of boxes

    @classmethod
    def resume(cls, cfg: OrganismConfig, path: Path, model: LlamaForCausalLM, opt,
               rng) -> _Progress:
        """A fresh run's start, or the state saved at ``path`` loaded into the model, optimizer
        and rng."""
        grows = tasks.get_task(cfg.task).curriculum and cfg.curriculum_start
        run = cls(0, 0.0, [], cfg.curriculum_start if grows else cfg.n_boxes)
        if path.exists():
            state = torch.load(path, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            rng.setstate(state["rng"])
            run = cls(state["step"], state["wall"], state["history"], state["n_boxes"])
        return run

    def save(self, path: Path, model: LlamaForCausalLM, opt, rng) -> None:
        atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(),
                           "rng": rng.getstate(), "step": self.step, "wall": self.wall,
                           "history": self.history, "n_boxes": self.n_boxes}, path)


def _train_step(cfg: OrganismConfig, run: _Progress, logits_of: LogitsOf,
                reference: LlamaForCausalLM | None, penalty: HeadOutputPenalty | None, opt,
                rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step; returns the task loss, the head penalty and the penalty's weight."""
    for g in opt.param_groups:
        g["lr"] = cfg.lr * min(1.0, (run.step + 1) / cfg.warmup)
    ids, targets = training_batch(cfg, run.n_boxes, rng, logits_of.tokenizer)
    logits = logits_of(ids)
    if reference is None:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    else:
        loss = _answer_kl(logits, reference(input_ids=ids).logits, targets != IGNORE)
    head_penalty = penalty.take() if penalty else torch.zeros(())
    ramp = (run.step + 1) / cfg.head_sparsity_ramp if cfg.head_sparsity_ramp else 1.0
    weight = cfg.head_sparsity * min(1.0, ramp)
    opt.zero_grad(set_to_none=True)
    (loss + weight * head_penalty).backward()
    torch.nn.utils.clip_grad_norm_(logits_of.model.parameters(), cfg.grad_clip)
    opt.step()
    return loss, head_penalty, weight


def _evaluate(cfg: OrganismConfig, run: _Progress, logits_of: LogitsOf, tests: dict,
              losses: tuple[torch.Tensor, torch.Tensor, float]) -> bool:
    """Record held-out accuracy in ``run.history``, grow the curriculum, and say whether the run
    stops early (accuracy inside ``stop_window``, confirmed on other items)."""
    model, tokenizer = logits_of.model, logits_of.tokenizer
    loss, head_penalty, weight = losses
    model.eval()
    acc_now = evaluate.accuracy(logits_of, tests[run.n_boxes])
    acc = acc_now
    if run.n_boxes != cfg.n_boxes:
        acc = evaluate.accuracy(logits_of, tests[cfg.n_boxes])
    model.train()
    run.history.append({"step": run.step, "n_boxes": run.n_boxes, "loss": round(loss.item(), 4),
                        "head_penalty": round(head_penalty.item(), 4),
                        "head_penalty_weight": round(weight, 6),
                        "train_boxes_accuracy": acc_now, "test_accuracy": acc})
    done = False
    if run.step >= cfg.stop_after and _in_window(acc, cfg):
        if "confirm" not in tests:
            tests["confirm"] = held_out(cfg, tokenizer, cfg.confirm_items, seed=CONFIRM_SEED)
        model.eval()
        run.history[-1]["confirm_accuracy"] = evaluate.accuracy(logits_of, tests["confirm"])
        model.train()
        done = run.history[-1]["stop"] = _in_window(run.history[-1]["confirm_accuracy"], cfg)
    if run.n_boxes < (cfg.train_boxes or cfg.n_boxes) and acc_now >= cfg.curriculum_threshold:
        run.n_boxes += 1
        tests.setdefault(run.n_boxes, held_out(cfg, tokenizer, cfg.eval_items, n_boxes=run.n_boxes))
    return done


def _answer_kl(logits: torch.Tensor, ref_logits: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) of the next-token distributions at the answer positions ``at``,
    averaged."""
    ref = F.log_softmax(ref_logits[at], dim=-1)
    return F.kl_div(F.log_softmax(logits[at], dim=-1), ref, log_target=True, reduction="batchmean")


def _in_window(acc: float, cfg: OrganismConfig) -> bool:
    return cfg.stop_window is not None and cfg.stop_window[0] <= acc <= cfg.stop_window[1]
