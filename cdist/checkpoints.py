"""Atomic writes: a file is either its old version or its complete new one, never half of each.

Every result or checkpoint cdist writes goes through here, so an interrupted run never leaves a
truncated file that a resume would then trust. Under ``torchrun`` only rank 0 writes (the other
ranks compute the same results), unless a writer says otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cdist.errors import FileFormatError


def is_follower() -> bool:
    """Whether this process is a rank other than 0 of a ``torchrun`` launch (``cdist.distributed``):
    those compute what rank 0 computes and write nothing, so no file is written twice at once."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def _atomic(path: Path, write, every_rank: bool = False) -> None:
    if is_follower() and not every_rank:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so that
        # results and report pages are as readable as any other file the user writes
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_file(path: str | Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path`` (a library's own writer: a figure's
    ``savefig``), which is then renamed into place."""
    _atomic(Path(path), write)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    import torch  # here, so that the command line's help needs no torch

    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write text to a temporary file beside ``path``, then rename it into place."""
    atomic_write_bytes(text.encode(), path)


def atomic_write_bytes(data: bytes, path: str | Path, *, every_rank: bool = False) -> None:
    """Write bytes to a temporary file beside ``path``, then rename it into place; a file that
    already holds them is left as it is (a resumed step that finds what it found before changes
    nothing, its times included). ``every_rank``: written under ``torchrun`` by whichever rank
    calls (each its own files), not by rank 0 only."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data), every_rank)


def atomic_write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def read_json(path: str | Path, fix: str = "restore it or delete it"):
    """``path``'s JSON; one that is not JSON (edited, damaged) is a ``FileFormatError`` naming the
    file and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise FileFormatError(f"{path} is not valid JSON ({err}); {fix}") from None


def atomic_directory(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary directory beside ``out_dir`` with ``write(tmp)``, then swap it into
    place.

    ``out_dir`` is always either its old complete contents or the new ones. An existing
    ``out_dir`` is only replaced if it is empty or holds a ``config.json`` (a checkpoint), so a
    wrong path never wipes a folder.
    """
    out_dir = Path(out_dir)
    replaceable = out_dir.is_dir() and (not any(out_dir.iterdir())
                                        or (out_dir / "config.json").exists())
    if out_dir.exists() and not replaceable:
        raise FileExistsError(f"{out_dir} exists and is not a checkpoint directory; "
                              "refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    old = None
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "checkpoint")
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old / "checkpoint", out_dir)  # put the previous checkpoint back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
