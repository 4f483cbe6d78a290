"""The item sets of one experiment, all fresh from the task generator, each from its own seed.

- ``training(n, seed)``: each run seed's own training set (train split, from a pool of the seed's
  own, less any validation prompt), whose first n items are the set of regime n, so a seed's small
  set is inside its large one. A run is the unit of replication: seeds that shared their items would
  repeat the same item effects, and their spread would understate what another draw of training
  items does;
- ``val`` (train split): chooses the hyperparameters, places and matches heads, and is logged
  during training;
- ``reference`` (test split): the head means that mean ablation writes;
- ``found_on`` (test split): where the circuits are discovered;
- ``test`` and ``ood`` (test split; other box counts or templates): where every reported accuracy
  comes from, and nothing else.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cdist import limits, matching, tasks
from cdist.errors import ConfigError, InputError
from cdist.models import MAX_N_CTX, check_heads
from cdist.pipeline.config import ExperimentConfig
from cdist.store import items_fingerprint
from cdist.tasks.common import TEST_FRACTION
from cdist.types import Head

__all__ = ["ItemSets", "check_items", "check_positions", "make_items"]


def _generate(cfg: ExperimentConfig, tokenizer, n: int, split: str, seed: int, **overrides):
    return tasks.get_task(cfg.task).items(n, tokenizer=tokenizer, seed=seed, split=split,
                                          **{**cfg.task_kwargs, **overrides})


@dataclass(frozen=True)
class ItemSets:
    """The item sets of one experiment (module doc)."""

    val: object
    reference: object
    found_on: object
    test: object
    ood: dict  # OOD set name -> its items
    pool: Callable[[int], object]  # run seed -> its training pool (module doc)
    _pools: dict = field(default_factory=dict, repr=False, compare=False)

    def named(self) -> dict[str, object]:
        """Every fixed set by name (the training pools are drawn per seed, from the same
        template as ``val``)."""
        return {"validation": self.val, "reference": self.reference, "discovery": self.found_on,
                "test": self.test, **{f"OOD {k}": v for k, v in self.ood.items()}}

    def training(self, n_train: int, seed: int):
        """The first ``n_train`` items of run seed ``seed``'s training pool."""
        if seed not in self._pools:
            self._pools[seed] = self.pool(seed)
        pool = self._pools[seed]
        if n_train > len(pool):
            raise ConfigError(f"{n_train} training items asked of a pool of {len(pool)}")
        return pool.select(range(n_train))

    def identity(self, n_train: int, seed: int) -> dict:
        """Fingerprints of the items a run of ``n_train`` training items and ``seed`` trains and
        is scored on: a saved run is reused only for the same items."""
        return {"train": items_fingerprint(self.training(n_train, seed)),
                "val": items_fingerprint(self.val), **self.scored_on()}

    def scored_on(self) -> dict:
        """Fingerprints of the items a model is scored on: the test and the OOD sets."""
        return {"test": items_fingerprint(self.test),
                "ood": {k: items_fingerprint(v) for k, v in self.ood.items()}}


def train_seed(data_seed: int, seed: int) -> int:
    """The generator seed of run seed ``seed``'s training pool: apart from every other set's
    (``data_seed * 10 + 1..``, small numbers) and from every other run seed's."""
    return zlib.crc32(f"cdist training items {data_seed} {seed}".encode()) + 1_000


