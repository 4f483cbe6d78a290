"""Draw the project's figures from saved results (HTML and PNG under figures/).

    python experiments/figures.py discovery  # results/discovery/scores/*.json -> figures/discovery/

One layer x head heatmap per model and score: the mean-ablation drops (the mean-ablation circuit
outlined), activation patching and its attribution estimate (the task's own circuit outlined: path
patching for entity tracking), and the path-patching score of each entity-tracking group (that
group's heads outlined).
"""

import argparse
import json
from pathlib import Path

import torch

from cdist import plots
from cdist.types import Circuit

# score name -> (colour-bar label, diverging scale)
LABELS = {
    "ablation_prob_drop": ("answer probability drop when mean-ablated (+ = needed)", True),
    "ablation_accuracy_drop": ("accuracy drop when mean-ablated (+ = needed)", True),
    "activation_patching_prob_change": ("answer probability change, z from the corrupt run", True),
    "attribution_patching_prob_change": ("attribution estimate of that change", True),
}

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("what", choices=["discovery"], help="which figures")
parser.add_argument("--results", default="results/discovery",
                    help="folder written by experiments/discovery.py")
parser.add_argument("--out", default="figures/discovery", help="output folder")
args = parser.parse_args()

files = sorted(Path(args.results, "scores").glob("*.json"))
if not files:
    parser.error(f"no scores in {args.results}/scores; run python experiments/discovery.py first")
for path in files:
    saved = json.loads(path.read_text())
    name = saved["model"]
    circuits = {method: Circuit.from_dict(c) for method, c in saved["circuits"].items()}
    own = next(iter(circuits.values()))  # the task's own method comes first
    for key, values in saved["scores"].items():
        if key.startswith("path_patching_"):
            group, found = key.removeprefix("path_patching_"), circuits["path_patching"]
            label = (f"relative change of p(answer), senders at {found.positions[group]} "
                     "(- = important)")
            marked = found.groups[group]
            title = f"{name}: path patching, {group.replace('_', ' ')}s"
        else:
            label, _ = LABELS[key]
            circuit = circuits["mean_ablation"] if key.startswith("ablation_") else own
            marked, title = circuit.heads, f"{name}: {key.replace('_', ' ')}"
        fig = plots.head_heatmap(torch.tensor(values), title=title, colorbar=label, marked=marked)
        written = plots.save_figure(fig, Path(args.out) / f"{name}-{key}")
        print(" ".join(str(p) for p in written))
