"""The golden table: a small zoo table (one seed, 12 steps, every default arm, every selectable
matcher), so that a change of structure is held to the same numbers bit for bit
(``tests/test_golden.py``).

Re-record it only when a change is *meant* to change the numbers, and say so in the commit:

    python tests/golden.py tests/data/golden_table.json

Recorded first before the orchestration was rebuilt as stages (issue 27), and again, on purpose,
for issue 28's changes of design: each seed's own training items, selection scored on validation
items, one-to-one matchers among those selection tries, the random control in the aligned map's
shape outside the teacher circuit, the effect floor and the faithfulness check on by default,
exact-integer model fingerprints and the comparisons' statistics. Recorded a third time, numbers
unchanged in meaning, under portable numerics (``cdist.numerics``, which the suite's conftest sets):
on an AVX-512 machine every run of the earlier record came out different in its last bits.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ARGS = ["table", "--task", "entity_tracking", "--seeds", "0", "--regimes", "32", "--steps", "12",
        "--eval-every", "6", "--batch-size", "16", "--lrs", "1e-3", "--lambdas", "1.0",
        "--val-items", "48", "--test-items", "80", "--ood-items", "40", "--reference-items", "80",
        "--discovery-items", "48", "--n-random", "2", "--min-effect", "0", "--threads", "1",
        "--device", "cpu"]


def _without_wall_times(x):
    if isinstance(x, dict):
        return {k: _without_wall_times(v) for k, v in x.items() if k != "wall_time_s"}
    if isinstance(x, list):
        return [_without_wall_times(v) for v in x]
    return x


def _weights_sha(state_path: Path) -> str:
    """A hash of a run's trained weights (names and exact values), not of the file's layout."""
    weights = torch.load(state_path, weights_only=False, map_location="cpu")["weights"]
    digest = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def record(out: Path) -> dict:
    """What the golden test compares: the summary, the per-item results, and every run's record
    and weights, wall times left out."""
    runs = {}
    for done in sorted(out.glob("*/*/eval.json")) + sorted(out.glob("runs/*/*/eval.json")):
        key = str(done.parent.relative_to(out))
        runs[key] = {"eval": _without_wall_times(json.loads(done.read_text())),
                     "weights_sha256": _weights_sha(done.parent / "state.pt")}
    return {"results": _without_wall_times(json.loads((out / "results.json").read_text())),
            "per_item": json.loads((out / "per_item.json").read_text()), "runs": runs}


def run(out: Path) -> dict:
    from cdist import cli

    cli.run([*ARGS, "--out", str(out / "run"), "--figures", str(out / "figures")])
    return record(out / "run")


if __name__ == "__main__":
    import os
    import tempfile

    from cdist import numerics

    os.environ.update(numerics.PORTABLE)  # as the suite computes (tests/conftest.py)

    with tempfile.TemporaryDirectory() as tmp:
        made = run(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(made, indent=1, sort_keys=True) + "\n")
