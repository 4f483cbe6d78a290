"""Circuit discovery: score every head of a model on a task, then choose its circuit.

The modules follow the data: ``engine`` (replace heads' outputs, one head per stacked copy of a
batch) runs the scans of ``ablation`` (mean ablation, and the circuit's own evaluation),
``path_patching``, ``activation_patching`` and ``attribution_patching`` (and path attribution, the
search's pre-filter at depth); each scan returns a ``cdist.types.Scan`` and keeps a slow twin.
``selection`` picks a scan's heads; ``search`` chains path-patching scans into the entity-tracking
circuit search; ``circuits`` turns scans into ``Circuit``s by each task's method (``find_circuit``);
``faithfulness`` measures a circuit alone and grows one that is not faithful.
"""

from cdist.discovery import (
    ablation,
    activation_patching,
    attribution_patching,
    circuits,
    engine,
    faithfulness,
    path_patching,
    search,
    selection,
)
from cdist.discovery.circuits import Discovery, DiscoveryConfig, find_circuit
from cdist.discovery.selection import ranked_circuit, select_heads

__all__ = [
    "Discovery",
    "DiscoveryConfig",
    "ablation",
    "activation_patching",
    "attribution_patching",
    "circuits",
    "engine",
    "faithfulness",
    "find_circuit",
    "path_patching",
    "ranked_circuit",
    "search",
    "select_heads",
    "selection",
]
