"""One process at a time in an output folder, checked before anything is written there.

``claim(folder, identity)`` is what every step that writes a run folder (an experiment's, a
distillation's) does first:

1. the folder is cdist's (``check_owned``): new, empty, or made by cdist, which marks every run
   folder it makes with ``.cdist-run`` (``RUN_MARKER``; a folder inside a marked one, such as a
   trained run's ``runs/n128/<arm>-seed0``, is the run folder's too); a folder of the user's is
   refused before anything is written there, so that cdist never rewrites or deletes a file it
   did not make (and a step's settings are never read from the user's own ``config.yaml``). A
   run folder made before the marker existed is known by what only cdist writes there: its lock
   ``.cdist.lock``, ``identity.json``, or a ``config.yaml`` that opens with cdist's header (the
   repository's committed results, whose locks git ignores, carry the marker);
2. the folder can be made and written (not a file, not under a file, not read-only), which is
   tried with a probe file, so that no training starts that could not save its result;
3. no other process holds it (an advisory ``flock`` on ``.cdist.lock``, released when the process
   ends, even by SIGKILL);
4. temporary files that a killed process left behind (``.cdist-tmp-*``, from
   ``cdist.checkpoints``) are removed: with the lock held no one else is writing them. Only those:
   a file of the user's that merely looks temporary (``notes.tmp``) stays;
5. the folder was made for the same inputs: ``identity.json`` records what defines its results
   (models, task, item sets, discovery rules), and a folder made for others is refused, naming the
   settings that differ, rather than mixing two experiments' results;
6. once a model is loaded, its weights are those the folder's results were made with
   (``check_models``: a checkpoint rebuilt at the same path is refused, not trained over).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from cdist.checkpoints import TMP_PREFIX, atomic_write_json, atomic_write_text, is_follower
from cdist.errors import RunFolderError

__all__ = ["RUN_MARKER", "Claim", "check_models", "check_owned", "check_writable", "claim",
           "claim_figures", "held", "made_by_cdist", "release_all"]

RUN_MARKER = ".cdist-run"
_MARKER_TEXT = ("This folder was made by cdist, which writes only into folders that hold this file "
                "(or none at all).\n")
# What only cdist writes in a run folder, by which one made before RUN_MARKER is known
_EARLIER_SIGNS = (".cdist.lock", "identity.json")
_SETTINGS_HEADER = "# cdist run folder settings"


class Claim:
    """A held folder; ``release()`` (or the end of the process) lets another process in. Claiming a
    folder this process already holds returns the same claim, counted, so that nested steps (a
    table that runs distillations) share it."""

    def __init__(self, folder: Path, fd: int):
        self.folder, self._fd, self.count = folder, fd, 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0 and self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            _HELD.pop(self.folder, None)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[Path, Claim] = {}


def held() -> list[Path]:
    """The folders this process holds now."""
    return list(_HELD)


def release_all() -> None:
    """Let go of every folder this process holds (the end of a command run in-process)."""
    for held in list(_HELD.values()):
        held.count = 1
        held.release()


def check_writable(path: str | Path, *, file: bool = False) -> Path:
    """Refuse, without making or writing anything, an output folder (or, with ``file``, an output
    file) that could not be written: one under a file, a folder that is a file or the reverse, or
    a nearest existing folder this process may not write. ``RunFolderError`` names it."""
    path = Path(path)
    kind = "file" if file else "folder"
    if path.is_dir() if file else (path.exists() and not path.is_dir()):
        raise RunFolderError(f"{path} is a {'folder, not a file' if file else 'file, not a folder'}"
                             f"; choose another output {kind}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"{path}: {parent} is a file, not a folder; choose another "
                                 f"output {kind}")
        if parent.exists():
            break
    nearest = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise RunFolderError(f"{path} cannot be written ({nearest} is read-only for this user); "
                             f"choose a {kind} you can write to")
    return path


def made_by_cdist(folder: str | Path) -> bool:
    """Whether ``folder`` is a run folder cdist made (module doc, 1): it, or a folder it is in,
    holds ``RUN_MARKER``, or it holds what only an earlier cdist wrote there. Reads nothing but
    listings and the first line of its ``config.yaml``."""
    folder = Path(folder).absolute()
    if any((f / RUN_MARKER).is_file() for f in (folder, *folder.parents)):
        return True  # a run folder's own subfolders (runs/, cache/) are cdist's too
    if any((folder / name).exists() for name in _EARLIER_SIGNS):
        return True
    try:
        with open(folder / "config.yaml") as f:
            return f.readline().startswith(_SETTINGS_HEADER)
    except (OSError, UnicodeDecodeError):
        return False  # none, or not text: not cdist's


def check_owned(folder: str | Path) -> Path:
    """``folder``, refused (``RunFolderError``) when it exists, is not empty and cdist did not
    make it (``made_by_cdist``)."""
    folder = Path(folder)
    if not folder.is_dir() or made_by_cdist(folder):
        return folder
    theirs = sorted(p.name for p in folder.iterdir())
    if theirs:
        raise RunFolderError(f"{folder} is not a run folder cdist made (it holds "
                             f"{', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}); "
                             "cdist writes only into a new or empty folder or one it made: choose "
                             "another output folder")
    return folder


def claim_figures(folder: str | Path) -> Path:
    """A figures folder (``--figures``) checked as a run folder is (``check_writable``,
    ``check_owned``: new, empty or made by cdist, so that a figure never replaces a user's file of
    the same name; one with cdist's ``plotly.min.js`` beside its figures was drawn by a cdist
    from before the marker) and marked as cdist's, so that the next drawing into it is accepted.
    No lock: figures are written whole and atomically, and the last drawing wins."""
    folder = check_writable(folder)
    if not (folder / "plotly.min.js").is_file():  # figures an earlier cdist drew, unmarked
        check_owned(folder)
    if is_follower():
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not made_by_cdist(folder):
            atomic_write_text(_MARKER_TEXT, folder / RUN_MARKER)
    except OSError as e:
        raise RunFolderError(f"{folder} cannot be written ({e.strerror}); choose a folder you "
                             "can write to") from None
    return folder


def claim(folder: str | Path, identity: dict | None = None) -> Claim:
    """Check and hold ``folder`` for this process (module doc); raises ``RunFolderError``. Under
    ``torchrun`` only rank 0 holds it (the ranks are one run, and only rank 0 writes)."""
    folder = check_owned(check_writable(folder))
    if is_follower():
        return Claim(folder.resolve(), None)
    key = folder.resolve()
    if key in _HELD:
        if identity is not None:
            _check_identity(folder, identity)
        _HELD[key].count += 1
        return _HELD[key]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cdist-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"{folder} cannot be written ({e.strerror}); choose a folder you "
                             "can write to") from None
    fd = os.open(folder / ".cdist.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(f"{folder} is in use by {holder}; wait for it to end or choose "
                             "another output folder") from None
    held = _HELD[key] = Claim(key, fd)
    try:
        for tmp in list(folder.rglob(f"{TMP_PREFIX}*")):  # listed first: dirs go
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        if identity is not None:
            _check_identity(folder, identity)
        if not (folder / RUN_MARKER).is_file():
            atomic_write_text(_MARKER_TEXT, folder / RUN_MARKER)
    except BaseException:
        held.release()
        raise
    # who holds it, for the message above; once the folder is accepted, so a refusal changes nothing
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} ({shlex.join(sys.argv)[:300]})".encode(), 0)
    return held


def _saved_identity(path: Path) -> dict:
    """A folder's ``identity.json`` ({} where there is none yet)."""
    try:
        saved = json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        raise RunFolderError(f"{path} is not valid JSON (edited or damaged); restore it or choose "
                             "another output folder") from None
    if saved is not None and not isinstance(saved, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(saved), "a number")
        raise RunFolderError(f"{path} holds {kind}, not a run folder's identity (edited or "
                             "damaged); restore it or choose another output folder")
    return saved or {}


