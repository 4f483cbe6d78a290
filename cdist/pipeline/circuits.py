"""Stage 1, circuits: the teacher's by its task's method (Prakash et al.'s path-patching search
for entity tracking), the student's by its rule (the mean-ablation ranking by default).

Every finding is kept in the run folder's store with the model, items, task and rule it was made
from, so the steps after ``cdist discover`` reuse it; a path-patching search also keeps each group
it finished (``search-<role>/``), so an interrupted one resumes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cdist import discovery
from cdist.discovery import Discovery, ablation
from cdist.errors import InputError
from cdist.models import check_heads
from cdist.pipeline.config import Role
from cdist.pipeline.context import Context
from cdist.records import write_record
from cdist.store import items_fingerprint
from cdist.types import Circuit, Head, Scan

__all__ = ["Circuits", "ablation_scan", "find_circuits"]


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


def ablation_scan(ctx: Context, role: Role, items, name: str) -> Scan:
    """``role``'s mean-ablation scan of ``items``, kept as ``scans/<name>.json`` while the model,
    the items and the reference items are the same: at real depth each scan is minutes."""
    identity = [ctx.fingerprint(role), items_fingerprint(items),
                items_fingerprint(ctx.items.reference)]
    return ctx.store.reuse(
        f"scans/{name}.json", identity,
        lambda: ablation.head_ablation_scan(ctx.model(role), items, means=ctx.means(role)),
        encode=Scan.to_dict, decode=Scan.from_dict)


def find_circuit(ctx: Context, role: Role) -> Discovery:
    """``role``'s circuit by its rule, written to ``circuit-<role>.json`` (module doc).

    Raises:
        InputError: no head passed the rule, or a kept circuit names heads outside the model.
    """
    cfg, items = ctx.cfg, ctx.items
    rule = cfg.student_discovery if role == "student" else cfg.discovery
    name = ctx.names[role]
    identity = [ctx.fingerprint(role), items_fingerprint(items.found_on),
                items_fingerprint(items.reference), cfg.task, asdict(rule), name]

    def search() -> Discovery:
        scan = (ablation_scan(ctx, role, items.found_on, f"{role}-discovery")
                if rule.method_for(cfg.task) == "mean_ablation" else None)
        return _search(ctx, role, rule, name, scan)

    cache = f"cache/discovery-{role}.json"
    found = ctx.store.reuse(cache, identity, search, encode=Discovery.to_dict,
                            decode=Discovery.from_dict)
    circuit = found.circuit
    check_heads(ctx.model(role), circuit.heads,
                f"{ctx.store.path(cache)}: the {role} circuit's heads",
                "delete the file to find the circuit again")
    if not circuit.heads:
        raise InputError(f"the {role}'s circuit is empty: no head passed the discovery "
                         f"rule {rule}; lower --min-effect (or check that the model does "
                         "the task)")
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


def find_circuits(ctx: Context, roles: tuple[Role, ...] = ("teacher", "student")) -> Circuits:
    """Stage 1 for ``roles`` (module doc)."""
    return Circuits(**{role: find_circuit(ctx, role) for role in roles})
