"""The backward path-patching search over groups of heads, as the circuit literature runs it
(Wang et al. 2022's IOI circuit; Prakash et al. 2024's entity-tracking circuit).

A search is a list of steps (``SearchStep``), each one ``path_patching_scan`` with an earlier
group as receivers, so a group is defined by the path it feeds and not by its own effect alone,
which is what separates it from heads that merely matter somewhere (Wang et al. 2022;
Goldowsky-Dill et al. 2023). ``path_patching_circuit`` runs any search; the configurations:

- ``ET_SEARCH`` (``"prakash"``), Prakash et al.'s entity-tracking search: the heads whose path into
  the logits matters most at ``pos_last`` (Value Fetchers), then the heads whose path into the
  fetchers' queries matters (Position Transmitters), then into the transmitters' values at the
  queried label (Position Detectors), then into the detectors' values at the label before it
  (Structure Readers); ``ET_SEARCH_ADJACENT`` (``"adjacent"``) adds the organisms' object binders.
- ``IOI_SEARCH`` (``"ioi"``), Wang et al.'s: name movers (into the logits at the end), S-inhibition
  heads (into the name movers' queries at the end), induction and duplicate-token heads (into the
  S-inhibition heads' values at S2) and previous-token heads (into the induction heads' keys at
  the token after S1).
- ``positions_search(columns)`` (``"positions"``), the default for a task that names positions and
  nothing more (a task file's): the heads acting directly on the logits at ``pos_last``, then, into
  those heads, the ones acting on their queries at ``pos_last`` and on their keys and values at
  each named position, one group each: the first two steps of the literature's walk, with no
  guess at what the groups mean. A user who knows more writes their own list of steps.

Heads are kept by ``select_heads``'s rule. Every group's scores are one unit (the relative change
of the answer's probability), so its floor (``min_share``) measures a head against the largest
effect of its own group's scan and of every group searched before it: a group in which no head does
anything keeps none, where a floor within each scan alone would keep its best (on SmolLM2 the best
structure reader's path was 0.04% of the best value fetcher's, and a search kept two of them).

At depth an exact scan of every sender per group is the cost of the search; ``prefilter`` first
ranks every sender with ``path_attribution_scan`` (two forward and two backward passes for all of
them, after Syed et al. 2023's edge attribution patching) and runs the exact scan only on the top
candidates.

A finished group's scans are kept in a ``cdist.store.Store`` under the checkpoint folder, so an
interrupted search resumes; under ``torchrun`` every rank takes part in each group's scan and
reaches the same groups, and rank 0 alone reads and writes the kept groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cdist.discovery.attribution_patching import path_attribution_scan
from cdist.discovery.metrics import CONTRAST, check_metric
from cdist.discovery.path_patching import ReceiverInput, path_patching_scan
from cdist.discovery.selection import MIN_SHARE, largest_effect, select_heads
from cdist.distributed import barrier, broadcast, is_main
from cdist.errors import InputError
from cdist.models import HookedTransformer
from cdist.store import Store, items_fingerprint, model_fingerprint
from cdist.types import Circuit, Head, Scan

__all__ = ["ET_SEARCH", "ET_SEARCH_ADJACENT", "IOI_SEARCH", "SEARCHES", "SearchStep",
           "entity_tracking_circuit", "passing_heads", "path_patching_circuit", "positions_search",
           "recorded_steps", "search_steps"]


@dataclass(frozen=True)
class SearchStep:
    """One group of an iterative path-patching search.

    Attributes:
        name: the group's name.
        position: position column where its senders are patched (and its receivers' input is
            replaced).
        receivers: the earlier group whose heads receive the path; None means the logits.
        receiver_input: which input of the receivers: "q", "k" or "v" (ignored for the logits).
    """

    name: str
    position: str
    receivers: str | None = None
    receiver_input: ReceiverInput = "q"


# Prakash et al. 2024's search, in order.
ET_SEARCH: tuple[SearchStep, ...] = (
    SearchStep("value_fetcher", "pos_last"),
    SearchStep("position_transmitter", "pos_last", "value_fetcher", "q"),
    SearchStep("position_detector", "pos_query_label", "position_transmitter", "v"),
    SearchStep("structure_reader", "pos_prev_label", "position_detector", "v"),
)
# Our addition for the organisms' adjacent form (" apple F , pen Q . F" -> "apple"): there the value
# fetchers attend to the earlier mention of the queried label, which a head has made carry the
# object written just before it; that head feeds the fetchers' values at ``pos_prev_label``, a path
# the four groups above never test, so without this step the search cannot find it.
ET_SEARCH_ADJACENT: tuple[SearchStep, ...] = (
    *ET_SEARCH,
    SearchStep("object_binder", "pos_prev_label", "value_fetcher", "v"),
)
# Wang et al. 2022's IOI search ("When Mary and John went to the store, John gave a drink to" ->
# " Mary"), in order; the S-inhibition heads' values at S2 carry the duplicate-token and induction
# heads' signal, and the induction heads' keys at S1+1 the previous-token heads'.
IOI_SEARCH: tuple[SearchStep, ...] = (
    SearchStep("name_mover", "pos_last"),
    SearchStep("s_inhibition", "pos_last", "name_mover", "q"),
    SearchStep("induction_duplicate", "pos_s2", "s_inhibition", "v"),
    SearchStep("previous_token", "pos_s1_next", "induction_duplicate", "k"),
)
SEARCHES: dict[str, tuple[SearchStep, ...]] = {"prakash": ET_SEARCH, "adjacent": ET_SEARCH_ADJACENT,
                                               "ioi": IOI_SEARCH}


def positions_search(columns: Sequence[str]) -> tuple[SearchStep, ...]:
    """The default search of a task that names positions (module doc): ``direct`` into the logits
    at ``pos_last``, then into its heads ``q_last`` (queries at ``pos_last``) and ``k_<name>`` /
    ``v_<name>`` (keys and values) at ``pos_last`` and at each named position column
    (``pos_<name>``, in ``columns``' order)."""
    named = [c for c in dict.fromkeys(columns) if c.startswith("pos_") and c != "pos_last"]
    steps = [SearchStep("direct", "pos_last"), SearchStep("q_last", "pos_last", "direct", "q")]
    for column in ("pos_last", *named):
        where = column.removeprefix("pos_")
        steps += [SearchStep(f"{kv}_{where}", column, "direct", kv) for kv in ("k", "v")]
    return tuple(steps)


def recorded_steps(record: Mapping) -> tuple[SearchStep, ...]:
    """The steps a path-patching discovery's ``record`` was searched with (records made before
    the steps were kept name one of ``SEARCHES``)."""
    if "steps" in record:
        return tuple(SearchStep(**step) for step in record["steps"])
    return SEARCHES[record["search"]]


def search_steps(name: str, data) -> tuple[SearchStep, ...]:
    """The steps of the search called ``name``: one of ``SEARCHES``, or ``"positions"``
    (``positions_search`` of ``data``'s integer position columns).

    Raises:
        InputError: an unknown name, or a search that reads a position ``data`` lacks.
    """
    if name == "positions":
        steps = positions_search([c for c in data.column_names
                                  if c.startswith("pos_") and isinstance(data[0][c], int)])
    elif name in SEARCHES:
        steps = SEARCHES[name]
    else:
        raise InputError(f"path-patching search {name!r}; choose from "
                         f"{[*SEARCHES, 'positions']}")
    missing = sorted({st.position for st in steps} - set(data.column_names))
    if missing:
        raise InputError(f"the {name!r} search reads positions {missing} that the items lack "
                         f"(they have {[c for c in data.column_names if c.startswith('pos_')]}); "
                         "use the task's own search or items that name them")
    return steps

# The items' columns every step reads; each step also reads its own position column.
SEARCH_COLUMNS = ("input_ids", "corrupt_input_ids", "answer_id", "pos_last")


def _check_order(search: Sequence[SearchStep]) -> None:
    """Refuse a search in which a step receives from a group that comes later or not at all."""
    seen: set[str] = set()
    for step in search:
        if step.receivers is not None and step.receivers not in seen:
            raise InputError(f"search step {step.name!r} receives from {step.receivers!r}, "
                             "which comes later or not at all; order the steps so that receivers "
                             "come first")
        seen.add(step.name)


def _scan_group(
    model: HookedTransformer, data, step: SearchStep, receivers: tuple[Head, ...], *,
    prefilter: int | None, batch_size: int, senders_per_pass: int, metric: str, progress: bool,
    resume: Path | None,
) -> dict[str, Scan]:
    """One step's scans: ``step.name``'s path-patching scan (resumable from ``resume``), and with
    ``prefilter`` the ``<step>_prefilter`` attribution scan whose top senders it was limited to
    (one gradient pass a batch: not worth keeping)."""
    kw = dict(receivers=receivers, receiver_input=step.receiver_input, position=step.position,
              batch_size=batch_size, metric=metric)
    scans, senders = {}, None
    if prefilter is not None:
        scans[f"{step.name}_prefilter"] = path_attribution_scan(model, data, progress=progress,
                                                                **kw)
        # rank 0's candidates: the ranks' gradients may differ in their last bits
        senders = broadcast(scans[f"{step.name}_prefilter"].ranking().top(prefilter))
    scans[step.name] = path_patching_scan(model, data, senders_per_pass=senders_per_pass,
                                          senders=senders, progress=progress, resume=resume, **kw)
    return scans


def _kept_or_scanned(store: Store | None, name: str, identity,
                    scan: Callable[[], dict[str, Scan]]) -> dict[str, Scan]:
    """A group's scans kept in ``store`` under ``name`` for ``identity``, else ``scan()``'s, kept.

    Rank 0 reads and tells the other ranks what it found, so that every rank reaches the same
    groups; rank 0 writes, and every rank waits until the file is there. A kept record that no
    longer reads as scans (an edited file) is scanned anew.
    """
    kept = broadcast(store.load(name, identity) if is_main() else None) if store else None
    if kept is not None:
        try:
            return {n: Scan.from_dict(d) for n, d in kept.items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
    scans = scan()
    if store is not None:
        if is_main():
            store.save(name, identity, {n: s.to_dict() for n, s in scans.items()})
        barrier()
    return scans


def entity_tracking_circuit(model: HookedTransformer, data, *,
                            search: Sequence[SearchStep] = ET_SEARCH,
                            **kwargs) -> tuple[Circuit, dict[str, Scan]]:
    """Prakash et al.'s backward path-patching search for the entity-tracking circuit (module
    doc): ``path_patching_circuit`` with ``ET_SEARCH``."""
    return path_patching_circuit(model, data, search=search, **kwargs)


def path_patching_circuit(
    model: HookedTransformer,
    data,
    *,
    search: Sequence[SearchStep],
    k: int | Mapping[str, int] = 2,
    min_effect: float | str = "noise",
    min_share: float = MIN_SHARE,
    metric: str = "prob",
    model_name: str = "",
    batch_size: int = 16,
    senders_per_pass: int = 8,
    prefilter: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[Circuit, dict[str, Scan]]:
    """The backward path-patching search ``search`` (module doc).

    Each group keeps its top ``k`` heads whose effect clears ``min_effect`` and ``min_share``
    (``select_heads``, against the largest effect of the groups so far: module doc); a group whose
    receiver group is empty stays empty. With ``prefilter`` each group's exact scan is limited to
    the senders that ``path_attribution_scan`` ranks most important; that scan is kept as
    ``<group>_prefilter``, so how many of the exact top heads it caught can be checked.

    Args:
        model: a HookedTransformer.
        data: task items with counterfactuals and the position columns the steps read.
        search: the steps, in order; each step's receivers must come earlier.
        k: heads per group, one number or group name -> number.
        min_effect: ``"noise"`` (default: a head's score must be negative by more than
            ``NOISE_Z`` standard errors over the items) or a number (at most ``-min_effect``).
        min_share: the floor, a share of the largest effect so far (0 turns it off).
        metric: what every group's scan reads at the answer (``cdist.discovery.metrics``); one
            for the whole search, so that ``min_share`` compares groups in one unit.
        model_name: recorded in the circuit.
        batch_size, senders_per_pass: as for ``path_patching_scan``.
        prefilter: exact scans of this many pre-filtered senders per group (None: of every head).
        checkpoint_dir: each finished group's scans are kept there (``<group>.json``) and reused
            by a later call with the same model, items (the columns the search reads), step,
            receivers and ``prefilter`` (``k`` and ``min_effect`` only select from them), and a
            group in progress from its last batch (``<group>.partial.pt``); a group kept under
            other ones is recomputed and replaced.
            Under ``torchrun`` rank 0 alone reads and writes the groups, and tells the others.
        progress: a tqdm bar per group, advancing per forward pass (rank 0's, under ``torchrun``).

    Returns:
        The ``Circuit`` (groups in search order, positions, each head's score in the group that
        found it first) and each searched group's ``Scan`` (and ``<group>_prefilter`` scans).
    """
    if prefilter is not None and prefilter < 1:
        raise InputError(f"prefilter={prefilter}; give a number of senders >= 1, or None for all")
    _check_order(search)
    check_metric(metric, data)
    store = Store(checkpoint_dir) if checkpoint_dir is not None else None
    made_from = None if store is None else _made_from(model, data, search, metric)
    groups: dict[str, tuple[Head, ...]] = {}
    found: dict[str, Scan] = {}
    scores: dict[Head, float] = {}
    largest = 0.0  # the largest effect of the groups searched so far (min_share's yardstick)
    for step in search:
        receivers = groups[step.receivers] if step.receivers is not None else ()
        if step.receivers is not None and not receivers:
            groups[step.name] = ()
            continue
        identity = None if made_from is None else made_from | {
            "step": [step.name, step.position, step.receiver_input],
            "receivers": [str(r) for r in receivers], "prefilter": prefilter}
        scans = _kept_or_scanned(store, f"{step.name}.json", identity, partial(
            _scan_group, model, data, step, receivers, prefilter=prefilter, batch_size=batch_size,
            senders_per_pass=senders_per_pass, metric=metric, progress=progress,
            resume=None if store is None else store.path(f"{step.name}.partial.pt")))
        found |= scans
        k_here = k if isinstance(k, int) else k.get(step.name, 0)
        groups[step.name] = select_heads(scans[step.name], k_here, min_effect, min_share,
                                         reference=largest)
        largest = max(largest, largest_effect(scans[step.name]))
        scores |= {h: scans[step.name].ranking()[h] for h in groups[step.name] if h not in scores}
    circuit = Circuit(groups, positions={step.name: step.position for step in search},
                      scores=scores, model=model_name, method="path_patching")
    return circuit, found


def _made_from(model: HookedTransformer, data, search: Sequence[SearchStep], metric: str) -> dict:
    """What a kept group's scans depend on besides its step and receivers (``k``, ``min_effect``
    and ``min_share`` only select from them, so a kept group can be re-selected under other
    ones)."""
    columns = (*SEARCH_COLUMNS, *sorted({s.position for s in search}),
               *((CONTRAST,) if metric != "prob" else ()))
    made = {"model": model_fingerprint(model), "items": items_fingerprint(data, columns)}
    if metric != "prob":  # groups kept before there was a choice read the probability
        made["metric"] = metric
    return made


def passing_heads(scans: Mapping[str, Scan], search: Sequence[SearchStep], *,
                  min_effect: float | str, min_share: float) -> dict[str, tuple[Head, ...]]:
    """Every head of each searched group that clears the group's rule, with no ``k``: the group's
    heads in ``entity_tracking_circuit`` are the first ``k`` of these, and the rest are the heads
    that the rule passed and ``k`` cut (the next candidates when a circuit must grow).

    Args:
        scans: group name -> that group's ``Scan`` (what ``entity_tracking_circuit`` returns); a
            group without one (its receivers were empty) is left out.
        search: the steps the scans were made by, in order (``min_share``'s yardstick is the
            largest effect of a group's scan and of the groups before it).
        min_effect, min_share: the rule, as for ``entity_tracking_circuit``.

    Returns:
        Group name -> its passing heads, most important first.
    """
    passing, largest = {}, 0.0
    for step in search:
        scan = scans.get(step.name)
        if scan is None:
            continue
        passing[step.name] = select_heads(scan, scan[scan.metric].numel(), min_effect, min_share,
                                          reference=largest)
        largest = max(largest, largest_effect(scan))
    return passing
