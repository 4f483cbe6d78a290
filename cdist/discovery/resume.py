"""A batched scan's running sums, kept on disk after each batch, so that a killed scan goes on
where it stopped instead of starting over.

At real depth a head scan is hours on a CPU (SmolLM2-135M's mean-ablation scan of 500 items: 960
forward passes, about two hours on one core), and a kill (a session's end, a preempted job) used
to lose all of it. The trained runs resume from their checkpoints and the path-patching search
group by group (``cdist.discovery.search``); the scans resume batch by batch, here.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from cdist import distributed
from cdist.checkpoints import atomic_torch_save
from cdist.progress import bar as progress_bar
from cdist.store import items_fingerprint, jsonable, model_fingerprint

__all__ = ["RunningSums", "scan_key"]


def scan_key(scan: str, model, data, columns, **settings) -> dict:
    """What a ``scan``'s running sums depend on: the model's weights, the item columns it reads
    (the usual ones and ``columns``, where the items have them) and its ``settings``."""
    # a column the items lack is refused by ``batches`` in one line, at the first batch
    read = [c for c in ("input_ids", "answer_id", "pos_last", *columns) if c in data.column_names]
    return {"scan": scan, "model": model_fingerprint(model),
            "items": items_fingerprint(data, read)} | settings


class RunningSums:
    """A batched scan's float64 sums over its batches, kept in a file after each batch when
    ``path`` is given, so that a killed scan goes on from its last whole batch.

    Resumed, the scan adds the remaining batches to the kept sums in the same order, so it
    returns what an uninterrupted scan returns, bit for bit, when it resumes on the same threads
    and kernels (``cdist.numerics``; on others, the batches after the kill carry their last bits).
    The file is read only when its ``key`` (what made the sums: the model's fingerprint, the
    items', the settings) equals this scan's and it names the same sums; otherwise the scan
    starts over and replaces it. It is written atomically (a kill leaves the last whole batch's
    file) and removed by ``finish``. Under ``torchrun`` each rank keeps its own share in
    ``<path>.rank<r>``.

    ``sums`` are the starting values (zeros), by name; ``done`` counts the batches they hold.
    """

    def __init__(self, path: str | Path | None, key: dict | None, **sums: Tensor):
        self.sums, self.done, self.path = sums, 0, None
        if path is None:
            return
        path, key = Path(path), dict(key or {})
        if distributed.active():
            key |= {"rank": distributed.rank(), "world_size": distributed.world_size()}
            path = path.with_name(f"{path.name}.rank{distributed.rank()}")
        self.path, self.key = path, jsonable(key)
        kept = self._read()
        if kept is not None:
            self.sums, self.done = kept["sums"], kept["done"]

    def _read(self) -> dict | None:
        try:
            kept = torch.load(self.path, weights_only=True)
        except Exception:  # noqa: BLE001  # none, or not a file this class wrote (an edit) ...
            return None  # ... and damaged bytes raise anything from struct.error to KeyError
        if (not isinstance(kept, dict) or kept.get("key") != self.key
                or not isinstance(kept.get("sums"), dict) or kept["sums"].keys() != self.sums.keys()
                or not isinstance(kept.get("done"), int)):
            return None
        return kept

    def pending(self, batches: Iterable) -> Iterator:
        """The scan's ``batches`` that are not yet in the sums, in order."""
        return itertools.islice(batches, self.done, None)

    @contextlib.contextmanager
    def bar(self, label: str, n_batches: int, per_batch: int, enabled: bool) -> Iterator:
        """The scan's progress bar, counted in forward passes (at real depth one batch is minutes
        of them), from the batches already in the sums."""
        with progress_bar(n_batches * per_batch, label, unit="pass", enabled=enabled,
                          initial=self.done * per_batch) as bar:
            yield bar

    def add(self, **batch_sums: Tensor) -> None:
        """Add the next batch's sums, and keep the total (when there is a file)."""
        for name, value in batch_sums.items():
            self.sums[name] += value
        self.done += 1
        if self.path is not None:
            atomic_torch_save({"key": self.key, "done": self.done, "sums": self.sums}, self.path,
                              every_rank=True)

    def finish(self) -> None:
        """Remove the file, once the scan it served is made: this process's, and on the main
        process those that another layout of processes left (``<path>`` of one process,
        ``<path>.rank<r>`` of a torchrun), which no later scan of this layout would read."""
        if self.path is None:
            return
        self.path.unlink(missing_ok=True)
        if distributed.is_main():
            plain = self.path.with_name(self.path.name.split(".rank")[0])
            for left in (plain, *plain.parent.glob(f"{plain.name}.rank*")):
                left.unlink(missing_ok=True)
