"""``experiments/silences.py`` times a command's output: lines on a pipe, bar redraws on a
terminal, and the silence before the command's end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "silences.py"
spec = importlib.util.spec_from_file_location("silences", SCRIPT)
silences = importlib.util.module_from_spec(spec)
spec.loader.exec_module(silences)

# prints a line, is silent 0.6 s, redraws a bar twice (carriage returns), is silent 0.3 s, ends
TALKER = ("import sys, time\n"
          "print('loading', flush=True)\n"
          "time.sleep(0.6)\n"
          "sys.stderr.write('bar 1/2\\r'); sys.stderr.flush(); time.sleep(0.05)\n"
          "sys.stderr.write('bar 2/2\\r\\n'); sys.stderr.flush()\n"
          "time.sleep(0.3)\n")


def test_a_pipe_and_a_terminal_are_timed_line_by_line():
    for terminal in (False, True):
        report = silences.silences([sys.executable, "-c", TALKER], terminal=terminal)
        assert report["status"] == 0 and report["lines"] == 3, report
        longest, *_ = report["longest"]
        assert longest["line"] == "bar 1/2" and longest["gap"] >= 0.55, report
        end = next(e for e in report["longest"] if e["line"] == "(the command's end)")
        assert end["gap"] >= 0.25 and report["wall_s"] >= 0.9


def test_the_command_line_reports_silences_over_the_limit(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", ["silences.py", "--limit", "0.5", "--json", str(out), "--",
                                      sys.executable, "-c", TALKER])
    assert silences.main() == 1
    assert "1 over 0.5 s" in capsys.readouterr().out
    kept = json.loads(out.read_text())
    assert kept["over_limit"] == 1
    # every silence over the limit, with the line that came before it (what was running)
    assert [(e["after"], e["line"]) for e in kept["over"]] == [("loading", "bar 1/2")]
    monkeypatch.setattr(sys, "argv", ["silences.py", "--", sys.executable, "-c", "exit(3)"])
    assert silences.main() == 3


def test_a_terminal_has_a_size_so_tqdm_draws_its_bar():
    code = ("from tqdm import tqdm\n"
            "for _ in tqdm(range(3), desc='scan', mininterval=0): pass\n")
    report = silences.silences([sys.executable, "-c", code], terminal=True)
    assert any(e["line"].startswith("scan: 100%") and "3/3" in e["line"]
               for e in report["longest"]), report
