"""Making a teacher: a checkpoint fine-tuned on a task against the items' own answers.

Circuit distillation needs a teacher that does the task (its circuit is the mechanism); a
pretrained model often does not (SmolLM2-135M-Instruct scores below chance on 3-box entity
tracking), and the paper's teacher was Llama-3-8B fine-tuned on the task. ``finetune`` is that
step: plain task fine-tuning (``cdist.distill.distill`` with no teacher and ``labels="answers"``)
of every weight, or of chosen heads only, optionally of a shallower copy first
(``keep_layers``: a student of the teacher's own family). It works in one run folder:

- ``OUT/run/``: the training run (checkpoints, ``metrics.json``/``.csv``), resumed where an
  interrupted call stopped;
- ``OUT/model/``: the fine-tuned model, a transformers checkpoint with its tokenizer
  (``cdist.models.save_llama``), which every step loads as ``--teacher`` or ``--student``;
- ``OUT/finetune.json``: the settings, the commit, the source's and the result's fingerprints
  (``cdist.store.model_fingerprint``; a table refuses a model that is not the one recorded), the
  validation accuracy before and after, the curve and the wall times.

A finished folder is reused under the same settings and source, and refused under others
(``run_folder.claim``'s identity). Training items come from the task's train split, validation
items from its test split, each from seeds of their own (``items``), apart from an experiment's
(``cdist.pipeline.items``: data seed 0 uses seeds 1 to 20 and ``train_seed``'s).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from cdist import models, numerics, run_folder, tasks
from cdist.checkpoints import atomic_write_json, read_json, writing
from cdist.errors import ConfigError
from cdist.evaluate import accuracy
from cdist.models import HookedTransformer
from cdist.provenance import git_commit
from cdist.store import items_fingerprint, jsonable, model_fingerprint
from cdist.types import Head

__all__ = ["FinetuneConfig", "finetune", "items"]

RECORD = "finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuned model depends on (besides its source).

    Attributes:
        task: a registered task or a task file (``cdist.tasks``).
        template: the task's template (default: its real one).
        task_kwargs: the generator's other settings (word lists, a zoo organism's own form).
        n_boxes: entity tracking's boxes; several make an even mix of them (each count its own
            seed), as a teacher that should count boxes beyond one size is trained.
        train_items, val_items: items trained on (train split) and logged (test split).
        steps, lr, batch_size, eval_every, seed: the run's (``DistillConfig``'s).
        heads: train only these heads (names such as ``"a3.h1"``; ``kv_policy`` says which of
            their weights); None: every weight.
        kv_policy: ``"qo"`` or ``"group"`` (``DistillConfig``), for ``heads``.
        keep_layers: fine-tune a shallower copy of the source with these of its layers
            (``models.keep_layers``); None: the source as it is.
        numerics: ``"native"`` (the CPU's fastest kernels) or ``"portable"`` (the same weights
            on any x86-64 machine; the process must have called ``cdist.numerics.pin`` first).
    """

    task: str = "entity_tracking"
    template: str | None = None
    task_kwargs: dict = field(default_factory=dict)
    n_boxes: tuple[int, ...] | None = None
    train_items: int = 3000
    val_items: int = 120
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 16
    eval_every: int = 5
    seed: int = 0
    heads: tuple[str, ...] | None = None
    kv_policy: str = "qo"
    keep_layers: tuple[int, ...] | None = None
    numerics: str = "native"

    def __post_init__(self) -> None:
        task = tasks.get_task(self.task)  # an unknown task is refused here, naming the known
        for name in ("train_items", "val_items", "steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: give a positive number")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: give a positive learning rate")
        if self.n_boxes is not None and "n_boxes" not in task.organism_kwargs:
            raise ConfigError(f"{self.task} items have no boxes; leave out n_boxes")
        if self.n_boxes is not None and len(set(self.n_boxes)) != len(self.n_boxes):
            raise ConfigError(f"n_boxes={self.n_boxes} repeats a count; give each once")
        if self.template is not None and self.template not in task.templates:
            raise ConfigError(f"{self.task} has no template {self.template!r}; it has "
                              f"{sorted(task.templates)}")
        for head in self.heads or ():
            Head.parse(head)  # a bad name raises ValueError naming it
        if self.heads is not None and len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"heads={self.heads} repeats a head; give each once")
        if self.numerics not in ("native", "portable"):
            raise ConfigError(f"numerics={self.numerics!r}: give 'native' or 'portable'")


def items(cfg: FinetuneConfig, tokenizer, n: int, split: str):
    """``n`` items of ``split`` (train: seed 1000 + ``cfg.seed``; test: 2000 + ``cfg.seed``); with
    several ``n_boxes``, an even mix (count ``b`` from seed ``base * 100 + b``), shuffled."""
    task = tasks.get_task(cfg.task)
    base = (1000 if split == "train" else 2000) + cfg.seed
    kwargs = {**cfg.task_kwargs, "template": cfg.template or cfg.task_kwargs.get(
        "template", task.real_template)}
    if task.size is not None:  # a task file: the first n of its split, in the seed's order
        have = task.size(tokenizer, split)
        if n > have:
            raise ConfigError(f"{cfg.task}: {n} {split} items asked for but {have} of its rows "
                              f"fall in the {split} split; add rows or ask for fewer")
        return task.items(n, tokenizer=tokenizer, seed=base, split=split, **kwargs)
    if not cfg.n_boxes:
        return task.items(n, tokenizer=tokenizer, seed=base, split=split, **kwargs)
    counts = cfg.n_boxes
    kwargs.pop("n_boxes", None)
    parts = [task.items(n // len(counts) + (i < n % len(counts)), tokenizer=tokenizer,
                        seed=base * 100 + b, split=split, n_boxes=b, **kwargs)
             for i, b in enumerate(counts)]
    return datasets.concatenate_datasets(parts).shuffle(seed=base)


