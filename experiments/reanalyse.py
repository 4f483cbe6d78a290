"""Re-analyse committed tables with the run as the unit of replication (``cdist.stats.compare``).

    python experiments/reanalyse.py                           # every results/**/per_item.json
    python experiments/reanalyse.py results/entity_tracking   # one table (its folder or file)
    python experiments/reanalyse.py --margin 0.02 --alpha 0.05

For each table, training regime, declared comparison (``cdist.arms.COMPARISONS``, read as a
table's summary reads them: ``cdist.pipeline.comparisons``) and evaluation set: the mean per-seed
accuracy difference with its t interval, p-value, equivalence test and verdict (the primary
reading); Durkalski's clustered McNemar test; the pooled Cochran-Mantel-Haenszel test the shipped
summaries reported (not for reading). Primary: CE + Align CKA vs circuit CE at the smallest regime,
test set; the secondaries are Holm-adjusted as one family per table, the checks uncorrected.
Writes ``reanalysis.json`` beside each ``per_item.json`` and prints a compact table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from cdist import arms
from cdist.checkpoints import atomic_write_json, read_json
from cdist.errors import CdistError, FileFormatError, MissingFileError
from cdist.pipeline.comparisons import compare_arms
from cdist.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
NOTE = ("The shipped tables' seeds shared their training items (a seed changed only the data "
        "order and draws), so per-seed differences understate run-to-run variance: read the "
        "seed-level intervals as too narrow, and the pooled CMH p-values as far too small.")


def find(paths: list[str]) -> list[Path]:
    """The per_item.json files named (a folder or the file itself), or every committed one."""
    if not paths:
        return sorted(ROOT.glob("results/**/per_item.json"))
    found = [Path(p) / "per_item.json" if Path(p).is_dir() else Path(p) for p in paths]
    for f in found:
        if f.name != "per_item.json" or not f.is_file():
            raise MissingFileError(f"{f}: no per_item.json there; give a table's folder")
    return found


def check(table: dict) -> None:
    """Every run's per-item strings are 0/1 and as long as their evaluation set."""
    for run in table["runs"]:
        for name, text in {"test": run["test_full"], **run["ood"]}.items():
            n = table["eval_sets"][name]
            if len(text) != n or set(text) - {"0", "1"}:
                raise FileFormatError(f"{run['arm']}, seed {run['seed']}, {name}: expected {n} "
                                      f"characters of 0/1, got {len(text)}")


def clean(x):
    """JSON without NaN: an undefined number is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x


def show(folder: str, entries: list[dict]) -> str:
    """The compact table: one line per entry."""
    short = {n: n.replace("circuit distilled, ", "").replace("positive control, ", "pos. ")
             for e in entries for n in (e["a"], e["b"])}
    head = ("comparison", "set", "mean diff", "95% CI", "p seed", "p clust", "p CMH", "p Holm",
            "verdict (Holm)")
    rows = [head]
    for e in entries:
        s, ci = e["seed_level"], e["seed_level"]["ci"]
        rows.append((f"{e['regime']} {short[e['a']]} vs {short[e['b']]}", e["set"],
                     f"{s['mean']:+.4f}", f"[{ci[0]:+.4f}, {ci[1]:+.4f}]", f"{s['p_value']:.3g}",
                     f"{e['clustered']['p_value']:.3g}", f"{e['pooled_cmh']['p_value']:.3g}",
                     f"{e['holm_p']:.3g}" if "holm_p" in e else e["role"],
                     e.get("holm_verdict", s["verdict"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    seeds = sorted({len(e["seeds"]) for e in entries})
    return "\n".join([f"{folder} (seeds per arm: {seeds})", *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", help="table folders (default: every committed one)")
    parser.add_argument("--margin", type=float, default=0.02, help="equivalence margin")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of every test")
    args = parser.parse_args(argv)
    # ----------------------------------------------------------------------------------------
    commit = git_commit()  # before anything is written, so the record is not "+dirty"
    try:
        files = find(args.tables)
        for f in files:
            try:
                table = read_json(f)
                check(table)
                entries = compare_arms(table["runs"], margin=args.margin, alpha=args.alpha)
            except (KeyError, TypeError) as err:
                raise FileFormatError(f"{f}: not a table's per_item.json ({err!r})") from None
            try:
                folder = str(f.parent.resolve().relative_to(ROOT))
            except ValueError:
                folder = str(f.parent)
            # --------------------------------------------------------------------------------
            atomic_write_json(clean({"folder": folder, "commit": commit,
                                     "margin": args.margin, "alpha": args.alpha, "note": NOTE,
                                     "primary": {"a": arms.PRIMARY[0], "b": arms.PRIMARY[1],
                                                 "set": "test", "regime": "smallest"},
                                     "comparisons": entries}), f.parent / "reanalysis.json")
            print(show(folder, entries), end="\n\n")
    except CdistError as err:
        print(f"reanalyse: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
