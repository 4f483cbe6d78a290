"""Find the task circuit of every zoo model and measure how faithful it is.

    python experiments/discovery.py                         # every zoo model -> results/discovery/
    python experiments/discovery.py --models et-teacher     # one model
    python experiments/figures.py discovery                 # heatmaps of the saved scores
                                                            # -> figures/discovery/

For each model, on three disjoint sets of fresh held-out items (seeds derived from --seed): a
*reference* set for the per-position head means, a *discovery* set that every scan runs on and that
chooses the circuit, and an *evaluation* set, used only to report accuracies.

- Entity tracking: Prakash et al.'s path-patching search (value fetchers -> position transmitters
  -> position detectors -> structure readers), --k heads per group whose relative change is at
  most -(--min-effect).
- Mean-ablation ranking (theory of mind, and a second row for every entity-tracking model: the
  paper's other way to find a student's circuit): heads ranked by their mean-ablation probability
  drop; the circuit is the smallest top-n whose faithfulness on the discovery set reaches --target,
  within --budget of all heads.
- Every model also gets a mean-ablation scan, an activation-patching scan and its
  attribution-patching estimate (with their Spearman rank correlation) for the figures and the
  pre-filter comparison.

Writes results/discovery/{circuits/NAME-METHOD.json, scores/NAME.json, results.json, results.csv,
results.md}, each with the config and the commit that produced it.
"""

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import torch

from cdist import discovery, stats, tasks, zoo
from cdist.checkpoints import atomic_write_json, atomic_write_text
from cdist.cli.common import parse_min_effect
from cdist.discovery import ablation, activation_patching, attribution_patching
from cdist.provenance import git_commit
from cdist.zoo import organisms

# ---------------------------------------------------------------------------- config
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", nargs="*", default=None,
                    help="zoo models (default: every one on disk)")
parser.add_argument("--out", default="results/discovery", help="output folder")
parser.add_argument("--seed", type=int, default=0,
                    help="data seed; the three item sets use seed*3 + 101/102/103")
parser.add_argument("--reference-items", type=int, default=500, help="items for the head means")
parser.add_argument("--discovery-items", type=int, default=200, help="items the scans run on")
parser.add_argument("--eval-items", type=int, default=1000,
                    help="items for the reported accuracies")
parser.add_argument("--k", type=int, default=2,
                    help="entity tracking: heads per path-patching group")
parser.add_argument("--min-effect", type=parse_min_effect, default="noise",
                    help="entity tracking: a head's -relative change must exceed 2 standard "
                         "errors over the items (noise, the default) or this number")
parser.add_argument("--budget", type=float, default=0.2,
                    help="theory of mind: largest circuit, share of heads")
parser.add_argument("--target", type=float, default=0.8,
                    help="theory of mind: faithfulness that ends the growth")
parser.add_argument("--n-random", type=int, default=5, help="random circuits per evaluation")
parser.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
names = args.models or zoo.names()
missing = sorted(set(names) - set(zoo.names()))
if missing:
    parser.error(f"not in the zoo: {missing}; it has {zoo.names()}")
out = Path(args.out)
commit = git_commit()


def as_lists(t: torch.Tensor) -> list:
    return [[round(float(v), 6) for v in row] for row in t]


def summary(result: dict) -> dict:
    keep = ("full_accuracy", "circuit_accuracy", "random_accuracy", "random_accuracies",
            "faithfulness", "random_faithfulness", "faithfulness_above_random", "n_circuit_heads",
            "n_heads")
    return {k: result[k] for k in keep}