def finetune(model: HookedTransformer, cfg: FinetuneConfig, out_dir: str | Path, *,
             source: str | None = None, command: str | None = None,
             progress: bool = True) -> dict:
    """Fine-tune ``model`` (or its ``keep_layers`` copy) on ``cfg.task`` in ``out_dir`` (module
    doc) and return the record written to ``OUT/finetune.json``; ``model`` itself changes only
    when no layers are cut and the folder holds no finished run of these settings (which is
    returned, marked ``reused``, and not loaded into ``model``). ``source`` names where the model
    came from, for the record; ``command``, the command line, is added to ``OUT/commands.log``.

    Raises:
        RunFolderError: ``out_dir`` is not cdist's, is in use, or was made from another source or
            with other settings.
        InputError, ConfigError: heads outside the model, too few items for the task, ...
    """
    out = Path(out_dir)
    if cfg.numerics == "portable" and not numerics.pinned():
        raise ConfigError("numerics='portable', but this process runs its CPU's own kernels: "
                          "call cdist.numerics.pin() before any model loads")
    source_fingerprint = model_fingerprint(model)
    if cfg.keep_layers is not None:
        model = models.keep_layers(model, cfg.keep_layers)
    heads = [Head.parse(h) for h in cfg.heads] if cfg.heads is not None else None
    # everything that can be refused is, before the folder is made
    if heads is not None:
        models.check_heads(model, heads, fix="name heads of the model being fine-tuned")
    train = items(cfg, model.tokenizer, cfg.train_items, "train")
    val = items(cfg, model.tokenizer, cfg.val_items, "test")
    settings = asdict(cfg)
    if heads is None:
        del settings["kv_policy"]  # it says which weights of the heads train: none are chosen
    if cfg.numerics == "native":
        del settings["numerics"]  # so that a folder made before the setting existed still fits
    # as JSON reads it back (lists, not tuples), so that a finished folder compares equal; the
    # items' fingerprints, so that an edited task file is not taken for the one trained on
    identity = jsonable({
        "finetune": settings, "source_fingerprint": source_fingerprint,
        "items": {"train": items_fingerprint(train), "val": items_fingerprint(val)}})
    held = run_folder.claim(out, identity)
    try:
        record = _finetune(model, cfg, out, identity, heads, (train, val), source, command,
                           progress)
    except KeyboardInterrupt:
        raise  # held until the command ends, which names the folder as kept (cdist.interrupts)
    except BaseException:
        held.release()
        raise
    held.release()
    return record


def _finetune(model: HookedTransformer, cfg: FinetuneConfig, out: Path, identity: dict, heads,
              data: tuple, source: str | None, command: str | None, progress: bool) -> dict:
    """``finetune``'s work in its claimed folder."""
    from cdist.distill import DistillConfig, distill

    if command is not None:
        with writing(out / "commands.log"), open(out / "commands.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {git_commit()} {command}\n")
    done = out / RECORD
    if done.is_file() and (out / "model" / "config.json").is_file():
        # the claim refused a folder of other settings: a finished record here is of these
        return read_json(done, "delete the folder to fine-tune again") | {"reused": True}
    started = time.time()
    train, val = data
    run_cfg = DistillConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                            trainable="all" if heads is None else "heads",
                            kv_policy=cfg.kv_policy, labels="answers",
                            eval_every=cfg.eval_every, seed=cfg.seed)
    before = accuracy(model, val)
    run = distill(model, None, None, train, val, run_cfg, out / "run", heads=heads,
                  progress=progress)
    after = accuracy(model, val)
    models.save_llama(model, out / "model")
    record = jsonable({  # as finetune.json holds it, so that a reused record reads the same
        "identity": identity, "source": source, "model": str(out / "model"),
        "settings": asdict(cfg), "distill_config": asdict(run_cfg), "commit": git_commit(),
        "layers": model.cfg.n_layers, "trained_heads": run["trained_heads"],
        "val_items": len(val), "val_accuracy_before": before, "val_accuracy_after": after,
        "train_wall_time_s": run["wall_time_s"],
        "wall_time_s": round(time.time() - started, 1),
        "curve": [[m["step"], m["accuracy"]] for m in run["metrics"]],
        "numerics": numerics.state(),
        # of the checkpoint as a step loads it back: a table refuses a model not this one
        "fingerprint": model_fingerprint(models.load_llama(out / "model")),
    })
    atomic_write_json(record, done)
    # the saved checkpoint is the run's product (recorded above); its state is not needed
    (out / "run" / "state.pt").unlink(missing_ok=True)
    return record