def make_items(cfg: ExperimentConfig, tokenizer) -> ItemSets:
    """The experiment's item sets, made with ``tokenizer`` (module doc)."""
    if tasks.get_task(cfg.task).size is not None:
        return _finite_items(cfg, tokenizer)
    seed = cfg.data_seed * 10
    val = _generate(cfg, tokenizer, cfg.val_items, "train", seed + 2)
    held_out = set(val["prompt"])

    def pool(run_seed: int):
        # as many spare items as validation has, for those a seed's draw shares with it
        made = _generate(cfg, tokenizer, max(cfg.regimes) + len(val), "train",
                         train_seed(cfg.data_seed, run_seed))
        kept = [i for i, p in enumerate(made["prompt"]) if p not in held_out]
        return made.select(kept[:max(cfg.regimes)])

    return ItemSets(
        val=val, pool=pool,
        reference=_generate(cfg, tokenizer, cfg.reference_items, "test", seed + 3),
        found_on=_generate(cfg, tokenizer, cfg.discovery_items, "test", seed + 4),
        test=_generate(cfg, tokenizer, cfg.test_items, "test", seed + 5),
        ood={name: _generate(cfg, tokenizer, cfg.ood_items, "test", seed + 6 + i, **kw)
             for i, (name, kw) in enumerate(cfg.ood)},
    )


def _finite_items(cfg: ExperimentConfig, tokenizer) -> ItemSets:
    """The sets of a task of finitely many items (a task file): each split's sets are disjoint
    slices of one order of its items (the data seed's), and each run seed's training pool is
    every other train item in the run seed's own order."""
    task, seed = tasks.get_task(cfg.task), cfg.data_seed * 10

    def sliced(split: str, counts: dict[str, int]) -> dict:
        wanted, out, offset = sum(counts.values()), {}, 0
        have = task.size(tokenizer, split)
        if wanted > have:
            raise ConfigError(f"{cfg.task}: {wanted} {split} items asked for ("
                              + ", ".join(f"{k} {v}" for k, v in counts.items())
                              + f") but {have} of its rows fall in the {split} split; add rows "
                              "or lower those counts")
        for name, n in counts.items():
            out[name] = _generate(cfg, tokenizer, n, split, seed, offset=offset)
            offset += n
        return out

    train = sliced("train", {"--val-items": cfg.val_items})
    test = sliced("test", {"--reference-items": cfg.reference_items,
                           "--discovery-items": cfg.discovery_items,
                           "--test-items": cfg.test_items})
    val = train["--val-items"]
    held_out = set(val["prompt"])
    n_train = task.size(tokenizer, "train")

    def pool(run_seed: int):
        # checked when a run needs its items, so that discovery on a small file is not refused
        # for training it does not do
        if max(cfg.regimes) > n_train - len(val):
            raise ConfigError(f"{cfg.task}: a regime of {max(cfg.regimes)} training items, but "
                              f"{n_train - len(val)} train-split rows are left after the "
                              f"{len(val)} validation items; add rows or lower --regimes "
                              "(--train-items for cdist distill)")
        made = _generate(cfg, tokenizer, n_train, "train", train_seed(cfg.data_seed, run_seed))
        kept = [i for i, p in enumerate(made["prompt"]) if p not in held_out]
        return made.select(kept[:max(cfg.regimes)])

    return ItemSets(val=val, pool=pool, reference=test["--reference-items"],
                    found_on=test["--discovery-items"], test=test["--test-items"],
                    ood={name: _generate(cfg, tokenizer, cfg.ood_items, "test", seed + 6 + i, **kw)
                         for i, (name, kw) in enumerate(cfg.ood)})


def check_positions(sets: Mapping[str, object], n_ctx: int, who: str) -> None:
    """Refuse item sets (name -> items) with a prompt longer than a model's context ``n_ctx``
    (rotary positions past it were never trained, and TransformerLens' tables stop there).

    Raises:
        InputError: naming the model, the set and both lengths.
    """
    for name, data in sets.items():
        longest = max((len(row) for row in data["input_ids"]), default=0)
        if longest > n_ctx:
            raise InputError(f"{who} takes prompts of at most {n_ctx} tokens (its context: "
                             f"max_position_embeddings, capped at {MAX_N_CTX}), but the {name} "
                             f"items run to {longest}; give fewer boxes (--n-boxes, --ood-boxes) "
                             "or a model with a longer context")


