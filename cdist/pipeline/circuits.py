"""Stage 1, circuits: the teacher's by its task's method (Prakash et al.'s path-patching search
for entity tracking), the student's by its rule (the mean-ablation ranking by default), each
checked for faithfulness before anything trains.

Every finding is kept in the run folder's store with the model, items, task and rule it was made
from, so the steps after ``cdist discover`` reuse it; a path-patching search also keeps each group
it finished (``search-<role>/``), so an interrupted one resumes.

The faithfulness check (ours; ``ExperimentConfig.min_faithfulness``, ``grow_circuits``,
``grow_max_share``): a circuit is measured alone, every other head mean-ablated at every position,
on the validation items (neither its discovery items nor the test items), against the full model
there. Faithfulness = circuit accuracy / full accuracy.

- A model whose full accuracy is at or below chance (``Task.chance_accuracy``: a uniform guess among
  an item's answers, or the most common answer) is refused: a circuit of a model that cannot do
  the task means nothing.
- A circuit at or above ``min_faithfulness`` stands as found.
- Below it, with growth off, the stage refuses. With growth on, heads are added in order of
  their mean-ablation drop on the validation items, largest first, until it holds: faithfulness
  is a mean-ablation measure on those items, so that is the ranking that predicts it (for the
  SmolLM2 table's teacher, putting path-patching runners-up first put 26 heads whose paths moved
  the search's metric by at most 0.5% ahead of a16.h0, whose ablation alone costs 0.35 of the
  answer's probability). A path-patching group's runner-up (a head that passed its group's rule
  but was cut by ``k``) joins its group, so its position is the group's; runners-up whose
  ablation costs nothing come last. Other heads join a path-patching circuit in
  ``grown_<position>`` groups at the position where ablating each alone hurts most
  (``matching.work_positions``), so that stage 2 reads them where they work; a ranked circuit's
  one group takes them. The number added is found by doubling, then bisection
  (``discovery.faithfulness``), up to ``grow_max_share`` of the model's heads; a circuit that
  does not reach the threshold within it is refused.

Refusals are one line (``UnfaithfulCircuitError``, exit status 2 from the command line) naming the
role, the circuit's size and accuracy, the full accuracy, the faithfulness and the threshold. The
check's record (before and after, each head added and why, each evaluation) is kept in
``faithfulness-<role>.json`` by the identity of the model, the items, the circuit and the settings,
and rides in the ``Discovery`` record as ``faithfulness``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

from cdist import discovery, limits, matching
from cdist.discovery import Discovery, ablation, faithfulness, search
from cdist.errors import ConfigError, InputError, UnfaithfulCircuitError
from cdist.evaluate import accuracy
from cdist.models import check_heads
from cdist.pipeline.config import ExperimentConfig, Role
from cdist.pipeline.context import Context
from cdist.progress import phase
from cdist.records import write_record
from cdist.store import items_fingerprint
from cdist.tasks import get_task
from cdist.types import Circuit, Head, Scan

__all__ = ["Circuits", "ablation_scan", "faithful_circuit", "find_circuits"]

# the verdicts of the faithfulness check that refuse a circuit
REFUSED = ("below chance", "unfaithful")
# the order growth adds heads in (module doc), part of a check's identity: a record grown in
# another order is another circuit
GROWTH_ORDER = "mean-ablation drop, runners-up in their groups"


@dataclass(frozen=True)
class Circuits:
    """What stage 1 found, per role (None for a role this run has no model of)."""

    teacher: Discovery | None = None
    student: Discovery | None = None

    def of(self, role: Role) -> Circuit:
        found = getattr(self, role)
        if found is None:
            raise InputError(f"no {role} circuit: this run has no {role} model")
        return found.circuit

    def heads(self, role: Role) -> tuple[Head, ...]:
        return self.of(role).heads


def ablation_scan(ctx: Context, role: Role, items, name: str, metric: str = "prob") -> Scan:
    """``role``'s mean-ablation scan of ``items`` under ``metric``, kept as ``scans/<name>.json``
    while the model, the items, the reference items and the metric are the same: at real depth
    each scan is minutes to hours, so a killed one goes on from ``scans/<name>.partial.pt``, its
    sums after its last whole batch."""
    identity = [ctx.fingerprint(role), items_fingerprint(items),
                items_fingerprint(ctx.items.reference)]
    if metric != "prob":  # scans kept before there was a choice read the probability
        identity.append(metric)
    return ctx.store.reuse(
        f"scans/{name}.json", identity,
        lambda: ablation.head_ablation_scan(ctx.model(role), items, means=ctx.means(role),
                                            metric=metric, progress=ctx.progress,
                                            resume=ctx.store.path(f"scans/{name}.partial.pt")),
        encode=Scan.to_dict, decode=Scan.from_dict)


def _rule(cfg: ExperimentConfig, role: Role) -> discovery.DiscoveryConfig:
    return cfg.student_discovery if role == "student" else cfg.discovery


def _check_settings(cfg: ExperimentConfig) -> None:
    """Refuse faithfulness settings the check cannot use, before any work."""
    if not (cfg.min_faithfulness >= 0 and math.isfinite(cfg.min_faithfulness)):
        raise ConfigError(f"min_faithfulness={cfg.min_faithfulness}; give a share of the full "
                          "model's accuracy >= 0 (0 turns the check off)")
    if not 0 < cfg.grow_max_share <= 1:
        raise ConfigError(f"grow_max_share={cfg.grow_max_share}; give a share of the model's "
                          "heads in (0, 1]")
    if not isinstance(cfg.grow_circuits, bool):
        raise ConfigError(f"grow_circuits={cfg.grow_circuits!r}; give true or false")


def find_circuit(ctx: Context, role: Role, *, refuse: bool = True) -> Discovery:
    """``role``'s circuit by its rule, checked for faithfulness (``faithful_circuit``), written to
    ``circuit-<role>.json`` (module doc).

    Raises:
        InputError: no head passed the rule, or a kept circuit names heads outside the model.
        UnfaithfulCircuitError: with ``refuse``, the model is at or below chance or its circuit
            is not faithful (and could not be grown to be).
    """
    cfg, items = ctx.cfg, ctx.items
    _check_settings(cfg)
    rule = _rule(cfg, role)
    name = ctx.names[role]
    identity = [ctx.fingerprint(role), items_fingerprint(items.found_on),
                items_fingerprint(items.reference), cfg.task, asdict(rule), name]

    def search() -> Discovery:
        scan = (ablation_scan(ctx, role, items.found_on, f"{role}-discovery",
                              rule.metric_for(cfg.task))
                if rule.method_for(cfg.task) == "mean_ablation" else None)
        return _search(ctx, role, rule, name, scan)

    cache = f"cache/discovery-{role}.json"
    found = ctx.store.reuse(cache, identity, search, encode=Discovery.to_dict,
                            decode=Discovery.from_dict)
    circuit = found.circuit
    check_heads(ctx.model(role), circuit.heads,
                f"{ctx.store.path(cache)}: the {role} circuit's heads",
                "delete the file to find the circuit again")
    unknown = sorted(set(circuit.positions.values()) - set(matching.position_columns(items.val)))
    if unknown:
        raise InputError(f"{ctx.store.path(cache)}: the {role} circuit reads positions {unknown}, "
                         "which the task's items do not have; delete the file to find the "
                         "circuit again")
    if not circuit.heads:
        raise InputError(f"the {role}'s circuit is empty: no head passed the discovery "
                         f"rule {rule}; lower --min-effect or --min-share, with a new --out "
                         f"({ctx.out} keeps this rule), or check that the model does the task")
    found = faithful_circuit(ctx, role, found, refuse=refuse)
    circuit = found.circuit
    shape = ctx.model(role).cfg
    # before any evaluation of it, or any training
    limits.check_random_circuits(cfg.n_random, shape.n_layers * shape.n_heads, len(circuit.heads),
                                 f"the {role}'s circuit")
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_record(circuit, ctx.out / f"circuit-{role}.json")
    ctx.log(f"{role} circuit: {len(circuit.heads)} heads {[str(h) for h in circuit.heads]}")
    return found


def _search(ctx: Context, role: Role, rule, name: str, scan: Scan | None) -> Discovery:
    """The discovery method's own search (``cdist.discovery.find_circuit``), which saves each
    path-patching group in ``search-<role>/`` so that a resumed search does not redo it."""
    return discovery.find_circuit(ctx.model(role), ctx.cfg.task, ctx.items.found_on,
                                  ctx.means(role), rule, model_name=name, scan=scan,
                                  checkpoint_dir=ctx.out / f"search-{role}",
                                  progress=ctx.progress)


def find_circuits(ctx: Context, roles: tuple[Role, ...] = ("teacher", "student"), *,
                  refuse: bool = True) -> Circuits:
    """Stage 1 for ``roles`` (module doc); with ``refuse=False`` (``cdist discover`` and
    ``cdist evaluate``, which report) a circuit that fails the faithfulness check is logged as a
    warning instead of stopping the run."""
    return Circuits(**{role: find_circuit(ctx, role, refuse=refuse) for role in roles})


# --------------------------------------------------------------------------------------------------
# The faithfulness check
# --------------------------------------------------------------------------------------------------


def faithful_circuit(ctx: Context, role: Role, found: Discovery, *,
                     refuse: bool = True) -> Discovery:
    """``found`` checked on the validation items and grown when it falls short and growth is on
    (module doc); the record is kept in ``faithfulness-<role>.json`` and reused while the model,
    the items, the circuit and the settings are the same.

    Returns:
        ``found`` with the circuit that passed (grown or as found; as found when it failed and
        ``refuse`` is off) and its record's ``faithfulness``; ``found`` itself when
        ``min_faithfulness`` is 0.

    Raises:
        UnfaithfulCircuitError: with ``refuse``, a verdict of ``REFUSED``.
    """
    cfg = ctx.cfg
    if cfg.min_faithfulness == 0:
        ctx.log(f"{role} circuit: faithfulness check off (min_faithfulness 0)")
        return found
    identity = [ctx.fingerprint(role), items_fingerprint(ctx.items.val),
                items_fingerprint(ctx.items.reference), cfg.task, found.circuit.to_dict(),
                asdict(_rule(cfg, role)), cfg.min_faithfulness, cfg.grow_circuits,
                cfg.grow_max_share, GROWTH_ORDER]
    record = ctx.store.reuse(f"faithfulness-{role}.json", identity,
                             lambda: _check(ctx, role, found))
    circuit = Circuit.from_dict(record["circuit"])
    check_heads(ctx.model(role), circuit.heads,
                f"{ctx.store.path(f'faithfulness-{role}.json')}: the {role} circuit's heads",
                "delete the file to check the circuit again")
    ctx.log(_summary(role, record))
    if record["verdict"] in REFUSED:
        message = _refusal(ctx, role, record)
        if refuse:
            raise UnfaithfulCircuitError(message)
        ctx.log(f"warning: {message}")
    return Discovery(circuit, found.scans, {**found.record, "faithfulness": record})


def _check(ctx: Context, role: Role, found: Discovery) -> dict:
    """The check's record: chance, full accuracy, the circuit before and after, the verdict
    ("below chance", "faithful", "grown" or "unfaithful")."""
    cfg, model, val = ctx.cfg, ctx.model(role), ctx.items.val
    circuit = found.circuit
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    with phase(f"{role} full accuracy on {len(val)} validation items", enabled=ctx.progress):
        full = accuracy(model, val)
    record = {"items": "validation", "n_items": len(val),
              "chance": get_task(cfg.task).chance_accuracy(val), "full_accuracy": full,
              "threshold": cfg.min_faithfulness, "grow": cfg.grow_circuits, "n_heads": n_heads,
              "max_heads": max(1, math.floor(cfg.grow_max_share * n_heads)),
              "before": None, "after": None, "added": [], "evaluations": [],
              "circuit": circuit.to_dict()}
    if full <= record["chance"]:
        return record | {"verdict": "below chance"}
    means = ctx.means(role)
    with phase(f"{role} circuit accuracy on {len(val)} validation items", enabled=ctx.progress):
        acc = faithfulness.circuit_accuracy(model, circuit.heads, val, means)
    record["before"] = record["after"] = {"heads": len(circuit), "circuit_accuracy": acc,
                                          "faithfulness": acc / full}
    if acc / full >= cfg.min_faithfulness:
        return record | {"verdict": "faithful"}
    if not cfg.grow_circuits:
        return record | {"verdict": "unfaithful"}
    return record | _grow(ctx, role, found, full, record["max_heads"])


class _Candidate(NamedTuple):
    head: Head
    group: str | None  # the path-patching group it passed in; None: chosen by its ablation drop
    score: float
    why: str


def _candidates(ctx: Context, role: Role, found: Discovery) -> list[_Candidate]:
    """Heads to grow ``found``'s circuit by, in order (module doc): every head outside it whose
    mean ablation lowers the answer's probability on the validation items, largest drop first (a
    path-patching group's runner-up joins its group), then the runners-up whose ablation does
    not, strongest path first."""
    circuit, rule, runners = found.circuit, _rule(ctx.cfg, role), {}
    if found.record.get("method") == "path_patching":
        scans = {n.removeprefix("path_patching_"): s for n, s in found.scans.items()}
        passing = search.passing_heads(scans, search.recorded_steps(found.record),
                                       min_effect=rule.min_effect, min_share=rule.min_share)
        for score, h, g in sorted((scans[g].ranking()[h], h, g) for g, heads in passing.items()
                                  for h in heads if h not in circuit.groups.get(g, ())):
            runners.setdefault(h, (g, score))  # the most negative relative change first
    drops = ablation_scan(ctx, role, ctx.items.val, f"{role}-validation").ranking()
    out = {}
    for h in [h for h in drops.top(drops.scores.numel()) if drops[h] > 0] + list(runners):
        group, score = runners.get(h, (None, drops[h]))
        why = f"mean-ablation drop {drops[h]:.3g} on the validation items"
        if group is not None:
            why = f"{group} runner-up (relative change {score:.3g}, cut by k={rule.k}); {why}"
        out.setdefault(h, _Candidate(h, group, score, why))
    return [c for h, c in out.items() if h not in circuit.heads]


def _grow(ctx: Context, role: Role, found: Discovery, full: float, max_heads: int) -> dict:
    """The growth's part of the check's record: the verdict, the circuit after, the heads added
    and why, and every evaluation."""
    circuit, candidates = found.circuit, _candidates(ctx, role, found)
    n, evaluations = faithfulness.grow_until_faithful(
        ctx.model(role), circuit.heads, [c.head for c in candidates], ctx.items.val,
        ctx.means(role), full_accuracy=full, threshold=ctx.cfg.min_faithfulness,
        max_heads=max_heads, log=ctx.log, progress=ctx.progress)
    if n is None:
        return {"verdict": "unfaithful", "evaluations": evaluations}
    added = candidates[:n]
    grown = _grown_circuit(ctx, role, circuit, added)
    where = {h: g for g, heads in grown.groups.items() for h in heads if h not in circuit.heads}
    after = next(e for e in evaluations if e["added"] == n)
    return {"verdict": "grown", "evaluations": evaluations, "circuit": grown.to_dict(),
            "after": {k: after[k] for k in ("heads", "circuit_accuracy", "faithfulness")},
            "added": [{"head": str(c.head), "group": where[c.head], "why": c.why}
                      for c in added]}


def _grown_circuit(ctx: Context, role: Role, circuit: Circuit,
                   added: list[_Candidate]) -> Circuit:
    """``circuit`` with ``added``: runners-up in their groups (with their scores), heads chosen by
    ablation in ``grown_<position>`` groups where they work (path patching) or in the circuit's
    first group (a ranked circuit)."""
    groups = {g: list(heads) for g, heads in circuit.groups.items()}
    positions, scores = dict(circuit.positions), dict(circuit.scores or {})
    for c in added:
        if c.group is not None:
            groups[c.group].append(c.head)
            scores.setdefault(c.head, c.score)
    by_drop = [c.head for c in added if c.group is None]
    if by_drop and circuit.method == "path_patching":
        where, _ = matching.work_positions(
            ctx.model(role), ctx.items.val, by_drop, ctx.means(role), progress=ctx.progress,
            resume=ctx.store.path(f"scans/{role}-grown-positions.partial.pt"))
        for h in by_drop:
            name = "grown_" + where[h].removeprefix("pos_")
            groups.setdefault(name, []).append(h)
            positions[name] = where[h]
    elif by_drop:
        groups[next(iter(groups))] += by_drop
    return Circuit(groups, positions, scores, model=circuit.model, method=circuit.method)


def _summary(role: Role, record: dict) -> str:
    """One log line of the check's outcome."""
    where = f"on {record['n_items']} validation items"
    if record["verdict"] == "below chance":
        return (f"{role} full accuracy {record['full_accuracy']:.3f} {where}, at or below chance "
                f"{record['chance']:.3f}")
    before, after = record["before"], record["after"]
    line = (f"{role} circuit faithfulness {where}: {before['faithfulness']:.3f} "
            f"({before['heads']} heads, circuit {before['circuit_accuracy']:.3f} / full "
            f"{record['full_accuracy']:.3f}; threshold {record['threshold']})")
    if record["verdict"] == "grown":
        line += (f"; grown to {after['heads']} heads, {after['faithfulness']:.3f}: added "
                 + ", ".join(f"{a['head']} to {a['group']} ({a['why']})"
                             for a in record["added"]))
    return line


