"""The circuits of the zoo (``cdist zoo circuits``): each model's task circuit by every method its
task allows, how faithful it is, and the scans it was read from.

For each model, on three disjoint sets of fresh held-out items (seeds ``seed*3 + 101/102/103``): a
*reference* set for the per-position head means, a *discovery* set that every scan runs on and that
chooses the circuit, and an *evaluation* set, used only to report accuracies.

- Entity tracking: Prakash et al.'s path-patching search (value fetchers -> position transmitters
  -> position detectors -> structure readers), ``k`` heads per group whose relative change clears
  ``min_effect``.
- Mean-ablation ranking (theory of mind, and a second row for every entity-tracking model: the
  paper's other way to find a student's circuit): heads ranked by their mean-ablation probability
  drop; the circuit is the smallest top-n whose faithfulness on the discovery set reaches
  ``target``, within ``budget`` of all heads.
- Every model also gets a mean-ablation scan, an activation-patching scan and its
  attribution-patching estimate (with their Spearman rank correlation), for the figures and the
  pre-filter comparison.

``survey`` writes ``OUT/{circuits/NAME-METHOD.json, scores/NAME.json, results.json, results.csv,
results.md}``, each with the config and the commit; ``draw`` turns ``OUT/scores`` into heatmaps.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cdist import discovery, plots, stats, tasks, zoo
from cdist.checkpoints import atomic_write_json, atomic_write_text, read_json
from cdist.discovery import ablation, activation_patching, attribution_patching, circuit_eval
from cdist.errors import ConfigError
from cdist.progress import say
from cdist.provenance import git_commit
from cdist.records import write_record
from cdist.types import Circuit
from cdist.zoo import organisms

__all__ = ["SurveyConfig", "draw", "survey"]

_KEEP = ("full_accuracy", "circuit_accuracy", "random_accuracy", "random_accuracies",
         "faithfulness", "random_faithfulness", "faithfulness_above_random", "n_circuit_heads",
         "n_heads")
_COLUMNS = ["model", "task", "method", "n_heads", "n_circuit_heads", "circuit_share",
            "full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness",
            "random_faithfulness", "faithfulness_above_random",
            "attribution_vs_activation_spearman"]

# score name -> colour-bar label
_LABELS = {
    "ablation_prob_drop": "answer probability drop when mean-ablated (+ = needed)",
    "ablation_accuracy_drop": "accuracy drop when mean-ablated (+ = needed)",
    "activation_patching_prob_change": "answer probability change, z from the corrupt run",
    "attribution_patching_prob_change": "attribution estimate of that change",
}


@dataclass(frozen=True)
class SurveyConfig:
    """How the zoo's circuits are found and scored (written into ``results.json``)."""

    seed: int = 0
    reference_items: int = 500
    discovery_items: int = 200
    eval_items: int = 1000
    k: int = 2
    min_effect: float | str = "noise"
    budget: float = 0.2
    target: float = 0.8
    n_random: int = 5

    def __post_init__(self) -> None:
        for name in ("seed", "reference_items", "discovery_items", "eval_items", "k", "n_random"):
            value, least = getattr(self, name), 0 if name in ("seed", "n_random") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name}={value!r}; give a whole number >= {least}")
        for name in ("budget", "target"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)}; give a fraction in (0, 1]")
        if self.min_effect != "noise" and not (isinstance(self.min_effect, (int, float))
                                               and 0 <= self.min_effect < float("inf")):
            raise ConfigError(f"min_effect={self.min_effect!r}; give a number >= 0 or 'noise'")


def _rounded(t: torch.Tensor) -> list:
    return [[round(float(v), 6) for v in row] for row in t]


