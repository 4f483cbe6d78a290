"""Progress in a log: a line at the start, after the first step (with an ETA), every interval,
and at the end; a tqdm bar on a terminal; nothing when asked for none."""

import io
import sys

import pytest
from tqdm.auto import tqdm

from cdist import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_the_size_an_eta_periodic_lines_and_the_end():
    out, clock = io.StringIO(), Clock()
    bar = progress.LogProgress(100, "path patching", unit="pass", every=30, stream=out,
                               clock=clock)
    clock.now = 2.0
    bar.update()  # the first step is timed: 2 s a pass, 99 to go
    for _ in range(9):
        clock.now += 2.0
        bar.update()  # 20 s in, 18 after the last line: none yet
    clock.now = 33.0
    bar.set_postfix(ce="0.512")
    bar.update()
    bar.close()
    bar.close()  # once
    lines = out.getvalue().splitlines()
    assert lines == [
        "path patching: 100 passes",
        "path patching: 1/100 passes, 2 s, about 3 min 18 s left",
        "path patching: 11/100 passes, 33 s, about 4 min 27 s left (ce 0.512)",
        "path patching: done, 11/100 passes, 33 s, about 4 min 27 s left (ce 0.512)",
    ]


def test_a_log_says_stopped_not_done_when_the_work_raised():
    """A scan interrupted at pass 67 of 189 said "done, 67/189 passes" before."""
    out, clock = io.StringIO(), Clock()
    with pytest.raises(KeyboardInterrupt):
        with progress.LogProgress(189, "mean-ablation scan", unit="pass", stream=out,
                                  clock=clock) as bar:
            clock.now = 18.0
            bar.update(67)
            raise KeyboardInterrupt
    assert out.getvalue().splitlines()[-1] == "mean-ablation scan: stopped, 67/189 passes, 18 s"


def test_durations_read_as_people_read_them():
    assert [progress.duration(s) for s in (0.4, 42, 185, 7620)] == [
        "0 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_a_terminal_gets_tqdm_and_no_progress_gets_nothing(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    terminal = progress.bar(5, "distill")
    assert isinstance(terminal, tqdm)
    terminal.close()
    quiet = progress.bar(5, "distill", enabled=False)
    quiet.update()
    quiet.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    logged = progress.bar(5, "distill", initial=2)
    assert isinstance(logged, progress.LogProgress)
    logged.close()
    assert "distill: 5 steps, from 2" in capsys.readouterr().err


def test_units_take_their_plural():
    for unit, plural in (("step", "4 steps"), ("pass", "4 passes"), ("batch", "4 batches")):
        out = io.StringIO()
        progress.LogProgress(4, "scan", unit=unit, stream=out)
        assert out.getvalue() == f"scan: {plural}\n"


def test_a_bar_is_drawn_on_a_terminal_that_reports_no_width():
    """A pseudo-terminal nobody gave a size reports 0 columns, on which tqdm alone draws nothing."""
    import os
    import pty
    import subprocess
    import sys
    from pathlib import Path

    main, side = pty.openpty()  # a new pty's size is 0 x 0
    assert os.get_terminal_size(side).columns == 0
    code = "from cdist.progress import bar\nb = bar(3, 'scan')\nb.update(3)\nb.close()\n"
    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-c", code], stderr=side, check=True, timeout=120,
                   env=os.environ | {"PYTHONPATH": str(root)})
    os.close(side)
    drawn = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the pty's other side is closed: all read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(main)
    assert b"scan" in drawn and b"3/3" in drawn, drawn


