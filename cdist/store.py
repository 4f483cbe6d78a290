"""One store for every result cdist reuses by identity (scans, circuits, circuit searches, head
maps, trained runs' records), and the fingerprints that every identity is made of (the teacher
cache and training checkpoints compare them too).

A result is kept as one JSON file, ``{"identity": ..., "value": ...}``, written atomically
(``cdist.checkpoints``); a run's record (``Store.record``) carries its identity among its own
fields instead, since people and reports read it as it is. Its *identity* is everything that made
it: the models' fingerprints, the items' fingerprints and the settings. The rule is the same
everywhere: the same identity reuses the kept value; another identity, or a file that cannot be
read (a kill leaves no half-written file, but a user's edit can), is made again.

Fingerprints are cheap at any scale: a model's is a hash of each parameter's name, shape, dtype
and three exact integer sums of its bits (plain, of squares, position-weighted; no copy of the
weights leaves the device, and the same weights give the same fingerprint on any device and thread
count), so two models share it only if every tensor agrees in all three; an item set's hashes the
token columns it is read by.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch

from cdist.checkpoints import atomic_write_json, read_json

__all__ = ["Store", "items_fingerprint", "jsonable", "model_fingerprint", "tensor_fingerprint"]

T = TypeVar("T")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape, dtype and three exact sums of its bits (module
    doc)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            sums = ":".join(map(str, _sums(p.detach().reshape(-1))))
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{sums};".encode())
    return digest.hexdigest()


def tensor_fingerprint(x: torch.Tensor) -> str:
    """A hash of a small tensor's shape, dtype and bytes (reference means, masks): unlike
    ``model_fingerprint`` it copies the tensor to the CPU."""
    data = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{tuple(x.shape)}:{x.dtype};".encode() + data).hexdigest()


def _sums(flat: torch.Tensor, chunk: int = 1 << 22) -> tuple[int, int, int]:
    """The sum, the sum of squares and a position-weighted sum (weights 1..1009 repeating, so
    that weights moved within a tensor, such as two heads swapped, change it) of the tensor's bits
    read as 16-bit integers. Integer sums are exact, so they are the same on any device and any
    number of threads (a float sum's last bits depend on the order a parallel reduction takes), and
    no copy of the weights leaves the device. In chunks, each far from int64's range."""
    bits = flat.contiguous().view(torch.int16 if flat.element_size() >= 2 else torch.int8)
    total = squares = weighted = 0
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk].long()
        index = torch.arange(start, start + part.numel(), device=part.device)
        total += int(part.sum())
        squares += int(part.square().sum())
        weighted += int((part * (index % 1009 + 1)).sum())
    return total, squares, weighted


def items_fingerprint(data, columns: Iterable[str] | None = None) -> list:
    """``[n, hash]`` of an item set: its token ids and answers, or the ``columns`` named."""
    if columns is None:
        ids = [[int(t) for t in row] for row in data["input_ids"]]
        payload = [ids, [int(a) for a in data["answer_id"]]]
    else:
        payload = [list(data[c]) for c in dict.fromkeys(columns)]
    return [len(data), hashlib.sha256(json.dumps(payload).encode()).hexdigest()]


def jsonable(x):
    """``x`` as it reads back from JSON (tuples as lists), so that identities compare equal."""
    return json.loads(json.dumps(x))


class Store:
    """The results kept under one folder, each with its identity (module doc).

    Args:
        root: the folder; a name is a path relative to it, e.g. ``"scans/teacher.json"``.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str | Path) -> Path:
        """Where ``name``, a path relative to the store's folder, is kept."""
        if Path(name).is_absolute():
            raise ValueError(f"{name}: a store's names are relative to its folder {self.root}")
        return self.root / name

    def _read(self, name: str | Path) -> dict | None:
        """The file kept under ``name`` as written (``{"identity", "value"}``); None when there
        is none or it cannot be read (a kill leaves no half-written file, but a user's edit
        can)."""
        try:
            saved = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) and "value" in saved else None

    def load(self, name: str, identity):
        """The value kept under ``name`` for ``identity``; None when there is none, it was made
        for another identity, or it cannot be read."""
        saved = self._read(name)
        return saved["value"] if saved and saved.get("identity") == jsonable(identity) else None

    def kept(self, name: str | Path):
        """The value kept under ``name`` whatever its identity (for a report that shows what a
        folder holds); None when there is none or it cannot be read."""
        saved = self._read(name)
        return saved["value"] if saved else None

    def save(self, name: str, identity, value) -> None:
        """Keep ``value`` (JSON) under ``name`` for ``identity``, atomically, its dicts in their
        order: a value read back is the value made, so that what is written from it (a circuit's
        record) does not change between a run and its resumption."""
        atomic_write_json({"identity": jsonable(identity), "value": value}, self.path(name),
                          sort_keys=False)

    def reuse(self, name: str, identity, make: Callable[[], T], *,
              encode: Callable[[T], object] = lambda v: v,
              decode: Callable[[object], T] = lambda v: v) -> T:
        """The value kept for ``identity`` (decoded), else ``make()``'s, kept (encoded). A kept
        value that ``decode`` cannot read (an edited record) is made anew."""
        kept = self.load(name, identity)
        if kept is not None:
            try:
                return decode(kept)
            except (KeyError, TypeError, ValueError, AttributeError):
                pass
        value = make()
        self.save(name, identity, encode(value))
        return value

    def record(self, name: str | Path, identity: dict, make: Callable[[], dict]) -> dict:
        """A result record that carries its identity among its own fields (a trained run's
        ``eval.json``, read by people and reports as it is): the kept record when its identity
        fields equal ``identity``, else ``identity | make()``, kept.

        Raises:
            FileFormatError: the kept record is not JSON (it is the user's to delete: it may be
                the only copy of an evaluation).
        """
        path = self.path(name)
        saved = (read_json(path, f"delete {path.parent} to make it again") if path.is_file()
                 else None)
        want = jsonable(identity)
        if isinstance(saved, dict) and {k: saved.get(k) for k in want} == want:
            return saved
        made = identity | make()
        atomic_write_json(made, path)
        return made