def check_items(cfg: ExperimentConfig, tokenizer, teacher_config=None,
                contexts: Mapping[str, int] | None = None, *, models: dict | None = None,
                device: str = "cpu") -> None:
    """Refuse, before a run folder is claimed, settings that would fail only once items are made:
    one item of every kind of set is made with ``tokenizer`` (so the task's words, boxes and
    templates are tried, and their length against each model's context in ``contexts``, a
    description of the model -> its ``n_ctx``), the position columns and teacher heads the config
    names are looked up (heads in ``teacher_config``, a checkpoint's config, when given), and every
    count is held to what the task can make and the machine can hold (``cdist.limits``): the items,
    and one training batch of ``models`` (role -> checkpoint config) on ``device``.

    Raises:
        ConfigError: a named position column the items lack; more items than the task makes
            distinct or than fit in memory; a batch too large for ``device``.
        InputError: a named teacher head outside the teacher, or items longer than a context.
    """
    made = [_generate(cfg, tokenizer, 1, "train", 0)]
    made += [_generate(cfg, tokenizer, 1, "test", 0, **kw) for _, kw in cfg.ood]
    for who, n_ctx in (contexts or {}).items():
        check_positions({"training": made[0], **{f"OOD {name}": d for (name, _), d
                                                 in zip(cfg.ood, made[1:], strict=True)}},
                        n_ctx, who)
    columns = set.intersection(*(set(matching.position_columns(d)) for d in made))
    named = {f"teacher_positions[{h!r}]": c for h, c in cfg.teacher_positions.items()}
    named["cka_position"] = cfg.distill.cka_position
    for what, column in named.items():
        if column is not None and column not in columns:
            raise ConfigError(f"{what} = {column!r} is not a position column of "
                              f"{cfg.task}'s items; choose from {sorted(columns)}")
    if teacher_config is not None:
        check_heads(teacher_config, [Head.parse(h) for h in cfg.teacher_positions],
                    "teacher_positions heads")
    _check_counts(cfg, tokenizer, made[0])
    if models:
        seq = max(len(ids) for d in made for ids in d["input_ids"])
        shapes = {role: {"n_layers": c.num_hidden_layers, "d_model": c.hidden_size,
                         "n_heads": c.num_attention_heads, "d_mlp": c.intermediate_size,
                         "d_vocab": c.vocab_size} for role, c in models.items()}
        limits.check_batch_memory(cfg.distill.batch_size, seq, shapes, device)


def _check_counts(cfg: ExperimentConfig, tokenizer, sample) -> None:
    """Each item set within the distinct items its split holds, and all of them (with one run
    seed's training pool) within memory (``cdist.limits``)."""
    spec = tasks.get_task(cfg.task)
    pool = max(cfg.regimes) + cfg.val_items  # made, then the items validation shares are dropped
    sets = [("training items (--train-items, --regimes)", "train", max(cfg.regimes), {}),
            ("--val-items", "train", cfg.val_items, {}),
            ("--reference-items", "test", cfg.reference_items, {}),
            ("--discovery-items", "test", cfg.discovery_items, {}),
            ("--test-items", "test", cfg.test_items, {})]
    sets += [(f"--ood-items ({name})", "test", cfg.ood_items, kw) for name, kw in cfg.ood]
    for what, split, n, kw in sets:
        distinct = spec.distinct_items(tokenizer, **{**cfg.task_kwargs, **kw})
        share = TEST_FRACTION if split == "test" else 1 - TEST_FRACTION
        if distinct is not None and n > distinct * share:
            raise ConfigError(f"{what} {n:,}: {cfg.task} makes about {int(distinct * share):,} "
                              f"distinct {split} items with these words; give at most that, or "
                              "longer word lists")
    counts = {what: (n, n) for what, _, n, _ in sets}
    counts[sets[0][0]] = (max(cfg.regimes), pool)
    limits.check_item_memory(counts, sample.data.nbytes)
