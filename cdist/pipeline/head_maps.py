"""Stage 3, head maps: each student circuit head paired with teacher circuit heads by every matcher
asked for, and each map diagnosed (``cdist.alignment``: flat targets and crowded teacher heads are
flagged), also with every pair read at the last token for comparison.

The matchers are records (``cdist.arms.MATCHER_RECORDS``, which the command line reads without
loading torch); each names one of the methods here (``METHODS``) and its options:
- ``ablation``: each student head to the teacher head whose mean-ablation drop on the validation
  items is closest to its own (the paper's rule, Wadhwa et al., reads both against the student's
  baseline; ``normalise="baseline"`` reads each against its own model's);
- ``cka``: each student head to the teacher head whose activations it is most CKA-similar to
  (Kornblith et al. 2019) on the validation items;
- ``homolog``: each student head to the teacher head it descends from (``cdist.homologs``), read
  where that head works (its circuit group's position, else its largest ablation effect). Made
  whenever the student's layer origin is known, and every map's homolog recovery is reported.

A ``-1to1`` matcher assigns each teacher head at most once (Hungarian assignment).

Every map made under the same circuits, positions, models and validation items is kept in the
store (``cache/head-maps.json``), so a later step makes only what it lacks;
``head_maps/<name>.json`` and ``diagnostics.json`` show every map so kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cdist import alignment, arms, homologs, matching
from cdist.activations import head_z_dataset
from cdist.checkpoints import atomic_write_json
from cdist.errors import InputError
from cdist.matching import HeadMap
from cdist.pipeline.circuits import Circuits, ablation_scan
from cdist.pipeline.context import Context
from cdist.pipeline.positions import Placement
from cdist.progress import bar as progress_bar
from cdist.records import records_in, write_record
from cdist.store import items_fingerprint

__all__ = ["METHODS", "HeadMaps", "make_head_maps"]


@dataclass(frozen=True)
class HeadMaps:
    """The head maps asked for (matcher name -> map) and their diagnostics (``name`` and
    ``name at pos_last`` -> ``alignment.diagnose``'s record)."""

    maps: dict[str, HeadMap]
    diagnostics: dict[str, dict]


def _names(ctx: Context) -> dict:
    return {"student_model": ctx.names["student"], "teacher_model": ctx.names["teacher"]}


def _kw(ctx: Context, matcher: arms.Matcher) -> dict:
    return {"one_to_one": matcher.one_to_one, **_names(ctx)}


def _ablation_map(ctx: Context, circuits: Circuits, placement: Placement,
                  matcher: arms.Matcher) -> HeadMap:
    # both ablation matchers read the same two scans, kept in the store
    scans = {role: ablation_scan(ctx, role, ctx.items.val, f"{role}-validation")
             for role in ("student", "teacher")}
    hmap = matching.ablation_matcher_from_scans(
        scans["student"], scans["teacher"], circuits.heads("student"), circuits.heads("teacher"),
        normalise=matcher.normalise, **_kw(ctx, matcher))
    return hmap.placed(placement.positions)


def _cka_map(ctx: Context, circuits: Circuits, placement: Placement,
             matcher: arms.Matcher) -> HeadMap:
    positions, t_heads = placement.positions, circuits.heads("teacher")
    columns = sorted({positions[h] for h in t_heads})
    student_z = head_z_dataset(ctx.model("student"), ctx.items.val,
                               [(h, c) for h in circuits.heads("student") for c in columns])
    teacher_z = head_z_dataset(ctx.model("teacher"), ctx.items.val,
                               [(h, positions[h]) for h in t_heads])
    return matching.cka_matcher(student_z, teacher_z, **_kw(ctx, matcher))


def _homolog_map(ctx: Context, circuits: Circuits, placement: Placement,
                 matcher: arms.Matcher) -> HeadMap:
    origin = ctx.layer_origin()
    if origin is None:
        raise InputError("the homolog map needs the teacher layer each student layer was cut "
                         "from: cut the student with models.keep_layers (its checkpoint records "
                         "it), or give --student-layer-origin")
    s_heads = circuits.heads("student")
    positions = dict(placement.positions)
    outside = [t for t in (homologs.homolog(h, origin) for h in s_heads) if t not in positions]
    if outside:  # read where each works, as a ranked circuit's heads are placed
        found, _ = matching.work_positions(
            ctx.model("teacher"), ctx.items.found_on, outside, ctx.means("teacher"),
            progress=ctx.progress, resume=ctx.store.path("scans/teacher-homologs.partial.pt"))
        positions |= found
    return homologs.homolog_map(s_heads, origin, positions, **_names(ctx))


METHODS: dict[str, Callable[[Context, Circuits, Placement, arms.Matcher], HeadMap]] = {
    "ablation": _ablation_map,
    "cka": _cka_map,
    "homolog": _homolog_map,
}


def _kept(ctx: Context, name: str, identity) -> dict:
    """The maps kept for ``identity``: a user's edit is remade if unreadable, else checked."""
    kept = ctx.store.load(name, identity) or {}
    for matcher, entry in list(kept.items()):
        try:
            hmap = HeadMap.from_dict(entry["map"])
            entry["diagnostics"]["flags"], entry["at_last"]["flags"]  # noqa: B018
        except (KeyError, TypeError, ValueError, AttributeError):
            del kept[matcher]
            continue
        hmap.check(ctx.model("student"), ctx.model("teacher"),
                   matching.position_columns(ctx.items.val),
                   f"{ctx.store.path(name)}: the {matcher} map",
                   "delete the file to make the head maps again")
    return kept


def _diagnosed(ctx: Context, hmap: HeadMap, bar) -> dict:
    student, teacher, val = ctx.model("student"), ctx.model("teacher"), ctx.items.val
    diagnostics = alignment.diagnose(student, teacher, hmap, val, warn=False)
    bar.update()
    origin = ctx.layer_origin()
    if origin is not None:
        diagnostics["homolog_recovery"] = homologs.recovery(hmap, origin)
    # the same pairs all read at the last token, as reading without positions would
    at_last = alignment.diagnose(student, teacher, hmap.at("pos_last"), val, warn=False)
    bar.update()
    return {"map": hmap.to_dict(), "diagnostics": diagnostics, "at_last": at_last}


def _write_views(ctx: Context, kept: dict) -> None:
    """``head_maps/<name>.json`` and ``diagnostics.json``: every map kept, and no view of a map
    that is not (a file there that is not a head map is the user's, and stays)."""
    maps_dir = ctx.out / "head_maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    for stale in records_in(HeadMap, maps_dir.glob("*.json")):
        if stale.stem not in kept:
            stale.unlink()
    diagnostics = {}
    for name, entry in kept.items():
        write_record(HeadMap.from_dict(entry["map"]), maps_dir / f"{name}.json")
        diagnostics |= {name: entry["diagnostics"], f"{name} at pos_last": entry["at_last"]}
    atomic_write_json(diagnostics, ctx.out / "diagnostics.json")


def make_head_maps(ctx: Context, circuits: Circuits, placement: Placement,
                   names: tuple[str, ...] | None = None) -> HeadMaps:
    """Stage 3 for the matchers ``names`` (default: the config's, and the homolog map where the
    student's layer origin is known) (module doc)."""
    origin = ctx.layer_origin()
    names = tuple(names or (*ctx.cfg.matchers, *(("homolog",) if origin else ())))
    identity = [ctx.fingerprint("student"), ctx.fingerprint("teacher"),
                items_fingerprint(ctx.items.val),
                {"teacher": circuits.of("teacher").to_dict(),
                 "student": circuits.of("student").to_dict()},
                placement.to_dict(), list(origin or ()),
                [ctx.names["teacher"], ctx.names["student"]]]
    cache = "cache/head-maps.json"
    kept = _kept(ctx, cache, identity)
    missing = [name for name in names if name not in kept]
    # three parts a map: made, diagnosed where its pairs are read, diagnosed at the last token
    with progress_bar(3 * len(missing), "head maps", enabled=ctx.progress and bool(missing),
                      unit="part") as bar:
        for name in missing:
            matcher = arms.matcher(name)
            bar.set_postfix(map=name)
            made = METHODS[matcher.method](ctx, circuits, placement, matcher)
            bar.update()
            kept[name] = _diagnosed(ctx, made, bar)
            ctx.store.save(cache, identity, kept)
    _write_views(ctx, kept)
    maps, diagnostics = {}, {}
    for name in names:
        hmap = maps[name] = HeadMap.from_dict(kept[name]["map"])
        diagnostics |= {name: kept[name]["diagnostics"],
                        f"{name} at pos_last": kept[name]["at_last"]}
        ctx.log(f"head map ({name}): " + ", ".join(map(str, hmap.pairs)))
        found = kept[name]["diagnostics"].get("homolog_recovery")
        if found:
            ctx.log(f"  homologs: {found['homolog_pairs']} of {found['pairs']} pairs "
                    f"({found['reachable']} of {found['student_heads']} student heads have "
                    "theirs among its teacher heads)")
        for flag in kept[name]["diagnostics"]["flags"]:
            ctx.log(f"  warning: {flag}")
        at_last = len(kept[name]["at_last"]["flags"])
        ctx.log(f"  (the same pairs read at the last token, not where each teacher head works, "
                f"would raise {at_last} warning{'s' * (at_last != 1)}: diagnostics.json, "
                f'"{name} at pos_last")')
    return HeadMaps(maps, diagnostics)
