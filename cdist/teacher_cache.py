"""The teacher's side of circuit distillation, computed once and stored, so that the student trains
with the teacher absent from memory.

A distillation step reads from the teacher only its answer at ``pos_last`` (CE's label), its logits
there (KD, if asked for) and its circuit heads' ``z`` at their positions (CKA): on the training
items, and on the evaluation items for the logged diagnostics. None of it depends on the student,
so for fixed items it can be computed once (an 8B teacher on one GPU, or loaded across several, or
each rank of ``torchrun`` building its share of the shards), stored, and freed before the student
trains; the student's GPU then holds only the student.

On disk, a folder (``build_teacher_cache``): ``teacher.json`` (the teacher's fingerprint, its
tokenizer's, its sites, and for each item set its fingerprint and shards) and
``<set>-<k>.safetensors`` shards of ``shard_items`` items each, holding ``labels`` ``[n]`` (the
teacher's top-1 token), ``logits`` ``[n, d_vocab]`` (float32, only with ``logits=True``: 0.5 MB an
item at Llama-3's vocabulary) and one ``z.<head>@<column>`` ``[n, d_head]`` (float32) per site. Each
shard is written atomically, so an interrupted build resumes at the first missing one.

``distill(student, TeacherCache.load(path), ...)`` trains as with the live teacher (the same run,
to float rounding), and the run's identity records the same teacher fingerprint, so a run may
resume either way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cdist import distributed
from cdist.activations import Site, head_z
from cdist.checkpoints import atomic_write_bytes, atomic_write_json, read_json
from cdist.errors import FileFormatError, InputError, MismatchError
from cdist.evaluate import batches, device_of, pad_id
from cdist.models import HookedTransformer, check_heads
from cdist.store import items_fingerprint, model_fingerprint
from cdist.types import Head

__all__ = ["CachedItems", "TeacherCache", "build_teacher_cache", "teacher_outputs",
           "tokenizer_fingerprint"]

_META = "teacher.json"


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of a tokenizer's vocabulary and special-token ids (None without a tokenizer): equal
    for tokenizers that give the same ids, which is all a cached label needs."""
    if tokenizer is None:
        return None
    special = [getattr(tokenizer, name, None) for name in
               ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")]
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), special])
    return hashlib.sha256(blob.encode()).hexdigest()


def _site_key(site: Site) -> str:
    return f"z.{site[0]}@{site[1]}"


def _parse_site(key: str) -> Site:
    head, column = key.removeprefix("z.").split("@")
    return Head.parse(head), column


@dataclass(frozen=True)
class CachedItems:
    """What the teacher gives for one item set, row ``i`` for item ``i``."""

    fingerprint: list
    labels: Int[Tensor, " n"]
    logits: Float[Tensor, "n d_vocab"] | None
    z: dict[Site, Float[Tensor, "n d_head"]]


class TeacherCache:
    """A teacher stored by ``build_teacher_cache``: pass it to ``cdist.distill.distill`` in the
    teacher's place."""

    def __init__(self, meta: dict, sets: Mapping[str, CachedItems]):
        self.meta, self.sets = meta, dict(sets)
        self.fingerprint: str = meta["teacher"]
        self.tokenizer: str | None = meta["tokenizer"]
        self.d_vocab: int = meta["d_vocab"]
        self.sites: list[Site] = [_parse_site(k) for k in meta["sites"]]
        self.has_logits: bool = meta["logits"]

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        """The cache in folder ``path``.

        Raises:
            FileFormatError: the folder is not a complete cache (names what is missing).
        """
        from safetensors.torch import load_file

        path = Path(path)
        fix = "build it again with cdist.teacher_cache.build_teacher_cache"
        if not (path / _META).is_file():
            raise FileFormatError(f"{path} holds no teacher cache (no {_META}); {fix}")
        meta = read_json(path / _META, fix)
        sets = {}
        for name, spec in meta["sets"].items():
            missing = [f for f in spec["shards"] if not (path / f).is_file()]
            if missing:
                raise FileFormatError(f"{path} lacks the shards {missing} of its {name!r} items "
                                      f"(an interrupted build); {fix}")
            parts = [load_file(path / f) for f in spec["shards"]]
            for f, part in zip(spec["shards"], parts, strict=True):
                # every tensor of a shard holds one row per item of it
                rows = {k: len(v) for k, v in part.items()}
                if "labels" not in rows or len(set(rows.values())) != 1:
                    raise FileFormatError(f"{path / f} is not a shard of teacher outputs: its "
                                          f"tensors' rows {rows} differ or lack labels; {fix}")
            joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            sets[name] = CachedItems(
                spec["fingerprint"], joined["labels"], joined.get("logits"),
                {_parse_site(k): v for k, v in joined.items() if k.startswith("z.")})
        return cls(meta, sets)

    def items(self, data, what: str) -> CachedItems:
        """The cached rows of ``data`` (matched by its items' fingerprint).

        Raises:
            MismatchError: the cache holds no such items (``what`` names them in the message).
        """
        want = items_fingerprint(data)
        for name, cached in self.sets.items():
            if cached.fingerprint == want:
                if len(cached.labels) != len(data):
                    raise FileFormatError(f"the teacher cache's {name!r} set has "
                                          f"{len(cached.labels)} rows for {len(data)} items; "
                                          "build it again with cdist.teacher_cache."
                                          "build_teacher_cache")
                return cached
        raise MismatchError(f"the teacher cache holds no {what} of these {len(data)} items (it "
                            f"holds {sorted(self.sets)}); build it on the items the run uses")

    def check_sites(self, sites: Iterable[Site]) -> None:
        """Refuse a run that reads teacher heads, or positions, that the cache did not store."""
        missing = sorted({f"{h}@{c}" for h, c in sites} - {f"{h}@{c}" for h, c in self.sites})
        if missing:
            raise MismatchError(f"the teacher cache has no z for {missing}; build it with the "
                                "head map the run uses")


