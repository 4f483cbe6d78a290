"""The item sets of one experiment, all fresh from the task generator, each from its own seed.

- ``train``: one pool (train split) whose first n items are the training set of regime n, so the
  small set is inside the large one;
- ``val`` (train split, another seed, minus any training prompt): chooses the hyperparameters,
  places and matches heads, and is logged during training;
- ``reference`` (test split): the head means that mean ablation writes;
- ``found_on`` (test split): where the circuits are discovered;
- ``test`` and ``ood`` (test split; other box counts or templates): where every reported accuracy
  comes from, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdist import matching, tasks
from cdist.errors import ConfigError
from cdist.models import check_heads
from cdist.pipeline.config import ExperimentConfig
from cdist.store import items_fingerprint
from cdist.types import Head

__all__ = ["ItemSets", "check_items", "make_items"]


def _generate(cfg: ExperimentConfig, tokenizer, n: int, split: str, seed: int, **overrides):
    return tasks.get_task(cfg.task).items(n, tokenizer=tokenizer, seed=seed, split=split,
                                          **{**cfg.task_kwargs, **overrides})


@dataclass(frozen=True)
class ItemSets:
    """The item sets of one experiment (module doc)."""

    train: dict  # regime (training items) -> the first that many of one pool
    val: object
    reference: object
    found_on: object
    test: object
    ood: dict  # OOD set name -> its items

    def identity(self, n_train: int) -> dict:
        """Fingerprints of the items a run of ``n_train`` training items trains and is scored on:
        a saved run is reused only for the same items."""
        return {"train": items_fingerprint(self.train[n_train]),
                "val": items_fingerprint(self.val), "test": items_fingerprint(self.test),
                "ood": {k: items_fingerprint(v) for k, v in self.ood.items()}}


def make_items(cfg: ExperimentConfig, tokenizer) -> ItemSets:
    """The experiment's item sets, made with ``tokenizer`` (module doc)."""
    seed = cfg.data_seed * 10
    pool = _generate(cfg, tokenizer, max(cfg.regimes), "train", seed + 1)
    seen = set(pool["prompt"])
    val = _generate(cfg, tokenizer, cfg.val_items, "train", seed + 2)
    return ItemSets(
        train={n: pool.select(range(n)) for n in cfg.regimes},
        val=val.select([i for i, p in enumerate(val["prompt"]) if p not in seen]),
        reference=_generate(cfg, tokenizer, cfg.reference_items, "test", seed + 3),
        found_on=_generate(cfg, tokenizer, cfg.discovery_items, "test", seed + 4),
        test=_generate(cfg, tokenizer, cfg.test_items, "test", seed + 5),
        ood={name: _generate(cfg, tokenizer, cfg.ood_items, "test", seed + 6 + i, **kw)
             for i, (name, kw) in enumerate(cfg.ood)},
    )


def check_items(cfg: ExperimentConfig, tokenizer, teacher_config=None) -> None:
    """Refuse, before a run folder is claimed, settings that would fail only once items are made:
    one item of every kind of set is made with ``tokenizer`` (so the task's words, boxes and
    templates are tried), and the position columns and teacher heads the config names are looked
    up (heads in ``teacher_config``, a checkpoint's config, when given).

    Raises:
        ConfigError: a named position column the items lack.
        InputError: a named teacher head outside the teacher.
    """
    made = [_generate(cfg, tokenizer, 1, "train", 0)]
    made += [_generate(cfg, tokenizer, 1, "test", 0, **kw) for _, kw in cfg.ood]
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