def _differences(key: str, there, now):
    """(name, there, now) for each setting that differs, a record's fields by their own names
    (``discovery.min_effect``) rather than the whole record."""
    if isinstance(there, dict) and isinstance(now, dict):
        return [d for k in sorted(set(there) | set(now)) if there.get(k) != now.get(k)
                for d in _differences(f"{key}.{k}", there.get(k), now.get(k))]
    return [(key, there, now)]


def _check_identity(folder: Path, identity: dict) -> None:
    path = folder / "identity.json"
    identity = json.loads(json.dumps(identity))  # tuples as lists, as they will be read back
    saved = _saved_identity(path)
    # None is "not fixed yet" (a teacher discovered alone names no student): either side fills it
    differ = sorted(k for k in set(saved) | set(identity)
                    if None not in (saved.get(k), identity.get(k)) and saved[k] != identity[k])
    if differ:
        what = "; ".join(f"{name}: {a!r} there, {b!r} now" for k in differ
                         for name, a, b in _differences(k, saved.get(k), identity.get(k)))
        raise RunFolderError(f"{folder} holds results made with other settings ({what}); "
                             "keep the folder's settings (leave those flags out), or write to "
                             "another folder (--out)")
    merged = {k: identity.get(k) if saved.get(k) is None else saved[k]
              for k in set(saved) | set(identity)}
    if merged != saved:
        atomic_write_json(merged, path)


def check_models(folder: str | Path, fingerprints: dict[str, str]) -> None:
    """Refuse models whose weights differ from those ``folder``'s results were made with (their
    fingerprints, ``cdist.store.model_fingerprint``, kept in ``identity.json`` under
    ``"models"``); record those not yet kept. Call it with the folder claimed.

    Raises:
        RunFolderError: naming the role and both fingerprints.
    """
    folder = Path(folder)
    path = folder / "identity.json"
    saved = _saved_identity(path)
    kept = dict(saved.get("models") or {})
    for role, fingerprint in fingerprints.items():
        if kept.get(role, fingerprint) != fingerprint:
            raise RunFolderError(
                f"{folder} holds results made with another {role} (weights' fingerprint "
                f"{kept[role][:12]}... there, {fingerprint[:12]}... now: was the checkpoint "
                "rebuilt?); choose another output folder, or delete it to start again")
    kept |= fingerprints
    if kept != saved.get("models"):
        atomic_write_json(saved | {"models": kept}, path)
