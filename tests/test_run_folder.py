"""Output folders: unwritable ones refused before work starts, one process at a time, orphan
temporary files of cdist's cleared (and nobody else's), and a folder made for other inputs refused,
naming what differs. Folders of the user's are refused in tests/test_catalogue_files.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cdist import run_folder
from cdist.checkpoints import TMP_PREFIX
from cdist.errors import RunFolderError

HOLD = ("import sys, time\n"
        "from cdist import run_folder\n"
        "run_folder.claim(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")


def test_a_file_or_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("mine")
    for bad in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(RunFolderError, match="is a file, not a folder"):
            run_folder.claim(bad)
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match="cannot be written"):
            run_folder.claim(folder)
    finally:
        folder.chmod(0o755)


def test_one_process_at_a_time_and_a_killed_holder_lets_go(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # the message names the holder, for the user to find it
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid} "):
            run_folder.claim(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
    with run_folder.claim(tmp_path) as held:
        assert held.folder == tmp_path.resolve()


def test_the_same_process_shares_its_claim_and_releases_it(tmp_path):
    outer = run_folder.claim(tmp_path)
    inner = run_folder.claim(tmp_path)
    assert inner is outer and outer.count == 2
    inner.release()
    outer.release()
    # released: another process can take it at once
    done = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "held", done.stderr


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    with run_folder.claim(tmp_path):  # made by cdist
        pass
    (tmp_path / "runs").mkdir()
    orphans = [tmp_path / f"{TMP_PREFIX}results.json-abc123.tmp",
               tmp_path / "runs" / f"{TMP_PREFIX}state.pt-x.tmp"]
    for path in orphans:
        path.write_bytes(b"half")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / ".notes.tmp").write_text("the user's, not cdist's")
    with run_folder.claim(tmp_path):
        pass
    assert not any(p.exists() for p in orphans)
    assert (tmp_path / "results.json").read_text() == "{}"
    assert (tmp_path / ".notes.tmp").read_text() == "the user's, not cdist's"


def test_a_folder_made_for_other_inputs_is_refused_naming_what_differs(tmp_path):
    with run_folder.claim(tmp_path, {"teacher": "a", "student": None, "val_items": 24}):
        pass
    # an unset value is filled in, not a conflict
    with run_folder.claim(tmp_path, {"teacher": "a", "student": "b", "val_items": 24}):
        pass
    assert json.loads((tmp_path / "identity.json").read_text())["student"] == "b"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    time.sleep(0.01)
    with pytest.raises(RunFolderError,
                       match=r"val_items: 24 there, 50 now.*another folder \(--out\)") as e:
        run_folder.claim(tmp_path, {"teacher": "a", "student": "b", "val_items": 50})
    assert "\n" not in str(e.value)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    (tmp_path / "identity.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="identity.json is not valid JSON"):
        run_folder.claim(tmp_path, {"teacher": "a"})