def test_a_log_hears_from_a_step_that_outlasts_its_interval():
    """A step still running after ``every`` seconds prints the status (no ETA before one is
    timed); a beat sooner prints nothing."""
    out, clock = io.StringIO(), Clock()
    bar = progress.LogProgress(4, "head maps", unit="part", every=30, stream=out, clock=clock)
    clock.now = 20.0
    bar.beat()
    clock.now = 31.0
    bar.beat()
    clock.now = 45.0
    bar.beat()  # 14 s after the last line
    bar.close()
    bar.beat()  # closed: quiet
    assert out.getvalue().splitlines() == [
        "head maps: 4 parts",
        "head maps: 0/4 parts, 31 s",
        "head maps: done, 0/4 parts, 45 s",
    ]


def test_the_heartbeat_runs_by_itself_and_stops_with_the_bar(monkeypatch, capsys):
    import time

    monkeypatch.setattr(progress, "EVERY", 0.05)
    monkeypatch.setattr(progress, "HEARTBEAT", 0.01)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress.bar(2, "scan", unit="pass")
    time.sleep(0.5)  # one long step, no update
    bar.close()
    logged = capsys.readouterr().err.splitlines()
    beats = [line for line in logged if line.startswith("scan: 0/2 passes")]
    assert len(beats) >= 3, logged
    assert logged[-1].startswith("scan: done")
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # the heartbeat stopped with the bar


def test_a_terminal_bar_is_redrawn_while_a_step_runs(monkeypatch, capsys):
    import time

    monkeypatch.setattr(progress, "HEARTBEAT", 0.02)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress.bar(2, "scan", unit="pass")
    drawn_at_start = capsys.readouterr().err.count("scan")
    time.sleep(0.5)
    bar.close()
    assert drawn_at_start >= 1
    assert capsys.readouterr().err.count("scan") >= 5


def test_a_phase_says_how_long_it_has_run_and_when_it_ends(monkeypatch, capsys):
    import time

    monkeypatch.setattr(progress, "EVERY", 0.05)
    monkeypatch.setattr(progress, "HEARTBEAT", 0.01)
    monkeypatch.setattr(progress, "PHASE_DELAY", 0.05)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with progress.phase("loading the teacher"):
        time.sleep(0.3)
    logged = capsys.readouterr().err.splitlines()
    assert len(logged) >= 3 and all(line == "loading the teacher: 0 s so far"
                                    for line in logged[:-1]), logged
    assert logged[-1] == "loading the teacher: done in 0 s"
    try:
        with progress.phase("evaluation"):
            time.sleep(0.1)
            raise KeyError("stopped")
    except KeyError:
        pass
    assert "done" not in capsys.readouterr().err  # a phase that failed did not end
    with progress.phase("quiet", enabled=False):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_a_short_phase_prints_nothing(monkeypatch, capsys):
    """A zoo model loads in well under PHASE_DELAY: no line, so that a refusal right after it is
    still the one line on stderr."""
    for terminal in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda t=terminal: t, raising=False)
        with progress.phase("loading the student"):
            pass
        assert capsys.readouterr().err == ""


def test_a_phase_on_a_terminal_is_one_line_whose_clock_moves(monkeypatch, capsys):
    import time

    monkeypatch.setattr(progress, "HEARTBEAT", 0.01)
    monkeypatch.setattr(progress, "PHASE_DELAY", 0.05)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress.phase("head means"):
        time.sleep(0.3)
    drawn = capsys.readouterr().err
    assert drawn.count("\n") == 1 and drawn.endswith("head means: done in 0 s\x1b[K\n")
    assert drawn.count("\rhead means: 0 s\x1b[K") >= 3, drawn


def test_a_bar_left_by_an_exception_stops_its_heartbeat(monkeypatch, capsys):
    """The library opens every bar in a ``with`` (tests/test_code_shape.py): work that raises (a
    scan interrupted in a notebook) must not leave a thread printing for good."""
    import threading

    monkeypatch.setattr(progress, "HEARTBEAT", 0.01)
    for terminal in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda t=terminal: t, raising=False)
        try:
            with progress.bar(3, "scan", unit="pass"):
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        assert not [t for t in threading.enumerate() if t.name == "cdist-progress"]
    capsys.readouterr()
