"""The training data of a model organism: batches of task rows and warm-up rows, and held-out items.

Choices that are ours:
- Only answer tokens are supervised. Entity-tracking sequences may carry several queries about one
  context (``n_queries``); queries are drawn *with* replacement, because a permutation of all boxes
  teaches an elimination shortcut (the last answer is the one object not yet named). Evaluation
  always uses the single-query prompts of the task generator's test split (``held_out``).
- ``warmup_templates`` mixes easier entity-tracking forms into half of each batch (``adjacent``: the
  object right before its label, the label as the query), which gives a lookup head a gradient
  before the longer form's offset heads exist. Theory of mind gets the same warm-up with two boxes,
  since its stories bind two containers to two states; trained on the task alone, both tasks can
  sit at their trivial baseline for a long time. ``warmup_whole_batches`` makes each batch all
  warm-up or all task instead, a mix that can leave chance where half-and-half batches do not.

How a task's rows are made is read from its registry record (``cdist.tasks.get_task``):
``organism_rows`` (multi-query entity-tracking rows or the generator's items) and ``warmup_boxes``.
"""

from __future__ import annotations

import random

from cdist import evaluate, tasks
from cdist.zoo.organism_config import OrganismConfig

__all__ = ["IGNORE", "held_out", "training_batch"]

IGNORE = -100


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
