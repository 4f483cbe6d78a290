"""README.md's code runs as written (issue 29).

Every fenced ```python block of README.md runs in a fresh namespace, with a temporary folder as
the working directory, so whatever it writes (`runs/`, `scan.html`, a cache) stays out of the
repository.
Blocks that take long use small sizes in the README itself and say so in a comment (as the
"stage by stage" block does with `steps=12`). Every ```bash block runs too, if it is in `RUN_BASH`
(with `cdist` and `python` the ones under test).

A block that does not run here carries a mark, an HTML comment on the line right before its opening
fence that gives the reason:

- `<!-- not run: REASON -->`: it needs what no machine of this project has (Llama-3 weights, a GPU,
  several GPUs);
- `<!-- long: ~N min (WHAT) -->` (shell blocks only): it runs longer than a test may; the time is
  the README's own measurement (or `hours`).

A block that is neither runnable nor marked fails `test_every_block_runs_or_says_why`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The shell blocks this test runs (their text, stripped): short, and they write nothing.
RUN_BASH = {
    "cdist zoo list                                 # lists the zoo with its manifests",
}

NOT_RUN = re.compile(r"<!-- not run: (?P<reason>.*?) -->")
LONG = re.compile(r"<!-- long: (?P<reason>~?\d[\d.,]* ?(s|min|h)\b.*?|hours\b.*?) -->")


@dataclass(frozen=True)
class Block:
    """One fenced code block of README.md."""

    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    mark: str  # the HTML comment right before the fence, or ""

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with a language, in order."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = lines[i - 1].strip() if i else ""
        mark = before if before.startswith("<!--") else ""
        blocks.append(Block(fence[1], "\n".join(lines[i + 1:end]) + "\n", i + 1, mark))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python" and not b.mark]
BASH = [b for b in BLOCKS if b.lang == "bash" and not b.mark]


def why_not_run(block: Block) -> str | None:
    """The problem with a block that neither runs nor says why, else None."""
    if block.lang not in ("python", "bash"):
        return None  # output shown, not code
    if not block.mark:
        if block.lang == "bash" and block.code.strip() not in RUN_BASH:
            return "a shell block that is neither in RUN_BASH nor marked long / not run"
        return None
    for pattern in (NOT_RUN, LONG) if block.lang == "bash" else (NOT_RUN,):
        m = pattern.fullmatch(block.mark)
        if m and m["reason"].strip():
            return None
    return f"its mark {block.mark!r} is none of {NOT_RUN.pattern} / {LONG.pattern} with a reason"


def test_every_block_runs_or_says_why():
    assert PYTHON and BASH, "the README's runnable blocks were not found"
    problems = [f"{b}: {why}" for b in BLOCKS if (why := why_not_run(b))]
    assert not problems, "\n".join(problems)
    assert {b.code.strip() for b in BASH} == RUN_BASH, "RUN_BASH names a block the README lacks"


def test_marks_are_checked():
    """The check above refuses an unmarked unknown shell block and a mark without a reason."""
    assert why_not_run(Block("bash", "make everything\n", 1, ""))
    assert why_not_run(Block("python", "x = 1\n", 1, "<!-- not run:  -->"))
    assert why_not_run(Block("python", "x = 1\n", 1, "<!-- long: ~3 min -->"))
    assert why_not_run(Block("bash", "x\n", 1, "<!-- long: soon -->"))
    assert not why_not_run(Block("bash", "x\n", 1, "<!-- long: ~3 min (x) -->"))
    assert not why_not_run(Block("python", "x\n", 1, "<!-- not run: needs a GPU -->"))


def _env() -> dict[str, str]:
    """This checkout's cdist first on the path, the way a user's shell has it after install."""
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_runs(block, tmp_path):
    """In a fresh interpreter, as a user runs it (so without the suite's runtime type checker)."""
    done = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block} failed:\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("block", BASH, ids=str)
def test_bash_block_runs(block, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = f'"{sys.executable}"'
    for name, target in (("cdist", f"{python} -m cdist.cli"), ("python", python)):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), f"{block} printed nothing"
