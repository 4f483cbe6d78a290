"""A model's task circuit, found the paper's way for each task (what experiments/discovery.py runs on the zoo).

- Entity tracking: Prakash et al.'s path-patching search (``patching.entity_tracking_circuit``), ``k``
  heads per group whose relative change is at most ``-min_effect``; on the organisms' adjacent form the
  search also looks for the object binders (``patching.ET_SEARCH_ADJACENT``).
- Theory of mind (or any task, with ``method="mean_ablation"``): heads ranked by their mean-ablation
  probability drop; the circuit is the smallest top-n whose faithfulness on the discovery items reaches
  ``target``, with at most ``budget`` of all heads (a model that gets nothing right has no defined
  faithfulness, so its circuit grows to the budget).

The items a circuit is chosen on must not be the items it is evaluated on; callers pass separate sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from cdist import ablation, patching
from cdist.types import Circuit, HeadScores

__all__ = ["DiscoveryConfig", "find_circuit"]


@dataclass(frozen=True)
class DiscoveryConfig:
    """How a circuit is chosen (module doc)."""

    method: str = "auto"  # "auto" (by task), "path_patching" or "mean_ablation"
    search: str = "auto"  # path patching: "auto" (by the items' template), "prakash" or "adjacent"
    k: int = 2
    min_effect: float = 0.01
    budget: float = 0.2
    target: float = 0.8


def find_circuit(
    model,
    task: str,
    items,
    means: Float[Tensor, "layer pos head_index d_head"],
    cfg: DiscoveryConfig = DiscoveryConfig(),
    *,
    model_name: str = "",
    scan: dict | None = None,
    progress: bool = False,
) -> tuple[Circuit, dict[str, Tensor], dict]:
    """Find ``model``'s circuit for ``task`` on ``items``.

    Args:
        model: a HookedTransformer.
        task: "entity_tracking" or "theory_of_mind".
        items: the discovery items (with counterfactuals for path patching).
        means: per-position head means from a reference set (``ablation.head_means``).
        cfg: method and selection rule.
        model_name: recorded in the circuit.
        scan: a ``head_ablation_scan`` of ``model`` on ``items`` if already computed.
        progress: tqdm bars.

    Returns:
        The circuit, the score tables it was chosen from (name -> ``[layer, head_index]``), and a record of
        the selection (method, parameters, faithfulness on the discovery items for mean ablation).
    """
    method = cfg.method
    if method == "auto":
        method = "path_patching" if task == "entity_tracking" else "mean_ablation"
    scores: dict[str, Tensor] = {}
    if method == "path_patching":
        search = cfg.search
        if search == "auto":
            adjacent = "template" in items.column_names and items[0]["template"] == "adjacent"
            search = "adjacent" if adjacent else "prakash"
        steps = {"prakash": patching.ET_SEARCH, "adjacent": patching.ET_SEARCH_ADJACENT}[search]
        circuit, groups = patching.entity_tracking_circuit(model, items, k=cfg.k, min_effect=cfg.min_effect,
                                                           search=steps, model_name=model_name, progress=progress)
        scores = {f"path_patching_{group}": s.scores for group, s in groups.items()}
        return circuit, scores, {"method": method, "search": search, "k": cfg.k, "min_effect": cfg.min_effect}
    if method != "mean_ablation":
        raise ValueError(f"discovery method {method!r}; choose 'auto', 'path_patching' or 'mean_ablation'")
    scan = scan if scan is not None else ablation.head_ablation_scan(model, items, means=means)
    ranking = HeadScores(scan["prob_drop"], "prob_drop")
    limit = max(1, math.floor(cfg.budget * model.cfg.n_layers * model.cfg.n_heads))
    faith = math.nan
    for n in range(1, limit + 1):
        circuit = patching.ranked_circuit(ranking, n, model=model_name, method="mean_ablation")
        faith = ablation.evaluate_circuit(model, circuit, items, means=means, n_random=0)["faithfulness"]
        if faith >= cfg.target:
            break
    scores["ablation_prob_drop"] = scan["prob_drop"]
    return circuit, scores, {"method": method, "budget": cfg.budget, "target": cfg.target,
                             "discovery_faithfulness": faith}
