"""Train the model organisms: small Llama-3-shaped models that learn a cdist task from scratch.

Circuit distillation (Wadhwa, Amir & Wallace 2025, arXiv 2509.25002) distils a large teacher that
has learnt a task into a smaller student with a nascent ability. Llama-3 weights are large and
gated, so the method is also studied on a zoo of small models that mirror that cast: a teacher that
has learnt the task well and smaller "warm" students. This module is the training loop behind
``cdist zoo train`` and ``experiments/zoo.py``; the config is ``cdist.zoo.organism_config`` and the
data ``cdist.zoo.organism_data``.

The organisms are trained as transformers ``LlamaForCausalLM`` (RMS norm, rotary, gated SiLU MLP,
grouped-query attention, tied embeddings as in Llama-3.2) and saved as ordinary Llama checkpoints,
so cdist loads them with the same ``cdist.models.load_llama`` that loads a real Llama-3.

Choices that are ours:
- A curriculum on the number of boxes: training starts with ``curriculum_start`` boxes and adds one
  whenever held-out accuracy at the current number reaches ``curriculum_threshold``, because entity
  tracking learnt from scratch on all boxes at once can sit at chance for thousands of steps.
- A student is "warm" by early stopping: training ends as soon as held-out accuracy on the real task
  (all ``n_boxes`` boxes, whatever the curriculum's stage) enters ``stop_window`` and a second,
  larger held-out set (``confirm_items``, another seed) confirms it, so its ability is real but
  partial. Checked often on one small set, accuracy enters the window on a noise spike sooner or
  later; the second set keeps such a spike from stopping the run.
- Sparse circuits: ``head_sparsity`` weights ``HeadOutputPenalty`` (optionally ramped in over
  ``head_sparsity_ramp`` steps, sparing ``free_heads``). A student that is warm *and* sparse is made
  in two runs: a penalty-free one stopped early, then a *consolidation* that starts from it
  (``init_from``) and fits its answer distribution (``self_distill``, KL at the answer positions)
  under the penalty, so most heads fall silent while the behaviour, warmth included, stays
  (``cdist.zoo`` says why).
- The training state is checkpointed atomically every evaluation, and a run resumes from it.

What differs between tasks is read from the task's registry record (``cdist.tasks.get_task``),
never from its name: ``curriculum`` here, and the rows of ``cdist.zoo.organism_data``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from cdist import evaluate, tasks
from cdist.checkpoints import atomic_torch_save
from cdist.errors import InputError
from cdist.progress import bar as progress_bar
from cdist.types import Head
from cdist.zoo.organism_config import OrganismConfig
from cdist.zoo.organism_data import IGNORE, held_out, training_batch

__all__ = ["CONFIRM_SEED", "IGNORE", "HeadOutputPenalty", "LogitsOf", "OrganismConfig", "held_out",
           "new_organism", "train_organism", "training_batch"]

# Held-out items that confirm an early stop; evaluation uses seed 12345, the zoo script 2024.
CONFIRM_SEED = 54321


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


class HeadOutputPenalty:
    """A sparsity penalty on attention heads' outputs, so that a task is carried by few heads.

    Trained on one task alone, an organism spreads the answer over every head of a layer (each head
    a small vote), so no small circuit is faithful. Real models hold many tasks and a task's circuit
    is a few heads; this penalty makes the organisms alike. For each layer, head and token it takes
    the norm of the head's residual-stream output ``z_h @ W_O[h]`` divided by the norm of the
    residual stream entering the layer (so that shrinking the whole stream cannot lower it),
    averages over tokens, raises each head's average to ``power`` and sums over heads and layers.
    With ``power`` 1 this is a group lasso, which cannot tell one head writing the answer from four
    heads writing a quarter each, so it leaves the answer spread; with ``power`` 0.5 the sum is
    concave and favours few heads, as Voita et al. 2019's head gates do. Hooks on each decoder
    layer and its ``o_proj`` collect it during a training-mode forward pass; ``take()`` returns the
    sum and resets. The hooks are registered on construction and removed by ``remove()``, or on
    leaving a ``with`` block (``with HeadOutputPenalty(model) as penalty: ...``).
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
    penalty = None
    if cfg.head_sparsity:
        penalty = HeadOutputPenalty(model, cfg.head_sparsity_power, cfg.free_heads)
    with (penalty or contextlib.nullcontext(),
          progress_bar(cfg.steps, cfg.name, enabled=progress, initial=run.step) as bar):
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