def build_teacher_cache(
    teacher: HookedTransformer,
    sites: Iterable[Site],
    item_sets: Mapping[str, object],
    path: str | Path,
    *,
    logits: bool = False,
    shard_items: int = 1024,
    batch_size: int = 64,
) -> TeacherCache:
    """Run ``teacher`` once over each item set and store what distillation reads from it
    (module doc); resumes an interrupted build.

    Args:
        teacher: the teacher (any device and dtype; its values are stored as float32).
        sites: ``(head, column)`` pairs to store ``z`` for: a head map's ``sites()[1]``.
        item_sets: name -> task dataset, e.g. ``{"train": train_data, "eval": eval_data}``.
        path: the cache's folder.
        logits: store the logits at ``pos_last`` too (needed for KD only).
        shard_items: items per shard file. Under ``torchrun`` each rank builds every
            ``world_size``-th shard.
        batch_size: prompts per forward pass.

    Returns:
        The cache, loaded.
    """
    from safetensors.torch import save

    if min(shard_items, batch_size) < 1:
        raise InputError(f"shard_items={shard_items}, batch_size={batch_size}: give whole numbers "
                         ">= 1")
    sites = list(dict.fromkeys(sites))
    check_heads(teacher, [h for h, _ in sites], "the cached teacher heads")
    path = Path(path)
    meta = {"teacher": model_fingerprint(teacher),
            "tokenizer": tokenizer_fingerprint(teacher.tokenizer), "d_vocab": teacher.cfg.d_vocab,
            "sites": [_site_key(s) for s in sites], "logits": logits, "shard_items": shard_items,
            "sets": {}}
    columns = sorted({col for _, col in sites} - {"pos_last"})
    shards = []
    for name, data in item_sets.items():
        lacks = sorted(set(columns) - set(data.column_names))
        if lacks:
            raise InputError(f"the {name!r} items lack the position columns {lacks} of the sites")
        starts = range(0, len(data), shard_items)
        files = [f"{name}-{k:05d}.safetensors" for k in range(len(starts))]
        meta["sets"][name] = {"fingerprint": items_fingerprint(data), "shards": files}
        shards += [(data.select(range(s, min(s + shard_items, len(data)))), path / f)
                   for s, f in zip(starts, files, strict=True)]
    # The description first (``load`` refuses it until every shard is there); shards of another
    # teacher, item set or layout are never reused.
    resume = (path / _META).is_file() and read_json(path / _META) == meta
    atomic_write_json(meta, path / _META)
    distributed.barrier()
    for items, file in distributed.share(shards):
        if resume and file.is_file():
            continue
        rows = _teacher_rows(teacher, items, sites, columns, logits, batch_size)
        atomic_write_bytes(save(rows), file, every_rank=True)
    distributed.barrier()  # every rank's shards are written before any rank reads them
    return TeacherCache.load(path)


@torch.no_grad()
def teacher_outputs(
    teacher: HookedTransformer, batch: Mapping[str, Tensor], sites: list[Site]
) -> tuple[Float[Tensor, "batch d_vocab"], Int[Tensor, " batch"], dict]:
    """What distillation reads from the teacher on a batch (``cdist.evaluate.batches``): its
    logits at ``pos_last`` (float32), its top-1 answers there and each site's ``z``; bfloat16
    autocast on a GPU. The live teacher of ``distill`` and the cache's build both run this."""
    on_gpu = device_of(teacher).type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
        logits, z = head_z(teacher, batch["input_ids"], sites, batch)
    last = logits.float()
    return last, last.argmax(-1), z


def _teacher_rows(teacher: HookedTransformer, items, sites: list[Site], columns: list[str],
                  logits: bool, batch_size: int) -> dict[str, Tensor]:
    out: dict[str, list[Tensor]] = {"labels": [], "logits": []} | {_site_key(s): [] for s in sites}
    for batch in batches(items, batch_size, pad_id(teacher), columns):
        last, labels, z = teacher_outputs(teacher, batch, sites)
        out["labels"].append(labels.cpu())
        if logits:
            out["logits"].append(last.cpu())
        for site in sites:
            out[_site_key(site)].append(z[site].float().cpu())
    return {k: torch.cat(v).contiguous() for k, v in out.items() if v}
