"""Which code, weights and items produced a result: the git commit (and whether the tree had
uncommitted changes), and fingerprints that tell a saved result of the same model and items from one
of others."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """``<sha>`` of HEAD, with ``+dirty`` when tracked files differ from it; ``unknown`` outside a
    checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def items_fingerprint(data) -> list:
    """How many items, and a hash of their token ids and answers."""
    ids = [[int(t) for t in row] for row in data["input_ids"]]
    digest = hashlib.sha256(json.dumps([ids, [int(a) for a in data["answer_id"]]]).encode())
    return [len(data), digest.hexdigest()]


def model_fingerprint(model: torch.nn.Module) -> list[float]:
    """Two sums over all weights, in float64: equal for the same model, apart for almost any
    other."""
    with torch.no_grad():
        total = sum(p.double().sum() for p in model.parameters())
        squares = sum(p.double().square().sum() for p in model.parameters())
    return [round(float(total), 6), round(float(squares), 6)]
