"""The ``cdist`` command: circuit distillation's pipeline, one subcommand a step, every step reading
and writing one run folder (``--out``; ``cdist.cli.common`` says how settings carry from step to
step).

    cdist zoo list                                   # the model organisms and their manifests
    cdist discover --out runs/et                     # the zoo teacher's and student's circuits
    cdist match --out runs/et                        # head maps between the two circuits
    cdist distill --out runs/et --lam 1.0            # one training run (default: CE + Align CKA)
    cdist evaluate --out runs/et                     # full / circuit / random-circuit accuracy
    cdist table --out runs/et --seeds 0 1 2          # Table 1 or 2 (every arm, seeds, statistics)
    cdist report runs/et                             # runs/et/report.html, one page of it all
    cdist export runs/et/runs/n128/circuit_distilled-CE+Align_CKA-seed0 --to students/et
    cdist finetune --model smollm2.gguf --steps 100 --out teachers/smol  # a teacher for a task
    cdist demo                                       # the zoo table and a small distillation

Bad input is one line on stderr and exit status 2 (``CDIST_TRACEBACK=1`` shows the traceback), and
so is a file the system would not let cdist read or write (a full disk, an I/O error), named with
the system's reason. Ctrl-C or SIGTERM stops a command within a moment, anywhere: one line says
what the run folder kept, the exit status is 130 or 143, and the same command resumes
(``cdist.interrupts``).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from cdist import interrupts
from cdist.cli import finetune_command, steps, zoo_commands
from cdist.cli.parser import Formatter, Parser
from cdist.errors import CdistError

__all__ = ["main", "run", "table_script"]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="cdist", description=__doc__.split("\n\n")[0],
               formatter_class=Formatter,
               epilog="\n".join(__doc__.split("\n\n")[1].splitlines()))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in (zoo_commands, steps, finetune_command):
        module.add_parsers(sub)
    return p


def run(argv: list[str] | None = None):
    """Run one command; returns what it made (a table command: the summary). Raises
    ``cdist.errors.CdistError`` for input the user can fix."""
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv[1:]  # the pipeline's steps parse again, over the run folder's settings
    from cdist import run_folder

    try:
        return args.run(args)
    except KeyboardInterrupt as e:
        # named before they are let go: the folders the step held keep what it finished
        raise interrupts.Interrupted(getattr(e, "signum", signal.SIGINT),
                                     run_folder.held()) from None
    finally:
        run_folder.release_all()  # the folders a step held, for the next command in this process


def main(argv: list[str] | None = None) -> int:
    """The console script: ``run``, with input errors as one line and exit status 2, and SIGINT
    or SIGTERM as one line and exit status 130 or 143 (``cdist.interrupts``)."""
    from cdist.checkpoints import is_follower

    follower = is_follower()
    if follower:  # under torchrun every rank runs the command and rank 0 speaks for them
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["cdist", *argv[:2 if argv[:1] == ["zoo"] else 1]])
    try:
        with interrupts.trapped(command, quiet=follower):
            run(argv)
    except KeyboardInterrupt as e:
        if not follower:
            print(interrupts.message(command, e), file=sys.stderr, flush=True)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (CdistError, ValueError, OSError) as e:
        if os.environ.get("CDIST_TRACEBACK"):
            raise
        print(f"cdist: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    """What went wrong, in one line: cdist.errors (and the ValueError of a library check) already
    say it; an OSError that cdist did not name (a full disk while appending to a log, a file that
    cannot be read) is its file and the system's reason."""
    if isinstance(e, OSError) and not isinstance(e, CdistError) and e.strerror:
        where = e.filename if e.filename is not None else "a file"
        fix = ("free some space or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check the path and the disk, then run the command again")
        return f"{where}: {e.strerror}; {fix}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def table_script(task: str, argv: list[str]) -> int:
    """A table script (``experiments/<task>.py``): ``cdist table --task TASK`` into the
    repository's committed ``results/<task>`` and ``figures/`` (a later ``--out`` or ``--figures``
    wins); another ``--task`` is refused, not obeyed."""
    if any(a == "--task" or a.startswith("--task=") for a in argv):
        print(f"cdist: error: this script makes the {task} table; for another task run "
              "cdist table --task NAME", file=sys.stderr)
        return 2
    return main(["table", "--task", task, "--out", f"results/{task}", "--figures", "figures",
                 *argv])


if __name__ == "__main__":
    sys.exit(main())