def _refusal(ctx: Context, role: Role, record: dict) -> str:
    """The one-line refusal for a verdict of ``REFUSED`` (module doc)."""
    model, n = ctx.names[role], record["n_items"]
    if record["verdict"] == "below chance":
        return (f"the {role} ({model}) has accuracy {record['full_accuracy']:.3f} on {n} "
                f"validation items, at or below chance ({record['chance']:.3f}): a circuit of a "
                "model that cannot do the task means nothing; use a model that does the task, or "
                "items it can do (--template, --n-boxes)")
    before = record["before"]
    line = (f"the {role}'s circuit ({before['heads']} heads) alone has accuracy "
            f"{before['circuit_accuracy']:.3f} on {n} validation items against the full "
            f"{role}'s {record['full_accuracy']:.3f}: faithfulness {before['faithfulness']:.3f}, "
            f"below --min-faithfulness {record['threshold']}")
    settings = ("find the circuit with other settings (--k, --min-effect, --min-share) in a new "
                "--out")
    if not record["grow"]:
        return f"{line}; let it grow (--grow-circuits), lower --min-faithfulness, or {settings}"
    tried = record["evaluations"]
    grown = (f"grown to {max(e['heads'] for e in tried)} heads it reaches at most "
             f"{max(e['faithfulness'] for e in tried):.3f}" if tried
             else "no head could be added")
    return (f"{line}, and {grown} (--grow-max-share allows {record['max_heads']} of its "
            f"{record['n_heads']} heads); raise --grow-max-share, lower --min-faithfulness, or "
            f"{settings}")
