"""The names of the circuit-discovery methods and path-patching searches, importable without torch.

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

__all__ = ["DISCOVERY_METHODS", "SEARCH_NAMES", "DiscoveryMethod", "SearchName"]

# A circuit-discovery method: path patching (Prakash et al. 2024's search) or the mean-ablation
# ranking of circuit distillation (Wadhwa et al. 2025).
DiscoveryMethod = Literal["path_patching", "mean_ablation"]
DISCOVERY_METHODS: tuple[str, ...] = get_args(DiscoveryMethod)

# A path-patching search over entity-tracking items: Prakash et al. 2024's four groups, or those
# with the object binders that the organisms' adjacent form needs.
SearchName = Literal["prakash", "adjacent"]
SEARCH_NAMES: tuple[str, ...] = get_args(SearchName)