def survey_model(name: str, cfg: SurveyConfig, out: Path, commit: str, log=say) -> list[dict]:
    """One zoo model's rows (one per discovery method); writes its circuits and scores."""
    model, tokenizer = zoo.load(name)
    org = organisms.OrganismConfig.from_dict(zoo.manifest(name)["config"])
    reference, found_on, evaluation = (
        organisms.held_out(org, tokenizer, n, seed=cfg.seed * 3 + 101 + i)
        for i, n in enumerate((cfg.reference_items, cfg.discovery_items, cfg.eval_items)))
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

    rows, circuits = [], {}
    for method in tasks.get_task(org.task).discovery_methods:
        t = time.time()
        rule = discovery.DiscoveryConfig(method=method, k=cfg.k, min_effect=cfg.min_effect,
                                         budget=cfg.budget, target=cfg.target)
        found = discovery.find_circuit(model, org.task, found_on, means, rule, model_name=name,
                                       scan=scan, progress=True)
        circuit = found.circuit
        scores |= {k: s[s.metric] for k, s in found.scans.items() if s.method == "path_patching"}
        timings[f"{method}_search_s"] = time.time() - t
        result = circuit_eval.evaluate_circuit(model, circuit, evaluation, means=means,
                                           n_random=cfg.n_random, seed=cfg.seed)
        row = {"model": name, "task": org.task, "method": method,
               **{k: result[k] for k in _KEEP}, "circuit_share": len(circuit.heads) / n_heads,
               "circuit": [str(h) for h in circuit.heads], "selection": found.record,
               "attribution_vs_activation_spearman": rho}
        rows.append(row)
        circuits[method] = circuit.to_dict()
        write_record(circuit, out / "circuits" / f"{name}-{method}.json")
        log(f"{name} ({method}): {len(circuit.heads)}/{n_heads} heads {row['circuit']}, "
            f"full {row['full_accuracy']:.3f}, circuit {row['circuit_accuracy']:.3f}, "
            f"random {row['random_accuracy']:.3f}, faithfulness {row['faithfulness']:.3f}")
    for row in rows:
        row |= {k: round(v, 2) for k, v in timings.items()}
    atomic_write_json({"model": name, "commit": commit, "circuits": circuits,
                       "scores": {k: _rounded(v) for k, v in scores.items()}},
                      out / "scores" / f"{name}.json")
    log(f"{name}: attribution ~ activation patching Spearman rho {rho:.2f}")
    return rows


def survey(names: list[str], cfg: SurveyConfig, out: str | Path, *, command: str = "",
           log=say) -> list[dict]:
    """Every named zoo model's rows (``survey_model``), and the tables: ``results.json`` (with the
    config, command and commit), ``results.csv`` and ``results.md``."""
    from dataclasses import asdict

    out, commit = Path(out), git_commit()
    rows = [row for name in names for row in survey_model(name, cfg, out, commit, log)]
    atomic_write_json({"config": {**asdict(cfg), "models": names}, "command": command,
                       "commit": commit, "results": rows}, out / "results.json")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=_COLUMNS + ["circuit"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "circuit": " ".join(row["circuit"])})
    atomic_write_text(table.getvalue(), out / "results.csv")
    lines = ["# Circuits of the zoo", "",
             f"`{command}` at commit `{commit}`; accuracies on {cfg.eval_items} fresh held-out "
             "items per model (config: results.json).", "",
             "| model | method | heads | circuit | share | full | circuit | random | faithfulness "
             "| above random | attribution rho |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['n_heads']} | {' '.join(r['circuit'])} | "
              f"{r['circuit_share']:.2f} | {r['full_accuracy']:.3f} | "
              f"{r['circuit_accuracy']:.3f} | {r['random_accuracy']:.3f} | "
              f"{r['faithfulness']:.3f} | {r['faithfulness_above_random']:.3f} | "
              f"{r['attribution_vs_activation_spearman']:.2f} |" for r in rows]
    atomic_write_text("\n".join(lines) + "\n", out / "results.md")
    return rows


def draw(results: str | Path, out: str | Path) -> list[Path]:
    """One layer x head heatmap per model and score in ``results/scores``: the mean-ablation drops
    (the mean-ablation circuit outlined), activation patching and its attribution estimate (the
    task's own circuit outlined), and each entity-tracking group's path-patching score (that
    group's heads outlined)."""

    written = []
    for path in sorted(Path(results, "scores").glob("*.json")):
        saved = read_json(path, "delete it and run cdist zoo circuits again")
        name = saved["model"]
        circuits = {method: Circuit.from_dict(c) for method, c in saved["circuits"].items()}
        own = next(iter(circuits.values()))  # the task's own method comes first
        # a search's groups share one colour scale (plots.shared_scale)
        groups = [abs(v) for k, vs in saved["scores"].items() if k.startswith("path_patching_")
                  for row in vs for v in row]
        search_scale = max(groups) if groups and max(groups) > 0 else None
        for key, values in saved["scores"].items():
            if key.startswith("path_patching_"):
                group, found = key.removeprefix("path_patching_"), circuits["path_patching"]
                label = (f"relative change of p(answer), senders at {found.positions[group]} "
                         "(- = important)")
                marked, largest = found.groups[group], search_scale
                title = f"{name}: path patching, {group.replace('_', ' ')}s"
            else:
                label, largest = _LABELS[key], None
                circuit = circuits["mean_ablation"] if key.startswith("ablation_") else own
                marked, title = circuit.heads, f"{name}: {key.replace('_', ' ')}"
            fig = plots.head_heatmap(torch.tensor(values), title=title, colorbar=label,
                                     marked=marked, largest=largest)
            written += plots.save_figure(fig, Path(out) / f"{name}-{key}")
    return written
