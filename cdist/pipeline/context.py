"""What every stage of one experiment reads: its config, its models (loaded when a stage first asks
for them, so that finding a teacher's circuit alone never loads a student), its item sets, the run
folder's store, the progress switch and the log. Stages take the context and the records of
earlier stages as arguments and return records of their own; the context holds nothing a stage
found.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path

from cdist import homologs, run_folder
from cdist.discovery import ablation
from cdist.errors import ConfigError
from cdist.models import HookedTransformer
from cdist.pipeline.config import ROLES, ExperimentConfig, Role
from cdist.pipeline.items import ItemSets, check_positions, make_items
from cdist.progress import phase, say
from cdist.store import Store, model_fingerprint

__all__ = ["Context", "folder_identity"]


def folder_identity(cfg: ExperimentConfig, names: Mapping[str, str | None]) -> dict:
    """What a table's run folder is made for (its ``identity.json``, ``cdist.run_folder``): the
    models' ``names``, the task and its item sets, and the discovery rules; the models'
    fingerprints join it once they load."""
    return {"teacher": names["teacher"], "student": names["student"], "task": cfg.task,
            "task_kwargs": cfg.task_kwargs, "data_seed": cfg.data_seed,
            **{k: getattr(cfg, k) for k in ("val_items", "test_items", "reference_items",
                                            "discovery_items", "ood", "ood_items")},
            "discovery": asdict(cfg.discovery), "student_discovery": asdict(cfg.student_discovery)}


class Context:
    """One experiment's run context (module doc).

    Args:
        cfg: the experiment.
        out: its run folder.
        loaders: role -> a function that loads that model (each call a fresh copy); a role
            left out is not part of this run (a teacher's circuit found alone).
        names: role -> the model's name as the user gave it (recorded in circuits and maps).
        progress: tqdm bars for long steps.
        log: where each stage's lines go.
    """

    def __init__(self, cfg: ExperimentConfig, out: str | Path,
                 loaders: Mapping[Role, Callable[[], HookedTransformer]],
                 names: Mapping[Role, str] | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = say):
        unknown = set(loaders) - set(ROLES)
        if unknown or not loaders:
            raise ConfigError(f"loaders for {sorted(unknown) or 'no model'}; give a teacher "
                              "and/or a student")
        self.cfg, self.out, self.store = cfg, Path(out), Store(out)
        self.loaders = dict(loaders)
        self.names = {role: (names or {}).get(role) or role for role in ROLES}
        self.progress, self.log = progress, log
        self._models: dict[Role, HookedTransformer] = {}
        self._means: dict[Role, object] = {}
        self._fingerprints: dict[Role, str] = {}
        self._claimed = False

    def has(self, role: Role) -> bool:
        return role in self.loaders

    def model(self, role: Role) -> HookedTransformer:
        """``role``'s model, loaded on first use and kept (never trained in place); refused if
        its weights are not those the config expects or the run folder's results were made
        with.

        Raises:
            ConfigError: the config's ``fingerprints`` name other weights for ``role``.
            RunFolderError: the claimed folder's results were made with other weights.
        """
        if role not in self._models:
            # roles given the same loader are one model (a teacher that is also the student): it
            # is loaded once and shared, which is safe as ``model`` is never trained in place
            same = [r for r in self._models if self.loaders[r] is self.loaders[role]]
            if same:
                self._models[role] = self._models[same[0]]
            else:
                with phase(f"loading the {role} {self.names[role]}", enabled=self.progress):
                    self._models[role] = self.loaders[role]()
            found, expected = self.fingerprint(role), self.cfg.fingerprints.get(role)
            if expected and found != expected:
                del self._models[role]
                raise ConfigError(f"the {role} {self.names[role]} is not the model this "
                                  f"experiment names (weights' fingerprint {found[:12]}..., "
                                  f"expected {expected[:12]}...); give the recorded checkpoint")
            if self._claimed:
                run_folder.check_models(self.out, {role: found})
            if "items" in self.__dict__:  # made already, with another role's tokenizer
                self._check_positions(role, self.items)
        return self._models[role]

    def _check_positions(self, role: Role, items: ItemSets) -> None:
        check_positions(items.named(), self._models[role].cfg.n_ctx,
                        f"the {role} {self.names[role]}")

    def fresh(self, role: Role) -> HookedTransformer:
        """A new copy of ``role``'s model, for a run that trains it."""
        with phase(f"loading a fresh {role} {self.names[role]}", enabled=self.progress):
            return self.loaders[role]()

    def fingerprint(self, role: Role) -> str:
        if role not in self._fingerprints:
            self._fingerprints[role] = model_fingerprint(self.model(role))
        return self._fingerprints[role]

    def layer_origin(self) -> tuple[int, ...] | None:
        """The teacher layer each student layer was cut from (``cdist.homologs``): the config's,
        else the student checkpoint's record, else None."""
        origin = (self.cfg.student_layer_origin
                  or getattr(self.model("student"), "layer_origin", None))
        if origin:
            homologs.check_origin(origin, self.model("student").cfg.n_layers,
                                  self.model("teacher").cfg.n_layers)
        return tuple(origin) if origin else None

    @cached_property
    def items(self) -> ItemSets:
        # the student's tokenizer makes the items; a teacher found alone uses its own (the two
        # must agree for distillation anyway)
        made = make_items(self.cfg, self.model("student" if self.has("student") else "teacher")
                          .tokenizer)
        for role in self._models:
            self._check_positions(role, made)
        return made

    def on_validation(self) -> Context:
        """This context with the validation items as its test set and no OOD sets, sharing its
        models, means, fingerprints and store: where runs that choose settings (selection, a
        pilot) are scored, so that no choice ever reads the test items."""
        other = Context(self.cfg, self.out, self.loaders, self.names, progress=self.progress,
                        log=self.log)
        other._models, other._means = self._models, self._means
        other._fingerprints, other._claimed = self._fingerprints, self._claimed
        other.__dict__["items"] = replace(self.items, test=self.items.val, ood={})
        return other

    def means(self, role: Role):
        """``role``'s per-position head means on the reference items (mean ablation's values)."""
        if role not in self._means:
            model, reference = self.model(role), self.items.reference
            with phase(f"{role} head means on {len(reference)} reference items",
                       enabled=self.progress):
                self._means[role] = ablation.head_means(model, reference)
        return self._means[role]

    def claim(self) -> run_folder.Claim:
        """Hold the run folder for this process, refusing one that cannot be written, is in use,
        or was made for other models, items or discovery rules (``cdist.run_folder``); before
        anything is loaded or written."""
        identity = folder_identity(self.cfg, {role: self.names[role] if self.has(role) else None
                                              for role in ROLES})
        held = run_folder.claim(self.out, identity)
        self._claimed = True
        for role in self._models:  # models loaded before the claim
            run_folder.check_models(self.out, {role: self.fingerprint(role)})
        return held
