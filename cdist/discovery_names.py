"""The names of the circuit-discovery methods, path-patching searches and scan metrics, importable
without torch.

The methods are the functions of ``cdist.discovery.circuits.DISCOVERERS`` and the searches the
step lists of ``cdist.discovery.search.SEARCHES``; ``circuits`` checks both registries against these
names when imported, so a new method or search is named here too or cdist does not import. The
task registry (``cdist.tasks``), which the command line's ``--help`` imports, checks a task's
default method against them without importing the discovery package and torch. This module sits
outside ``cdist.discovery`` because importing a submodule runs its package's ``__init__`` first,
and ``cdist.discovery``'s imports torch.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DISCOVERY_METHODS", "METRICS", "SEARCH_NAMES", "DiscoveryMethod", "Metric",
           "SearchName"]

# A circuit-discovery method: path patching (Prakash et al. 2024's search) or the mean-ablation
# ranking of circuit distillation (Wadhwa et al. 2025).
DiscoveryMethod = Literal["path_patching", "mean_ablation"]
DISCOVERY_METHODS: tuple[str, ...] = get_args(DiscoveryMethod)

# A path-patching search: over entity-tracking items Prakash et al. 2024's four groups, or those
# with the object binders that the organisms' adjacent form needs; over IOI items Wang et al.
# 2022's; "positions", the default one built from the items' named positions.
SearchName = Literal["prakash", "adjacent", "ioi", "positions"]
SEARCH_NAMES: tuple[str, ...] = get_args(SearchName)

# What a discovery scan reads at the answer (``cdist.discovery.metrics``): the answer's probability,
# its logit difference against a rival, or that difference normalised by the clean-corrupt gap.
Metric = Literal["prob", "logit_diff", "logit_diff_normalised"]
METRICS: tuple[str, ...] = get_args(Metric)
