"""Atomic writes: a file is either its old version or its complete new one, never half of each.

Every result or checkpoint cdist writes goes through here, so an interrupted run never leaves a
truncated file that a resume would then trust. Under ``torchrun`` only rank 0 writes (the other
ranks compute the same results), unless a writer says otherwise.

Our choices:
- A temporary file or folder is named ``.cdist-tmp-NAME-XXXX`` (``TMP_PREFIX``), beside its
  target, so that the orphans of a killed process can be told from anyone else's files: a run
  folder's claim removes those and nothing else (``cdist.run_folder``).
- A write the system refuses (a full disk, a quota, an I/O error) is a ``WriteError`` naming the
  file cdist was writing and the system's reason, not the temporary file's name; the temporary
  file is removed and the old version, if any, stays.
- A checkpoint folder (``atomic_directory``) records the files it holds in ``.cdist-checkpoint``
  (``CHECKPOINT_MARKER``). An existing folder is replaced only if it is empty or holds nothing but
  the files that record names, so a folder of the user's (their notes, their own checkpoint, a
  checkpoint of cdist's they added a file to) is refused, never wiped. A checkpoint written
  before the record existed is refused too (delete it, or give a new folder), except where the
  writer knows its own (the zoo's organisms: ``earlier``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cdist.errors import CdistError, FileFormatError, RunFolderError, WriteError

TMP_PREFIX = ".cdist-tmp-"
CHECKPOINT_MARKER = ".cdist-checkpoint"


def is_follower() -> bool:
    """Whether this process is a rank other than 0 of a ``torchrun`` launch (``cdist.distributed``):
    those compute what rank 0 computes and write nothing, so no file is written twice at once."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def _write_error(err: BaseException, path: str | Path) -> WriteError | None:
    """``err`` as a ``WriteError`` naming ``path`` when the system refused a write (an
    ``OSError``, or a library's error that carries one in its text, as safetensors' Rust writer
    does: "... (os error 28)"); None for any other error."""
    if isinstance(err, CdistError):  # already says what and where
        return None
    number = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if number is None:
        found = re.search(r"\(os error (\d+)\)", str(err))
        number = int(found.group(1)) if found else None
    if number is None:
        return None
    reason = os.strerror(number)
    fix = ("free some space or write elsewhere" if number in (errno.ENOSPC, errno.EDQUOT)
           else "check the disk, then run the command again")
    made = WriteError(f"{path} could not be written ({reason}); {fix}")
    made.errno, made.strerror, made.filename = number, reason, str(path)
    return made


@contextlib.contextmanager
def writing(path: str | Path):
    """Inside it, the system's refusal to write (a full disk, an I/O error) is a ``WriteError``
    naming ``path``; any other error passes as it is."""
    try:
        yield
    except Exception as err:
        failed = _write_error(err, path)
        if failed is None:
            raise
        raise failed from None


def _atomic(path: Path, write, every_rank: bool = False) -> None:
    if is_follower() and not every_rank:
        return
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-",
                                   suffix=".tmp")
    os.close(fd)
    try:
        with writing(path):
            # mkstemp makes the file private (0600); give it the mode a plain open() would, so
            # that results and report pages are as readable as any other file the user writes
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            write(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Sink:
    """A file for ``torch.save`` that keeps the error of a write that failed: torch's zip writer
    reports a full disk only as "unexpected pos", after the write that met it returned short."""

    def __init__(self, f):
        self.f, self.name, self.failed = f, f.name, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.failed = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj, path: str | Path, *, every_rank: bool = False) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place (rank 0's
    alone under ``torchrun``, unless ``every_rank``: each rank's own file)."""
    import torch  # here, so that the command line's help needs no torch

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            try:
                torch.save(obj, sink)
                f.flush()
            except RuntimeError:
                if sink.failed is not None:
                    raise sink.failed from None
                raise

    _atomic(Path(path), save, every_rank)


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


def atomic_write_json(obj, path: str | Path, *, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically; ``sort_keys=False`` keeps each dict's order
    where it carries meaning (a circuit's groups in the order its search found them)."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", path)


def read_json(path: str | Path, fix: str = "restore it or delete it"):
    """``path``'s JSON; one that is not JSON (edited, damaged) is a ``FileFormatError`` naming the
    file and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise FileFormatError(f"{path} is not valid JSON ({err}); {fix}") from None


def check_replaceable(out_dir: str | Path, earlier: Callable[[Path], bool] | None = None
                      ) -> Path:
    """``out_dir``, refused (``RunFolderError``) unless ``atomic_directory`` may write it: it does
    not exist, is an empty folder, or is a checkpoint folder cdist made that holds only the files
    it wrote (module doc); ``earlier(out_dir)``: also one a writer knows as its own from before
    that record existed."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return out_dir
    if not out_dir.is_dir():
        raise RunFolderError(f"{out_dir} is a file, not a folder; give a new folder")
    present = {p.name for p in out_dir.iterdir()} - {CHECKPOINT_MARKER}
    marker = out_dir / CHECKPOINT_MARKER
    try:
        made = set(json.loads(marker.read_text())["files"]) if marker.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        made = None  # an unreadable record vouches for nothing
    if not present or (made is not None and present <= made) or (earlier and earlier(out_dir)):
        return out_dir
    theirs = sorted(present - (made or set()))
    raise RunFolderError(f"{out_dir} holds files cdist did not write ({', '.join(theirs[:3])}"
                         f"{', ...' if len(theirs) > 3 else ''}); cdist replaces only an empty "
                         "folder or a checkpoint of its own: give a new folder")


def atomic_directory(out_dir: str | Path, write: Callable[[Path], None], *,
                     earlier: Callable[[Path], bool] | None = None) -> Path:
    """Fill a fresh temporary directory beside ``out_dir`` with ``write(tmp)``, record the files
    it made (``CHECKPOINT_MARKER``), then swap it into place.

    ``out_dir`` is always either its old complete contents or the new ones. An existing
    ``out_dir`` is replaced only if ``check_replaceable`` allows it (empty, or a checkpoint cdist
    wrote and nobody added to), so a wrong path never wipes a folder.

    Raises:
        RunFolderError: ``out_dir`` holds files cdist did not write.
        WriteError: the disk is full, or another error the system gives while writing.
    """
    out_dir = check_replaceable(out_dir, earlier)
    with writing(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f"{TMP_PREFIX}{out_dir.name}-"))
    old = None
    with writing(out_dir):
        try:
            write(tmp)
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps(
                {"files": files, "note": "written by cdist, which replaces this folder only "
                 "while it holds just these files"}, indent=1) + "\n")
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(dir=out_dir.parent,
                                            prefix=f"{TMP_PREFIX}{out_dir.name}-old-"))
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