# ---------------------------------------------------------------------------- discover, evaluate
rows = []
for name in names:
    model, tokenizer = zoo.load(name)
    cfg = organisms.OrganismConfig.from_dict(zoo.manifest(name)["config"])
    item_sets = {part: organisms.held_out(cfg, tokenizer, n, seed=args.seed * 3 + 101 + i)
                 for i, (part, n) in enumerate([("reference", args.reference_items),
                                                ("discovery", args.discovery_items),
                                                ("eval", args.eval_items)])}
    reference = item_sets["reference"]
    found_on, evaluation = item_sets["discovery"], item_sets["eval"]
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    timings, scores = {}, {}
    t = time.time()
    means = ablation.head_means(model, reference)
    scan = ablation.head_ablation_scan(model, found_on, means=means)
    timings["ablation_scan_s"] = time.time() - t
    scores["ablation_prob_drop"] = scan["prob_drop"]
    scores["ablation_accuracy_drop"] = scan["accuracy_drop"]
    t = time.time()
    act = activation_patching.activation_patching_scan(model, found_on)
    timings["activation_patching_s"] = time.time() - t
    t = time.time()
    attr = attribution_patching.attribution_patching_scan(model, found_on)
    timings["attribution_patching_s"] = time.time() - t
    scores["activation_patching_prob_change"] = act["prob_change"]
    scores["attribution_patching_prob_change"] = attr["prob_change"]
    rho = stats.spearman(act["prob_change"], attr["prob_change"])

    methods = tasks.get_task(cfg.task).discovery_methods
    circuits = {}
    for method in methods:
        t = time.time()
        rule = discovery.DiscoveryConfig(method=method, k=args.k, min_effect=args.min_effect,
                                         budget=args.budget, target=args.target)
        found = discovery.find_circuit(model, cfg.task, found_on, means, rule, model_name=name,
                                       scan=scan, progress=True)
        circuit, selection = found.circuit, found.record
        scores |= {k: s[s.metric] for k, s in found.scans.items() if s.method == "path_patching"}
        timings[f"{method}_search_s"] = time.time() - t
        result = summary(ablation.evaluate_circuit(model, circuit, evaluation, means=means,
                                                   n_random=args.n_random, seed=args.seed))
        row = {"model": name, "task": cfg.task, "method": method, **result,
               "circuit_share": len(circuit.heads) / n_heads,
               "circuit": [str(h) for h in circuit.heads],
               "selection": selection, "attribution_vs_activation_spearman": rho}
        rows.append(row)
        circuits[method] = circuit.to_dict()
        atomic_write_text(circuit.to_json(), out / "circuits" / f"{name}-{method}.json")
        print(f"{name} ({method}): {len(circuit.heads)}/{n_heads} heads {row['circuit']}, "
              f"full {result['full_accuracy']:.3f}, circuit {result['circuit_accuracy']:.3f}, "
              f"random {result['random_accuracy']:.3f}, "
              f"faithfulness {result['faithfulness']:.3f}", flush=True)
    for row in rows[-len(methods):]:
        row |= {k: round(v, 2) for k, v in timings.items()}
    atomic_write_json({"model": name, "commit": commit, "circuits": circuits,
                       "scores": {k: as_lists(v) for k, v in scores.items()}},
                      out / "scores" / f"{name}.json")
    print(f"{name}: attribution ~ activation patching Spearman rho {rho:.2f}", flush=True)

# ---------------------------------------------------------------------------- tables
config = {**vars(args), "models": names}
atomic_write_json({"config": config, "commit": commit, "results": rows}, out / "results.json")
columns = ["model", "task", "method", "n_heads", "n_circuit_heads", "circuit_share",
           "full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness",
           "random_faithfulness", "faithfulness_above_random", "attribution_vs_activation_spearman"]
table = io.StringIO(newline="")
writer = csv.DictWriter(table, fieldnames=columns + ["circuit"], extrasaction="ignore")
writer.writeheader()
for row in rows:
    writer.writerow({**row, "circuit": " ".join(row["circuit"])})
atomic_write_text(table.getvalue(), out / "results.csv")
lines = [
    "# Circuits of the zoo",
    "",
    f"`python experiments/discovery.py {' '.join(sys.argv[1:])}` at commit `{commit}`; "
    f"accuracies on {args.eval_items} fresh held-out items per model (config: results.json).",
    "",
    "| model | method | heads | circuit | share | full | circuit | random | faithfulness "
    "| above random | attribution rho |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    lines.append(f"| {r['model']} | {r['method']} | {r['n_heads']} | {' '.join(r['circuit'])} | "
                 f"{r['circuit_share']:.2f} | "
                 f"{r['full_accuracy']:.3f} | {r['circuit_accuracy']:.3f} | "
                 f"{r['random_accuracy']:.3f} | "
                 f"{r['faithfulness']:.3f} | {r['faithfulness_above_random']:.3f} | "
                 f"{r['attribution_vs_activation_spearman']:.2f} |")
atomic_write_text("\n".join(lines) + "\n", out / "results.md")
print(f"wrote {out}/results.md, results.csv, results.json, circuits/, scores/")
