"""The circuit-distillation experiment for one teacher and one student (Tables 1 and 2): circuits,
positions, head maps and their diagnostics, hyperparameters chosen on validation items, every arm
over seeds and training regimes, test and out-of-distribution accuracy, sample efficiency, and the
declared statistics. ``experiments/entity_tracking.py`` and ``experiments/theory_of_mind.py`` are
thin command lines over ``main``.

Data, all fresh from the task generator: a pool of training items (train split) whose first n are
the training set of regime n (so the small set is inside the large one); ``val`` (train split,
another seed, minus any training prompt) chooses the hyperparameters, places and matches heads, and
is logged during training; ``reference`` (test split) gives the mean-ablation means; ``discovery``
(test split) is where the circuits are found; ``test`` and the out-of-distribution sets (test split,
other box counts or templates) are where every reported accuracy comes from, and are used for
nothing else.

Steps, in order:
1. Circuits: the teacher's by its task's method, the student's by the mean-ablation ranking.
2. Positions: each teacher head's position is its circuit group's (path patching), else where its
   ablation matters most (``matching.work_positions``), unless the user names it; pairs are read
   there.
3. Head maps, one per candidate matcher (the paper's, the normalised one, CKA), each diagnosed
   (``cdist.alignment``): flat targets and crowded teacher heads are logged and flagged in the
   results; each map is also diagnosed with every pair read at the last token, for comparison.
4. Selection, on validation items with ``select_seed`` (not a table seed) at the smallest regime:
   the lr of circuit CE; then matcher and lambda of CE + Align CKA at that lr, with each lambda's
   CKA:CE gradient ratio at the start recorded; the sample-efficiency threshold (halfway from the
   base student's validation accuracy to circuit CE's at the end of its selected run); the "strong"
   lambda, the smallest whose ratio reaches ``arms.STRONG_RATIO`` (the largest of the grid if none
   does).
5. The table: every arm (``cdist.arms``) for every regime and seed; per run the test accuracy of the
   full model and of the student's circuit (means recomputed for the trained model), random
   circuits, the OOD sets, and the validation curve. Per-item correctness of every run is kept
   (``per_item.json``).
6. Statistics: the primary comparison (``arms.PRIMARY``: CE + Align CKA vs CE + Shuffled CKA at the
   smallest regime, test accuracy) pooled over seeds by the Cochran-Mantel-Haenszel test for matched
   pairs, per-seed McNemar beside it, and the same for the secondary comparisons.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from cdist import alignment, arms, distill, matching, run_folder, stats, tasks
from cdist.activations import head_z_dataset
from cdist.checkpoints import atomic_write_json, read_json
from cdist.discovery import Discovery, DiscoveryConfig, ablation, find_circuit
from cdist.distill import DistillConfig
from cdist.errors import ConfigError, InputError
from cdist.evaluate import predictions
from cdist.matching import HeadMap
from cdist.models import HookedTransformer, check_heads
from cdist.records import write_record
from cdist.store import items_fingerprint, model_fingerprint
from cdist.types import Head, Scan

__all__ = ["MATCHERS", "ExperimentConfig", "run_experiment"]

MATCHERS = arms.MATCHERS
_ARM_NAMES = tuple(a.name for a in arms.ARMS)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one table (written next to its results)."""

    task: str  # a registered task (cdist.tasks.get_task)
    task_kwargs: dict = field(default_factory=dict)  # template, n_boxes, ... for the generator
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # hyperparameter selection: data order and random maps, never a table seed
    select_seed: int = 100
    regimes: tuple[int, ...] = (128, 2000)  # training items; the first is the primary regime
    data_seed: int = 0
    val_items: int = 500
    test_items: int = 1000
    reference_items: int = 500
    discovery_items: int = 200
    # (name, generator overrides), e.g. ("10 boxes", {"n_boxes": 10})
    ood: tuple[tuple[str, dict], ...] = ()
    ood_items: int = 500
    min_teacher_ood: float = 0.9  # an OOD set where the teacher is below this is flagged, not read
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    lambdas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    matchers: tuple[str, ...] = MATCHERS
    one_to_one: bool = False
    control_lr: float = 3e-4
    # teacher head name -> position column (user-named)
    teacher_positions: dict = field(default_factory=dict)
    distill: DistillConfig = DistillConfig(steps=600, eval_every=25)
    discovery: DiscoveryConfig = DiscoveryConfig()
    student_discovery: DiscoveryConfig = DiscoveryConfig(method="mean_ablation")
    n_random: int = 5
    arms: tuple[str, ...] = _ARM_NAMES

    def __post_init__(self) -> None:
        spec = tasks.get_task(self.task)  # UnknownTaskError lists the registered tasks
        takes = set(inspect.signature(spec.generate).parameters) - {"n", "tokenizer", "seed",
                                                                    "split"}
        for kwargs in (self.task_kwargs, *(kw for _, kw in self.ood)):
            if set(kwargs) - takes:
                raise ConfigError(f"{self.task} items take no {sorted(set(kwargs) - takes)}; "
                                  f"their settings are {sorted(takes)}")
        for name in self.arms:
            arms.arm(name)
        unknown = sorted(set(self.matchers) - set(MATCHERS))
        if unknown or not self.matchers:
            raise ConfigError(f"matchers {unknown or '(none)'}; choose from {list(MATCHERS)}")
        if not self.seeds or not self.regimes or not self.lrs or not self.lambdas:
            raise ConfigError("seeds, regimes, lrs and lambdas each need at least one value")
        for name in ("seeds", "regimes"):
            values = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ConfigError(f"{name}={values}: give whole numbers")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}={values} repeats a value; give each once")
        if not all(math.isfinite(x) for x in (*self.lrs, *self.lambdas, self.control_lr)):
            raise ConfigError(f"lrs {self.lrs}, lambdas {self.lambdas}, control_lr "
                              f"{self.control_lr}: each must be a finite number")
        if self.select_seed in self.seeds:
            raise ConfigError(f"select_seed {self.select_seed} is a table seed; "
                              f"choose one outside {self.seeds}")
        for name in ("val_items", "test_items", "reference_items", "discovery_items", "ood_items",
                     "n_random"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; it must be at least 1")
        if self.val_items < 4:
            raise ConfigError(f"val_items={self.val_items}; the CKA of head maps and lambda "
                              "selection needs at least 4 validation items")
        small = [n for n in self.regimes if n < 1]
        bad = [x for x in (*self.lrs, *self.lambdas, self.control_lr) if not x > 0]
        if small or bad:
            raise ConfigError(f"regimes {small}, lrs/lambdas/control_lr {bad}: each must be "
                              "positive")
        if min(self.regimes) < self.distill.batch_size:
            raise ConfigError(f"regimes {sorted(self.regimes)}: {min(self.regimes)} training items "
                              f"cannot fill one batch of {self.distill.batch_size}; lower "
                              "batch_size or give more items")
        for lr in {*self.lrs, self.control_lr}:
            replace(self.distill, lr=lr)  # DistillConfig refuses a rate it could not train with
        for head, column in self.teacher_positions.items():
            Head.parse(head)  # a bad name raises ValueError naming it
            if not str(column).startswith("pos_"):
                raise ConfigError(f"teacher_positions[{head!r}] = {column!r}: name a position "
                                  "column, e.g. 'pos_prev_label'")


def _data(cfg: ExperimentConfig, tokenizer, n: int, split: str, seed: int, **overrides):
    return tasks.get_task(cfg.task).items(n, tokenizer=tokenizer, seed=seed, split=split,
                                          **{**cfg.task_kwargs, **overrides})


def _bits(correct: torch.Tensor) -> str:
    return "".join("1" if c else "0" for c in correct.tolist())


def _unbits(bits: str) -> torch.Tensor:
    return torch.tensor([b == "1" for b in bits])


@dataclass
class _Data:
    """The item sets of one experiment, each from its own seed; validation items never repeat
    training ones."""

    train: dict  # regime (training items) -> the first that many of one pool
    val: object
    reference: object  # for the head means of mean ablation
    found_on: object  # circuits are discovered here
    test: object
    ood: dict

    @classmethod
    def make(cls, cfg: ExperimentConfig, tok) -> _Data:
        pool = _data(cfg, tok, max(cfg.regimes), "train", cfg.data_seed * 10 + 1)
        seen = set(pool["prompt"])
        val = _data(cfg, tok, cfg.val_items, "train", cfg.data_seed * 10 + 2)
        return cls(
            train={n: pool.select(range(n)) for n in cfg.regimes},
            val=val.select([i for i, p in enumerate(val["prompt"]) if p not in seen]),
            reference=_data(cfg, tok, cfg.reference_items, "test", cfg.data_seed * 10 + 3),
            found_on=_data(cfg, tok, cfg.discovery_items, "test", cfg.data_seed * 10 + 4),
            test=_data(cfg, tok, cfg.test_items, "test", cfg.data_seed * 10 + 5),
            ood={name: _data(cfg, tok, cfg.ood_items, "test", cfg.data_seed * 10 + 6 + i, **kw)
                 for i, (name, kw) in enumerate(cfg.ood)},
        )


class _Experiment:
    """The steps of ``run_experiment``, in order, sharing the models, the items and what earlier
    steps found. Models, items, means and circuits are made when a step first asks for them, so
    that ``cdist discover`` of a teacher alone never loads a student."""

    def __init__(self, cfg: ExperimentConfig, load_teacher, load_student, out: Path, names,
                 progress, log):
        self.cfg, self.load_student, self.out, self.names = cfg, load_student, out, names
        self.load_teacher, self.progress, self.log = load_teacher, progress, log
        self.circuits, self.discoveries, self._means = {}, {}, {}

    @cached_property
    def teacher(self) -> HookedTransformer:
        return self.load_teacher()

    @cached_property
    def student(self) -> HookedTransformer:
        return self.load_student()

    @cached_property
    def data(self) -> _Data:
        # the student's tokenizer makes the items; a teacher found alone uses its own (the two must
        # agree for distillation anyway)
        model = self.student if self.load_student is not None else self.teacher
        return _Data.make(self.cfg, model.tokenizer)

    def check(self, tokenizer, teacher_config=None) -> None:
        """Refuse, before the run folder is claimed, settings that would fail only once items are
        made: one item of every kind of set is made with ``tokenizer`` (so the task's words,
        boxes and templates are tried), and the position columns and teacher heads the config
        names are looked up (heads in ``teacher_config``, a checkpoint's config, when given)."""
        cfg = self.cfg
        made = [_data(cfg, tokenizer, 1, "train", 0)]
        made += [_data(cfg, tokenizer, 1, "test", 0, **kw) for _, kw in cfg.ood]
        columns = set.intersection(*(set(matching.position_columns(d)) for d in made))
        named = {f"teacher_positions[{h!r}]": c for h, c in cfg.teacher_positions.items()}
        named["cka_position"] = cfg.distill.cka_position
        for what, column in named.items():
            if column is not None and column not in columns:
                raise ConfigError(f"{what} = {column!r} is not a position column of "
                                  f"{cfg.task}'s items; choose from {sorted(columns)}")
        if teacher_config is not None:
            check_heads(teacher_config, [Head.parse(h) for h in cfg.teacher_positions],
                        "teacher_positions heads")

    def claim(self) -> run_folder.Claim:
        """Hold the run folder for this process, refusing one that cannot be written, is in use,
        or was made for other models, items or discovery rules (``cdist.run_folder``); before
        anything is loaded or written."""
        cfg = self.cfg
        identity = {"teacher": self.names[0] if self.load_teacher else None,
                    "student": self.names[1] if self.load_student else None,
                    "task": cfg.task, "task_kwargs": cfg.task_kwargs, "data_seed": cfg.data_seed,
                    **{k: getattr(cfg, k) for k in ("val_items", "test_items", "reference_items",
                                                    "discovery_items", "ood", "ood_items")},
                    "discovery": asdict(cfg.discovery),
                    "student_discovery": asdict(cfg.student_discovery)}
        return run_folder.claim(self.out, identity)

    def data_identity(self, n_train: int) -> dict:
        """Fingerprints of the items a run of ``n_train`` training items trains and is scored on:
        a saved run is reused only for the same items."""
        data = self.data
        return {"train": items_fingerprint(data.train[n_train]), "val": items_fingerprint(data.val),
                "test": items_fingerprint(data.test),
                "ood": {k: items_fingerprint(v) for k, v in data.ood.items()}}

    def model(self, role: str) -> HookedTransformer:
        return self.teacher if role == "teacher" else self.student

    @property
    def t_heads(self) -> tuple[Head, ...]:
        return self.circuits["teacher"].heads

    @property
    def s_heads(self) -> tuple[Head, ...]:
        return self.circuits["student"].heads

    def means(self, role: str):
        """``role``'s per-position head means on the reference items (mean ablation's values)."""
        if role not in self._means:
            self._means[role] = ablation.head_means(self.model(role), self.data.reference)
        return self._means[role]

    def ablation_scan(self, role: str, items, name: str) -> Scan:
        """``role``'s mean-ablation scan of ``items``, saved as ``scans/<name>.json`` and reused
        while the model, the items and the reference items are the same: at real depth each scan
        is minutes, and a resumed experiment would otherwise redo them all."""
        model = self.model(role)
        identity = [model_fingerprint(model), items_fingerprint(items),
                    items_fingerprint(self.data.reference)]
        return _reused(self.out / "scans" / f"{name}.json", identity, "scan",
                       lambda: ablation.head_ablation_scan(model, items, means=self.means(role)),
                       Scan.to_dict, Scan.from_dict)

    # ---- 1. circuits
    def find_circuits(self, roles: tuple[str, ...] = ("teacher", "student")) -> None:
        for role in roles:
            if role not in self.circuits:
                self.find_circuit(role)

    def find_circuit(self, role: str) -> None:
        """``role``'s circuit by its rule, written to ``circuit-<role>.json``. The whole finding
        (circuit, scans, record) is kept in ``cache/discovery-<role>.json`` and reused while the
        model, the items, the task and the rule are the same, so that the steps after ``cdist
        discover`` do not find it again."""
        cfg, data, model = self.cfg, self.data, self.model(role)
        rule = cfg.student_discovery if role == "student" else cfg.discovery
        name = self.names[role == "student"]
        identity = [model_fingerprint(model), items_fingerprint(data.found_on),
                    items_fingerprint(data.reference), cfg.task, asdict(rule), name]

        def search():
            scan = (self.ablation_scan(role, data.found_on, f"{role}-discovery")
                    if rule.method_for(cfg.task) == "mean_ablation" else None)
            # a path-patching search saves its groups, so a resumed experiment does not redo them
            return find_circuit(model, cfg.task, data.found_on, self.means(role), rule,
                                model_name=name, scan=scan,
                                checkpoint_dir=self.out / f"search-{role}", progress=self.progress)

        cache = self.out / "cache" / f"discovery-{role}.json"
        found = _reused(cache, identity, "discovery", search, Discovery.to_dict,
                        Discovery.from_dict)
        circuit = found.circuit
        check_heads(model, circuit.heads, f"{cache}: the {role} circuit's heads",
                    "delete the file to find the circuit again")
        if not circuit.heads:
            raise InputError(f"the {role}'s circuit is empty: no head passed the discovery "
                             f"rule {rule}; lower --min-effect (or check that the model does "
                             "the task)")
        write_record(circuit, _mkdir(self.out) / f"circuit-{role}.json")
        self.circuits[role], self.discoveries[role] = circuit, found
        self.log(f"{role} circuit: {len(circuit.heads)} heads "
                 f"{[str(h) for h in circuit.heads]}")

    # ---- 2. where each teacher head works
    def place_teacher_heads(self) -> None:
        teacher_circuit = self.circuits["teacher"]
        if teacher_circuit.method == "path_patching":
            positions, how = matching.circuit_positions(teacher_circuit), "circuit groups"
        else:
            positions, _ = matching.work_positions(self.teacher, self.data.found_on, self.t_heads,
                                                   self.means("teacher"))
            how = "largest ablation effect"
        named = {Head.parse(h): col for h, col in self.cfg.teacher_positions.items()}
        check_heads(self.teacher, named, "teacher_positions heads")
        self.positions, self.positions_from = positions | named, how
        user = ", user-named " + str(sorted(map(str, named))) if named else ""
        self.log(f"teacher head positions ({how}{user}): "
                 + ", ".join(f"{h}@{c}" for h, c in sorted(self.positions.items())))

    # ---- 3. head maps and their diagnostics
    def match(self, names: tuple[str, ...] | None = None) -> None:
        """Head maps of the matchers ``names`` (default: the config's), each diagnosed, in
        ``self.maps`` and ``self.diagnostics``. Every map made under the same circuits,
        positions, models and validation items is kept in ``cache/head-maps.json``, so a later
        step asks only for what it lacks; ``head_maps/<name>.json`` and ``diagnostics.json``
        show every map so kept."""
        cfg, val = self.cfg, self.data.val
        names = tuple(names or cfg.matchers)
        identity = [model_fingerprint(self.student), model_fingerprint(self.teacher),
                    items_fingerprint(val), {r: c.to_dict() for r, c in self.circuits.items()},
                    {str(h): c for h, c in sorted(self.positions.items())}, cfg.one_to_one,
                    list(self.names)]
        path = self.out / "cache" / "head-maps.json"
        kept = _read_cache(path, identity, "maps") or {}
        for name, entry in list(kept.items()):  # a user's edit: remade if unreadable, else checked
            try:
                hmap = HeadMap.from_dict(entry["map"])
                entry["diagnostics"]["flags"], entry["at_last"]["flags"]  # noqa: B018
            except (KeyError, TypeError, ValueError, AttributeError):
                del kept[name]
                continue
            for role, heads in (("student", [p.student for p in hmap.pairs]),
                                ("teacher", [p.teacher for p in hmap.pairs])):
                check_heads(self.model(role), heads, f"{path}: the {name} map's {role} heads",
                            "delete the file to make the head maps again")
        scans = {}  # both ablation matchers read the same two scans: run them once
        if any(m.startswith("ablation") and m not in kept for m in names):
            scans = {role: self.ablation_scan(role, val, f"{role}-validation")
                     for role in ("student", "teacher")}
        for name in names:
            if name in kept:
                continue
            hmap = _head_map(name, cfg, self.student, self.teacher, self.s_heads, self.t_heads,
                             self.positions, val, scans, self.names)
            # the same pairs all read at the last token, as the earlier design did: what positions
            # change
            kept[name] = {"map": hmap.to_dict(),
                          "diagnostics": alignment.diagnose(self.student, self.teacher, hmap, val,
                                                            warn=False),
                          "at_last": alignment.diagnose(self.student, self.teacher,
                                                        hmap.at("pos_last"), val, warn=False)}
            atomic_write_json({"identity": identity, "maps": kept}, _mkdir(path.parent)
                              / path.name)
        maps_dir = _mkdir(self.out / "head_maps")
        for stale in maps_dir.glob("*.json"):
            if stale.stem not in kept:
                stale.unlink()
        all_diagnostics = {}
        for name, entry in kept.items():
            write_record(HeadMap.from_dict(entry["map"]), maps_dir / f"{name}.json")
            all_diagnostics |= {name: entry["diagnostics"],
                                f"{name} at pos_last": entry["at_last"]}
        atomic_write_json(all_diagnostics, self.out / "diagnostics.json")
        self.maps, self.diagnostics = {}, {}
        for name in names:
            hmap = self.maps[name] = HeadMap.from_dict(kept[name]["map"])
            self.diagnostics |= {name: kept[name]["diagnostics"],
                                 f"{name} at pos_last": kept[name]["at_last"]}
            self.log(f"head map ({name}): " + ", ".join(map(str, hmap.pairs)))
            for flag in kept[name]["diagnostics"]["flags"]:
                self.log(f"  warning: {flag}")
            self.log(f"  read at pos_last instead, {len(kept[name]['at_last']['flags'])} flags")

    def run(self, arm: arms.Arm, n_train: int, seed: int, lr: float, lam: float, hmap,
            run_dir: Path) -> dict:
        """One trained run's record, reused from ``run_dir/eval.json`` when it is the same run."""
        cfg = self.cfg
        dcfg = arm.config(cfg.distill, lam=lam, lr=lr, control_lr=cfg.control_lr, seed=seed)
        used = hmap
        if arm.cka == "random":
            used = matching.random_control(hmap, _all_heads(self.teacher), seed=seed)
        record_key = {"config": asdict(dcfg), "pairs": [str(p) for p in used.pairs],
                      "heads": [str(h) for h in self.s_heads], "train_items": n_train,
                      "items": self.data_identity(n_train)}
        done = run_dir / "eval.json"
        if done.exists():
            record = read_json(done, f"delete {run_dir} to train the run again")
            if isinstance(record, dict) and {k: record.get(k) for k in record_key} == record_key:
                return record
        model = self.load_student()
        history = distill.distill(model, self.teacher, used, self.data.train[n_train],
                                  self.data.val, dcfg, run_dir, heads=self.s_heads,
                                  progress=self.progress)
        record = record_key | {"metrics": history["metrics"], "trainable": history["trainable"],
                               "wall_time_s": history["wall_time_s"],
                               **self.evaluate(model, "student")}
        atomic_write_json(record, done)
        return record

    def evaluate(self, model: HookedTransformer, role: str, seed: int = 0) -> dict:
        """Test accuracy of the full model and of ``role``'s circuit, and per-item bits (test and
        OOD)."""
        data = self.data
        known = model is self.teacher or model is self.student
        means = self.means(role) if known else ablation.head_means(model, data.reference)
        result = ablation.evaluate_circuit(model, self.circuits[role], data.test, means=means,
                                           n_random=self.cfg.n_random, seed=seed)
        keys = ("full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness")
        ood = {name: _bits(predictions(model, d) == torch.tensor(d["answer_id"]))
               for name, d in data.ood.items()}
        return {**{k: result[k] for k in keys}, "test_full": _bits(result["full_correct"]),
                "test_circuit": _bits(result["circuit_correct"]), "ood": ood}

    # ---- 4. selection on validation items
    def select(self) -> None:
        cfg, out = self.cfg, self.out
        small = min(cfg.regimes)
        selection: dict = {"seed": cfg.select_seed, "train_items": small, "lr": [], "align": []}
        ce_arm = arms.arm("circuit distilled, CE")
        align_arm = arms.arm("circuit distilled, CE + Align CKA")
        first = self.maps[cfg.matchers[0]]
        for lr in cfg.lrs:
            rec = self.run(ce_arm, small, cfg.select_seed, lr, 0.0, first,
                           out / "select" / f"ce-lr{lr}")
            selection["lr"].append({"lr": lr, "val_accuracy": rec["metrics"][-1]["accuracy"],
                                    "val_curve": [(m["step"], m["accuracy"])
                                                  for m in rec["metrics"]]})
            self.log(f"select lr {lr}: circuit CE validation accuracy "
                     f"{selection['lr'][-1]['val_accuracy']:.3f}")
        best_lr = max(selection["lr"], key=lambda r: (r["val_accuracy"], -r["lr"]))
        lr = best_lr["lr"]
        for name in cfg.matchers:
            for lam in cfg.lambdas:
                rec = self.run(align_arm, small, cfg.select_seed, lr, lam, self.maps[name],
                               out / "select" / f"{name}-lambda{lam}")
                start, end = rec["metrics"][0], rec["metrics"][-1]
                selection["align"].append({"matcher": name, "lambda": lam,
                                           "val_accuracy": end["accuracy"],
                                           "grad_ratio_start": start.get("grad_ratio"),
                                           "cka_val_start": start.get("cka_val_mean"),
                                           "cka_val_end": end.get("cka_val_mean")})
                self.log(f"select {name} lambda {lam}: validation accuracy {end['accuracy']:.3f}, "
                         "CKA:CE gradient ratio at the start "
                         f"{start.get('grad_ratio', float('nan')):.3g}")
        best = max(selection["align"], key=lambda r: (r["val_accuracy"], -r["lambda"]))
        matcher, lam = best["matcher"], best["lambda"]
        pulling = [r["lambda"] for r in selection["align"] if r["matcher"] == matcher
                   and (r["grad_ratio_start"] or 0) >= arms.STRONG_RATIO]
        lam_strong = min(pulling) if pulling else max(cfg.lambdas)
        curve = best_lr["val_curve"]
        threshold = (curve[0][1] + curve[-1][1]) / 2
        selection |= {"chosen": {"lr": lr, "matcher": matcher, "lambda": lam,
                                 "lambda_strong": lam_strong, "threshold": threshold},
                      "why": "highest validation accuracy (ties: the smaller lr or lambda)"}
        self.log(f"chosen: lr {lr}, matcher {matcher}, lambda {lam} (strong: {lam_strong}); "
                 f"sample-efficiency threshold {threshold:.3f}")
        self.selection, self.lr, self.lam, self.lam_strong = selection, lr, lam, lam_strong
        self.threshold, self.head_map = threshold, self.maps[matcher]
        write_record(self.head_map, out / "head_map.json")

    # ---- 5. the table
    def table(self) -> list[dict]:
        cfg = self.cfg
        teacher_ood = self.evaluate(self.teacher, "teacher")["ood"]
        self.teacher_ood = {name: _unbits(bits).float().mean().item()
                            for name, bits in teacher_ood.items()}
        for name, acc in self.teacher_ood.items():
            flag = ("" if acc >= cfg.min_teacher_ood
                    else f" (below {cfg.min_teacher_ood}: flagged, not read)")
            self.log(f"OOD {name}: teacher {acc:.3f}{flag}")
        runs = []
        for n_train in cfg.regimes:
            for seed in cfg.seeds:
                for a in map(arms.arm, cfg.arms):
                    if a.trained:
                        run_dir = self.out / "runs" / f"n{n_train}" / f"{slug(a.name)}-seed{seed}"
                        lam = self.lam_strong if a.strong else self.lam
                        rec = self.run(a, n_train, seed, self.lr, lam, self.head_map, run_dir)
                    else:
                        role = "teacher" if a.name == "teacher" else "student"
                        model = self.model(role)
                        rec = self.evaluate(model, role, seed)
                    runs.append({"arm": a.name, "train_items": n_train, "seed": seed, **rec})
                    self.log(f"n={n_train} seed {seed} {a.name}: full {rec['full_accuracy']:.3f} "
                             f"circuit {rec['circuit_accuracy']:.3f}")
        return runs

    # ---- 6. statistics and the record
    def record(self, runs: list[dict], wall: float) -> dict:
        cfg, data = self.cfg, self.data
        heads_only = replace(cfg.distill, trainable="heads")
        kv_group = replace(cfg.distill, kv_policy="group")
        summary = {
            "config": _jsonable(asdict(cfg)), "teacher": self.names[0], "student": self.names[1],
            "circuits": {role: c.to_dict() for role, c in self.circuits.items()},
            "teacher_positions": {str(h): c for h, c in sorted(self.positions.items())},
            "positions_from": self.positions_from,
            "head_maps": {name: m.to_dict() for name, m in self.maps.items()},
            "diagnostics": self.diagnostics,
            "selection": self.selection, "head_map": self.head_map.to_dict(), "lambda": self.lam,
            "lambda_strong": self.lam_strong, "lr": self.lr,
            "teacher_ood": self.teacher_ood,
            "trainable": distill.trainable_share(self.student, heads_only, self.s_heads),
            "trainable_group": distill.trainable_share(self.student, kv_group, self.s_heads),
            **summarise(runs, cfg, self.threshold),
            "wall_time_s": round(wall, 1),
        }
        keep = ("arm", "train_items", "seed", "test_full", "test_circuit", "ood")
        eval_sets = {"test": len(data.test), **{k: len(v) for k, v in data.ood.items()}}
        atomic_write_json({"eval_sets": eval_sets, "runs": [{k: r[k] for k in keep} for r in runs]},
                          self.out / "per_item.json")
        atomic_write_json(summary, self.out / "results.json")
        return summary


def run_experiment(
    cfg: ExperimentConfig,
    load_teacher: Callable[[], object],
    load_student: Callable[[], object],
    out_dir: str | Path,
    *,
    names: tuple[str, str] = ("teacher", "student"),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the experiment (module doc); write ``results.json`` and ``per_item.json`` to ``out_dir``.

    Finished runs (their ``eval.json``) are reused when their config, pairs and heads are the same,
    and an interrupted run resumes from its checkpoint, so calling it again continues where it
    stopped.
    """
    exp = _Experiment(cfg, load_teacher, load_student, Path(out_dir), names, progress, log)
    # the items' tokenizer comes with a model: it loads before the folder is claimed
    exp.check((exp.student if load_student is not None else exp.teacher).tokenizer)
    with exp.claim():
        return run_steps(exp)


def run_steps(exp: _Experiment) -> dict:
    """``run_experiment``'s steps on an experiment whose folder this process holds."""
    t_start = time.time()
    exp.find_circuits()
    exp.place_teacher_heads()
    exp.match()
    exp.select()
    runs = exp.table()
    return exp.record(runs, time.time() - t_start)


def summarise(runs: list[dict], cfg: ExperimentConfig, threshold: float) -> dict:
    """Per arm and regime: accuracies (mean, sd over seeds), OOD accuracy, steps to the threshold,
    validation CE curve; and the statistical tests. Everything is recomputed from the runs' per-item
    strings."""
    table: dict = {}
    for r in runs:
        key = f"n{r['train_items']}"
        table.setdefault(key, {}).setdefault(r["arm"], []).append(r)
    rows = {}
    for regime, by_arm in table.items():
        rows[regime] = {}
        for arm_name, recs in by_arm.items():
            row = {k: _mean_sd([r[k] for r in recs]) for k in ("full_accuracy", "circuit_accuracy",
                                                                 "random_accuracy", "faithfulness")}
            row["ood"] = {name: _mean_sd([_unbits(r["ood"][name]).float().mean().item()
                                          for r in recs])
                          for name in recs[0]["ood"]}
            curves = [r.get("metrics") for r in recs if r.get("metrics")]
            if curves:
                reached = [next((m["step"] for m in c if m["accuracy"] >= threshold), None)
                           for c in curves]
                row["steps_to_threshold"] = reached
                row["val_ce_curve"] = [(m["step"],
                                        sum(c[i]["val_ce"] for c in curves) / len(curves))
                                       for i, m in enumerate(curves[0])]
                row["val_accuracy_curve"] = [(m["step"],
                                              sum(c[i]["accuracy"] for c in curves) / len(curves))
                                             for i, m in enumerate(curves[0])]
                row["grad_ratio_start"] = _mean_sd([c[0].get("grad_ratio") for c in curves])
                row["cka_val"] = {"start": _mean_sd([c[0].get("cka_val_mean") for c in curves]),
                                  "end": _mean_sd([c[-1].get("cka_val_mean") for c in curves])}
                row["wall_time_s"] = sum(r.get("wall_time_s", 0) for r in recs)
            rows[regime][arm_name] = row
    comparisons = [arms.PRIMARY, ("circuit distilled, CE + Align CKA", "circuit distilled, CE"),
                   ("circuit distilled, CE + Align CKA", "circuit distilled, CE + Rand CKA"),
                   ("circuit distilled, CE + Align CKA", "circuit distilled, KD"),
                   ("circuit distilled, CE + Align CKA (strong)",
                    "circuit distilled, CE + Shuffled CKA (strong)"),
                   ("circuit distilled, CE + Align CKA (strong)", "circuit distilled, CE"),
                   ("positive control, Align CKA (small lr)",
                    "positive control, Shuffled CKA (small lr)")]
    tests = {}
    for regime, by_arm in table.items():
        for a, b in comparisons:
            if a not in by_arm or b not in by_arm:
                continue
            ra = sorted(by_arm[a], key=lambda r: r["seed"])
            rb = sorted(by_arm[b], key=lambda r: r["seed"])
            sets = {"test": ([_unbits(r["test_full"]) for r in ra],
                             [_unbits(r["test_full"]) for r in rb])}
            for name in ra[0]["ood"]:
                sets[name] = ([_unbits(r["ood"][name]) for r in ra],
                              [_unbits(r["ood"][name]) for r in rb])
            tests[f"{regime}: {a} vs {b}"] = {
                name: {"pooled": stats.mcnemar_pooled(xa, xb),
                       "per_seed": [{"seed": r["seed"], **stats.mcnemar(x, y)}
                                    for r, x, y in zip(ra, xa, xb, strict=True)]}
                for name, (xa, xb) in sets.items()}
    primary = f"n{min(cfg.regimes)}: {arms.PRIMARY[0]} vs {arms.PRIMARY[1]}"
    return {"rows": rows, "tests": tests, "primary": primary, "threshold": threshold}


def _head_map(name, cfg, student: HookedTransformer, teacher: HookedTransformer, s_heads, t_heads,
              positions, val, scans, names):
    kw = {"one_to_one": cfg.one_to_one, "student_model": names[1], "teacher_model": names[0]}
    if name == "cka":
        columns = sorted({positions[h] for h in t_heads})
        student_z = head_z_dataset(student, val, [(h, c) for h in s_heads for c in columns])
        teacher_z = head_z_dataset(teacher, val, [(h, positions[h]) for h in t_heads])
        return matching.cka_matcher(student_z, teacher_z, **kw)
    hmap = matching.ablation_matcher_from_scans(
        scans["student"], scans["teacher"], s_heads, t_heads,
        normalise="baseline" if name == "ablation-baseline" else None, **kw)
    return hmap.placed(positions)


def _all_heads(model: HookedTransformer) -> list:
    return [Head(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def _mean_sd(values: list) -> dict:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(values) / len(values)
    sd = ((sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
          if len(values) > 1 else 0.0)
    return {"mean": mean, "sd": sd, "n": len(values)}


def slug(row: str) -> str:
    """An arm's name as a folder name."""
    return (row.replace(", ", "-").replace(" + ", "+").replace(" ", "_")
            .replace("(", "").replace(")", ""))


def _read_cache(path: Path, identity, key: str):
    """What ``path`` keeps under ``key`` for ``identity``, or None: a cache written for other
    inputs, or one that cannot be read (a kill leaves no half-written file, but a user's edit
    can), is made anew."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # through JSON, so that tuples and lists compare equal
    if not isinstance(saved, dict) or saved.get("identity") != json.loads(json.dumps(identity)):
        return None
    return saved.get(key)


def _reused(path: Path, identity, key: str, make, to_dict, from_dict):
    """``make()``'s result, or the one ``path`` keeps under ``key`` for the same ``identity``
    (then saved there)."""
    saved = _read_cache(path, identity, key)
    if saved is not None:
        try:
            return from_dict(saved)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # an edited record: made anew, like an unreadable one
    value = make()
    atomic_write_json({"identity": identity, key: to_dict(value)}, _mkdir(path.parent)
                      / path.name)
    return value


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d
