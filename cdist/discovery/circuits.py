"""From scans to circuits: find a model's task circuit the way the task's own papers do.

- Entity tracking: Prakash et al. 2024's backward path-patching search
  (``cdist.discovery.search``), ``k`` heads per group whose score (relative change by default) is
  at most ``-min_effect`` and at least ``min_share`` of the largest effect of the groups searched
  so far; on the organisms' adjacent form the search also looks for the object binders
  (``search.ET_SEARCH_ADJACENT``). IOI: Wang et al. 2022's search; any other task with named
  positions: ``search.positions_search``.
- Theory of mind (or any task, with ``method="mean_ablation"``): heads ranked by their mean-ablation
  probability drop, as in circuit distillation (Wadhwa et al. 2025); the circuit is the smallest
  top-n whose faithfulness on the discovery items reaches ``target``, with at most ``budget`` of all
  heads (a model that gets nothing right has no defined faithfulness, so its circuit grows to the
  budget). A head whose drop is under ``min_share`` of the largest drop is never taken.

Each method is one function of ``DISCOVERERS``, all with one signature, so a method is added in one
place. Which method and search a task uses by default is its registry entry's
(``cdist.tasks.get_task``). The items a circuit is chosen on must not be the items it is evaluated
on; callers pass separate sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from jaxtyping import Float
from torch import Tensor

from cdist import discovery_names
from cdist.discovery import ablation, faithfulness, metrics, search
from cdist.discovery.selection import MIN_SHARE, NOISE_Z, ranked_circuit, select_heads
from cdist.errors import ConfigError
from cdist.evaluate import accuracy
from cdist.models import HookedTransformer
from cdist.progress import say
from cdist.tasks import get_task
from cdist.types import Circuit, Scan

__all__ = ["DISCOVERERS", "METHODS", "METRIC_NAMES", "MIN_SHARE", "NOISE_Z", "SEARCHES",
           "Discovery", "DiscoveryConfig", "Method", "SearchName", "find_circuit",
           "ranked_circuit", "select_heads"]

# A discovery method's name (``cdist.discovery_names``): "auto" runs the task's own.
Method = Literal["auto", discovery_names.DiscoveryMethod]
# A path-patching search's name (a key of ``search.SEARCHES``): "auto" picks the task's, by the
# items' template.
SearchName = Literal["auto", discovery_names.SearchName]
METHODS: tuple[str, ...] = get_args(Method)
SEARCHES: tuple[str, ...] = get_args(SearchName)
# A scan's metric (``cdist.discovery.metrics``): "auto" takes the task's.
METRIC_NAMES: tuple[str, ...] = ("auto", *metrics.METRICS)


@dataclass(frozen=True)
class DiscoveryConfig:
    """How a circuit is chosen (module doc).

    Attributes:
        method: "auto" (the task's), or a key of ``DISCOVERERS``.
        search: path patching: "auto" (the task's, by the items' template), or a key of
            ``search.SEARCHES``.
        k: path patching: heads per group.
        min_effect: path patching: "noise" (an effect must clear ``NOISE_Z`` standard errors over
            the items) or a number the effect must reach (``select_heads``).
        budget: mean ablation: the largest circuit, as a share of all heads.
        target: mean ablation: the faithfulness on the discovery items that ends the growth.
        prefilter: path patching: exact scans of this many pre-filtered senders per group.
        min_share: every method: a head's effect must be at least this share of the largest
            effect it is measured against (its scan's, and for path patching the earlier groups'
            too; ``select_heads``), so that a head whose effect is practically zero never enters
            a circuit; 0 turns the floor off.
        metric: what the scans read at the answer: "auto" (the task's) or one of
            ``metrics.METRICS``.
    """

    method: Method = "auto"  # "auto" (the task's), or a key of DISCOVERERS
    search: SearchName = "auto"  # path patching: "auto" (the task's), or a key of search.SEARCHES
    k: int = 2
    # "noise": an effect must clear NOISE_Z standard errors over the items (select_heads)
    min_effect: float | str = "noise"
    budget: float = 0.2
    target: float = 0.8
    prefilter: int | None = None  # path patching: exact scans of this many pre-filtered senders
    min_share: float = MIN_SHARE  # a head's effect: at least this share of the largest (0: off)
    metric: str = "auto"  # "auto" (the task's), or one of metrics.METRICS

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ConfigError(f"discovery metric {self.metric!r}; choose from {METRIC_NAMES}")
        if self.method not in METHODS:
            raise ConfigError(f"discovery method {self.method!r}; choose from {METHODS}")
        if self.search not in SEARCHES:
            raise ConfigError(f"path-patching search {self.search!r}; choose from {SEARCHES}")
        bad_effect = (self.min_effect != "noise" if isinstance(self.min_effect, str)
                      else self.min_effect < 0)
        if self.k < 1 or bad_effect:
            raise ConfigError("k >= 1 and min_effect >= 0 (or 'noise') are needed; got "
                              f"k={self.k}, min_effect={self.min_effect!r}")
        if self.prefilter is not None and self.prefilter < 1:
            raise ConfigError(f"prefilter={self.prefilter}; give a number of senders >= 1 or None")
        if not 0 <= self.min_share <= 1:
            raise ConfigError(f"min_share={self.min_share}; give a share of the largest effect "
                              "in [0, 1] (0 turns the floor off)")
        if not 0 < self.budget <= 1 or not self.target >= 0:
            raise ConfigError(f"budget in (0, 1] and target >= 0 are needed; got {self.budget}, "
                              f"{self.target}")

    def method_for(self, task: str) -> str:
        """The method this rule runs on ``task``: ``method``, or the task's own for "auto"."""
        return get_task(task).discovery_method if self.method == "auto" else self.method

    def metric_for(self, task: str) -> str:
        """The metric this rule's scans read on ``task``: ``metric``, or the task's for "auto"."""
        return get_task(task).metric if self.metric == "auto" else self.metric


@dataclass(frozen=True, eq=False)
class Discovery:
    """What ``find_circuit`` found: the circuit, the scans it was chosen from, and how
    it was chosen.

    Attributes:
        circuit: the circuit.
        scans: scan name -> ``Scan`` (``path_patching_<group>`` per searched group, or
            ``mean_ablation``).
        record: the method, its parameters, and for mean ablation the faithfulness on the
            discovery items.
    """

    circuit: Circuit
    scans: dict[str, Scan] = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"circuit": self.circuit.to_dict(), "record": self.record,
                "scans": {name: scan.to_dict() for name, scan in self.scans.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Discovery:
        return cls(Circuit.from_dict(d["circuit"]),
                   {name: Scan.from_dict(s) for name, s in d["scans"].items()}, d["record"])


def find_circuit(
    model: HookedTransformer,
    task: str,
    items,
    means: Float[Tensor, "layer ref_pos head_index d_head"],
    cfg: DiscoveryConfig = DiscoveryConfig(),
    *,
    model_name: str = "",
    scan: Scan | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> Discovery:
    """Find ``model``'s circuit for ``task`` on ``items``.

    Args:
        model: a HookedTransformer.
        task: "entity_tracking" or "theory_of_mind".
        items: the discovery items (with counterfactuals for path patching).
        means: per-position head means from a reference set (``ablation.head_means``).
        cfg: method and selection rule.
        model_name: recorded in the circuit.
        scan: a ``head_ablation_scan`` of ``model`` on ``items`` if already computed.
        checkpoint_dir: path patching saves each finished group there, and the running sums
            of the group in progress, and a later call on the same model and items resumes from
            them (``search.path_patching_circuit``); a mean-ablation scan made here keeps its
            running sums there.
        progress: tqdm bars.

    Returns:
        A ``Discovery``: the circuit, the scans it was chosen from, and a record of the selection.
    """
    return DISCOVERERS[cfg.method_for(task)](
        model, task, items, means, cfg, model_name=model_name, scan=scan,
        checkpoint_dir=checkpoint_dir, progress=progress)


def path_patching_discovery(
    model: HookedTransformer, task: str, items, means: Tensor, cfg: DiscoveryConfig, *,
    model_name: str, scan: Scan | None, checkpoint_dir: str | Path | None, progress: bool,
) -> Discovery:
    """The path-patching search (``search.path_patching_circuit``) named by ``cfg.search``, or the
    task's for the items; ``means`` and ``scan`` are not used. The record keeps the steps, so
    that a search built from the items' positions can be read again."""
    name = get_task(task).search(items) if cfg.search == "auto" else cfg.search
    steps, metric = search.search_steps(name, items), cfg.metric_for(task)
    circuit, groups = search.path_patching_circuit(
        model, items, search=steps, k=cfg.k, min_effect=cfg.min_effect, min_share=cfg.min_share,
        metric=metric, model_name=model_name, prefilter=cfg.prefilter,
        checkpoint_dir=checkpoint_dir, progress=progress)
    return Discovery(circuit, {f"path_patching_{group}": s for group, s in groups.items()},
                     {"method": "path_patching", "search": name, "k": cfg.k,
                      "min_effect": cfg.min_effect, "min_share": cfg.min_share,
                      "prefilter": cfg.prefilter, "metric": metric,
                      "steps": [asdict(step) for step in steps]})


def mean_ablation_discovery(
    model: HookedTransformer, task: str, items, means: Tensor, cfg: DiscoveryConfig, *,
    model_name: str, scan: Scan | None, checkpoint_dir: str | Path | None, progress: bool,
) -> Discovery:
    """The smallest top-n of the mean-ablation ranking (``scan``, or one made here) whose
    faithfulness on ``items`` reaches ``cfg.target``, within ``cfg.budget`` of all heads, found by
    doubling then bisection on the ranked list (``faithfulness.grow_until_faithful``: about
    2 log2(budget) evaluations instead of one per head); with ``progress`` each evaluation is
    said; a scan made here resumes from ``checkpoint_dir``'s ``mean-ablation.partial.pt``."""
    resume = None if checkpoint_dir is None else Path(checkpoint_dir) / "mean-ablation.partial.pt"
    scan = scan if scan is not None else ablation.head_ablation_scan(
        model, items, means=means, metric=cfg.metric_for(task), progress=progress, resume=resume)
    limit = max(1, math.floor(cfg.budget * model.cfg.n_layers * model.cfg.n_heads))
    # the heads that pass the rule, best first: every circuit tried is a prefix of them
    ranked = list(select_heads(scan, limit, 0.0, cfg.min_share))
    full = accuracy(model, items)
    if full > 0:
        n, tried = faithfulness.grow_until_faithful(
            model, [], ranked, items, means, full_accuracy=full, threshold=cfg.target,
            max_heads=limit, log=say if progress else None)
        n = n if n is not None else len(ranked)  # never reached: the whole budget stands
        faith = next((e["faithfulness"] for e in tried if e["added"] == n), math.nan)
    else:  # no faithfulness without a right answer: the circuit grows to the budget
        n, tried, faith = len(ranked), [], math.nan
    circuit = ranked_circuit(scan, max(n, 1), model=model_name, method="mean_ablation",
                             min_share=cfg.min_share)
    return Discovery(circuit, {"mean_ablation": scan},
                     {"method": "mean_ablation", "budget": cfg.budget, "target": cfg.target,
                      "min_share": cfg.min_share, "discovery_faithfulness": faith,
                      "evaluations": len(tried)})


# A discovery method: (model, task, items, means, cfg, *, model_name, scan, checkpoint_dir,
# progress) -> Discovery, as ``find_circuit`` takes them.
Discoverer = Callable[..., Discovery]
# Method name -> its function; every name of ``Method`` but "auto".
DISCOVERERS: dict[str, Discoverer] = {
    "path_patching": path_patching_discovery,
    "mean_ablation": mean_ablation_discovery,
}

# The method and search names live in the torch-free ``cdist.discovery_names`` (the task registry
# checks tasks against them); refuse to import when a registry here and those names disagree.
if (tuple(DISCOVERERS) != discovery_names.DISCOVERY_METHODS
        or (*search.SEARCHES, "positions") != discovery_names.SEARCH_NAMES):
    raise ImportError(f"cdist.discovery_names lists methods {discovery_names.DISCOVERY_METHODS} "
                      f"and searches {discovery_names.SEARCH_NAMES}, but DISCOVERERS has "
                      f"{tuple(DISCOVERERS)} and search.SEARCHES {tuple(search.SEARCHES)}: name "
                      "each in both places")
