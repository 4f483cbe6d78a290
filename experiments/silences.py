"""How long a command stays silent: run it, time every line it prints, report the longest gaps.

    python experiments/silences.py --limit 60 -- cdist distill --out runs/zoo --steps 50
    python experiments/silences.py --terminal --limit 30 -- cdist discover --out runs/zoo

A user watching a long step needs to see it move: a tqdm bar on a terminal, a progress line in a
log (``cdist.progress``). This measures that from outside, on the command as a user runs it. With
``--terminal`` the command runs under a pseudo-terminal, so it draws its bars (each carriage
return of a bar counts as output); without, its output is a pipe, as in a log file. Stdout and
stderr are read together. The report gives the command's wall time, its longest silences with
the line each followed, and whether any exceeded ``--limit``; ``--json`` keeps it, with every
silence over the limit in order and the line before each. The exit status is the command's own if
it failed, else 1 when a silence exceeded the limit, else 0.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--terminal", action="store_true",
                    help="run the command under a pseudo-terminal (its bars drawn)")
parser.add_argument("--limit", type=float, default=60.0, help="seconds of silence allowed")
parser.add_argument("--top", type=int, default=5, help="how many of the longest silences to show")
parser.add_argument("--json", default=None, help="write the report here too")
parser.add_argument("--echo", action="store_true", help="print the command's output as it comes")
parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")


def _chunks(command: list[str], terminal: bool):
    """The command's output as (time, bytes) chunks as they arrive, then its exit status."""
    if terminal:
        leader, follower = pty.openpty()
        # a terminal's size, 120 x 40: a pseudo-terminal starts at 0 x 0, where tqdm draws nothing
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower,
                                stderr=follower, close_fds=True)
        os.close(follower)
        source = leader
    else:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        source = proc.stdout.fileno()
    while True:
        try:
            data = os.read(source, 65536)
        except OSError:  # a pseudo-terminal whose other end closed
            data = b""
        if not data:
            break
        yield time.monotonic(), data
    if terminal:
        os.close(source)
    yield None, proc.wait()


def silences(command: list[str], *, terminal: bool = False, echo: bool = False) -> dict:
    """Run ``command`` and time its output (module doc): each line or bar redraw is an event."""
    start = last = time.monotonic()
    events, partial, status, previous = [], "", None, "(the command's start)"
    for when, data in _chunks(command, terminal):
        if when is None:
            status = data
            break
        text = data.decode(errors="replace")
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()
        pieces = (partial + text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        partial = pieces.pop()
        for line in pieces:
            if line.strip():
                events.append({"at": when - start, "gap": when - last, "line": line.strip(),
                               "after": previous})
                last, previous = when, line.strip()
    end = time.monotonic()
    if partial.strip():
        events.append({"at": end - start, "gap": end - last, "line": partial.strip(),
                       "after": previous})
        last, previous = end, partial.strip()
    tail = {"at": end - start, "gap": end - last, "line": "(the command's end)", "after": previous}
    gaps = sorted(events + [tail], key=lambda e: -e["gap"])
    return {"command": command, "terminal": terminal, "status": status,
            "wall_s": end - start, "lines": len(events), "longest": gaps}


def main() -> int:
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    report = silences(command, terminal=args.terminal, echo=args.echo)
    report["limit_s"] = args.limit
    over = [e for e in report["longest"] if e["gap"] > args.limit]
    report["over_limit"] = len(over)
    where = "a terminal" if args.terminal else "a pipe"
    print(f"{' '.join(command)}\n  on {where}: exit status {report['status']}, "
          f"{report['wall_s']:.1f} s, {report['lines']} lines; the longest silences:")
    for e in report["longest"][:args.top]:
        print(f"  {e['gap']:7.1f} s before t={e['at']:.1f} s: {e['line'][:110]}")
    print(f"  {len(over)} over {args.limit:g} s")
    report["longest"] = report["longest"][:args.top]
    report["over"] = sorted(over, key=lambda e: e["at"])  # every one, in the order they came
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report["status"] or (1 if over else 0)


if __name__ == "__main__":
    sys.exit(main())
