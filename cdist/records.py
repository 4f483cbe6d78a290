"""Records on disk: the vocabulary of ``cdist.types`` (and ``cdist.matching.HeadMap``) written to
and read from files.

The records themselves only convert to and from plain dicts (``to_dict`` / ``from_dict``), so that
the vocabulary stays free of file I/O; this module puts those dicts in files. JSON serves any such
record (circuits, head maps, scans); a ``Scan`` also has a compact binary form, one safetensors file
whose tensors are its metrics and whose metadata is the rest. Writes are atomic
(``cdist.checkpoints``): a file is either its old version or its complete new one.
"""

from __future__ import annotations

import json
from pathlib import Path

from cdist.checkpoints import atomic_write_bytes, atomic_write_text
from cdist.errors import FileFormatError
from cdist.types import Scan

__all__ = ["load_scan", "read_record", "records_in", "save_scan", "write_record"]


def write_record(record, path: str | Path | None = None) -> str:
    """``record.to_dict()`` as indented JSON text; also written to ``path`` when given."""
    text = json.dumps(record.to_dict(), indent=2) + "\n"
    if path is not None:
        atomic_write_text(text, path)
    return text


def read_record(cls, source: str | Path):
    """The ``cls`` record (a class with ``from_dict``) in a JSON file (a ``Path``, or a ``str`` that
    is not JSON text) or in JSON text.

    A file that is not such a record (not JSON, or missing what ``from_dict`` needs) raises
    ``FileFormatError`` naming the file.
    """
    text, where = str(source), "the JSON text"
    if isinstance(source, Path) or not text.lstrip().startswith("{"):
        where = str(source)
        text = Path(source).read_text()
    try:
        return cls.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise FileFormatError(f"{where} is not a {cls.__name__} record ({type(err).__name__}: "
                              f"{err}); write it with cdist.records.write_record") from None


def records_in(cls, paths) -> dict[Path, object]:
    """The files of ``paths`` that are ``cls`` records, read; any other file (a user's note
    beside them) is left out, not an error."""
    found = {}
    for path in paths:
        try:
            found[Path(path)] = read_record(cls, Path(path))
        except (FileFormatError, OSError):
            continue
    return found


def save_scan(scan: Scan, path: str | Path) -> None:
    """Write ``scan`` as one safetensors file: the metrics as tensors, the rest as its metadata."""
    from safetensors.torch import save as safetensors_bytes

    meta = {k: v for k, v in scan.to_dict().items() if k != "metrics"}
    data = safetensors_bytes(dict(scan.metrics), metadata={"scan": json.dumps(meta)})
    atomic_write_bytes(data, path)


def load_scan(path: str | Path) -> Scan:
    """Read a scan written by ``save_scan``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["scan"])
        # SIM118 does not apply: safe_open is not a dict
        metrics = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["receivers"] = tuple(meta.get("receivers", ()))
    return Scan(metrics=metrics, **meta)
