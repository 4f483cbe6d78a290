"""The task registry: one ``Task`` record per task, looked up by name.

Every module that needs to know something about a task (which generator makes its items, how its
circuit is found by default, which template a pretrained model reads) asks the registry instead of
comparing task names. A task module registers itself when imported (``cdist.tasks`` imports them
all), so a new task, say IOI, is one file that ends with ``register(Task(...))`` plus its import in
``cdist/tasks/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cdist.discovery_names import DISCOVERY_METHODS, METRICS
from cdist.errors import ConfigError, InputError
from cdist.tasks.common import WordChoice, single_token_words

__all__ = ["TASKS", "Task", "UnknownTaskError", "default_words", "get_task", "register",
           "register_file_loader"]


class UnknownTaskError(ConfigError):
    """A task name that is not registered; the message lists the registered ones."""


@dataclass(frozen=True)
class Task:
    """Everything cdist needs to know about one task.

    Attributes:
        name: the registry key, e.g. ``"entity_tracking"``.
        generate: ``generate(n, *, tokenizer, seed, split, template, **kwargs) -> datasets.Dataset``
            of items with ``input_ids``, ``answer_id``, ``pos_last`` and the task's
            position columns.
        templates: template name -> template record.
        real_template: the template a pretrained (real) model is tested on; organisms
            name their own.
        discovery_method: how its circuit is found by default: a name of
            ``cdist.discovery_names.DISCOVERY_METHODS`` (``"path_patching"``,
            ``"mean_ablation"``).
        discovery_methods: every method ``cdist zoo circuits`` runs for it
            (the default first).
        table_stem: the file stem of its experiment's table, e.g. ``"table1-entity-tracking"``.
        search: for path patching, ``search(items)`` -> the name of the search that suits a set of
            items (a key of ``cdist.discovery.search.SEARCHES``); None where the task has no
            path-patching search.
        organism_kwargs: the fields of an organism's config that are keyword arguments of
            ``generate`` besides ``template`` (entity tracking: ``n_boxes``).
        default_ood: ``default_ood(organism)`` -> the out-of-distribution sets tested by default, as
            ``(label, generate overrides)`` pairs; ``organism`` says whether the models
            are zoo organisms.
        default_models: the zoo (teacher, student) its experiment runs on unless told otherwise;
            None: the command line must name them.
        organism_rows: how an organism's batches are made (``cdist.zoo.organisms``): ``"items"``,
            the generator's train-split items with only the answer after ``pos_last`` supervised;
            ``"multi_query"``, entity-tracking contexts each followed by ``n_queries`` queries.
        warmup_boxes: boxes in the entity-tracking warm-up rows that an organism's
            ``warmup_templates`` mix into its batches; None: the curriculum's current number.
        curriculum: organisms grow ``n_boxes`` from ``curriculum_start`` as held-out accuracy
            allows (needs ``n_boxes`` in ``organism_kwargs``); otherwise they train on ``n_boxes``.
        word_lists: each word-list argument of ``generate`` (e.g. ``"objects"``) -> its default
            words, in order; ``default_words`` says which of them a tokenizer keeps.
        chance: ``chance(items)`` -> the accuracy of a uniform guess among each item's possible
            answers, averaged over the items (entity tracking: 1 / its boxes); None: only the
            most common answer's share counts (``chance_accuracy``).
        size: for a task of finitely many items (a task file), ``size(tokenizer, split)`` -> the
            items of ``split``; its generator then takes ``offset`` (skip that many of the seed's
            order), and an experiment's sets of one split are disjoint slices of one order
            (``pipeline.items``). None: a generator that draws fresh items.
        metric: what its discovery scans read at the answer by default
            (``cdist.discovery.metrics``: ``"prob"``, ``"logit_diff"``,
            ``"logit_diff_normalised"``); a logit difference needs its items' ``contrast_id``.
        distinct: ``distinct(words, **generate_kwargs)`` -> how many distinct items the generator
            can make, ``words`` giving each word list's length (``distinct_items``); None:
            unbounded.
    """

    name: str
    generate: Callable
    templates: dict
    real_template: str
    discovery_method: str
    discovery_methods: tuple[str, ...]
    table_stem: str
    search: Callable | None = None
    organism_kwargs: tuple[str, ...] = ()
    default_ood: Callable[[bool], tuple] = lambda organism: ()
    default_models: tuple[str, str] | None = None
    organism_rows: str = "items"
    warmup_boxes: int | None = None
    curriculum: bool = False
    word_lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chance: Callable | None = None
    metric: str = "prob"
    size: Callable | None = None
    distinct: Callable[..., int] | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"task {self.name!r}: metric {self.metric!r}; choose from {METRICS}")
        if self.discovery_method not in DISCOVERY_METHODS:
            raise ConfigError(f"task {self.name!r}: discovery method {self.discovery_method!r}; "
                              f"choose {' or '.join(map(repr, DISCOVERY_METHODS))}")
        if self.discovery_methods[0] != self.discovery_method:
            raise ConfigError(f"task {self.name!r}: discovery_methods must start with "
                              f"{self.discovery_method!r}")
        if "path_patching" in self.discovery_methods and self.search is None:
            raise ConfigError(f"task {self.name!r} runs path patching but names no search")
        if self.real_template not in self.templates:
            raise ConfigError(f"task {self.name!r}: real_template {self.real_template!r} "
                              "is not a template")
        where = f"task {self.name!r}"
        if not self.table_stem:
            raise ConfigError(f"{where}: table_stem is empty; name its table's file stem")
        if self.default_models is not None and len(self.default_models) != 2:
            raise ConfigError(f"{where}: default_models {self.default_models!r}; give "
                              "(teacher, student)")
        if self.organism_rows not in ("items", "multi_query"):
            raise ConfigError(f"{where}: organism_rows {self.organism_rows!r}; choose 'items' or "
                              "'multi_query'")
        if self.warmup_boxes is not None and self.warmup_boxes < 2:
            raise ConfigError(f"{where}: warmup_boxes {self.warmup_boxes} leaves nothing to track; "
                              "use 2 or more (or None)")
        if self.curriculum and "n_boxes" not in self.organism_kwargs:
            raise ConfigError(f"{where}: a curriculum grows n_boxes, which is not in "
                              "organism_kwargs")

    def items(self, n: int, *, tokenizer, seed: int = 0, split: str = "train", **kwargs):
        """``n`` items of the task (``generate``'s arguments)."""
        return self.generate(n, tokenizer=tokenizer, seed=seed, split=split, **kwargs)

    def distinct_items(self, tokenizer, **kwargs) -> int | None:
        """How many distinct items ``items(..., tokenizer=tokenizer, **kwargs)`` can draw from
        (both splits together; about 80% of them are in train); None: unbounded."""
        if self.distinct is None:
            return None
        words = {role: len(kwargs[role]) if kwargs.get(role) is not None
                 else len(default_words(self, tokenizer)[role].kept) for role in self.word_lists}
        return self.distinct(words, **{k: v for k, v in kwargs.items()
                                       if k not in self.word_lists})

    def chance_accuracy(self, items) -> float:
        """What a model that does not do the task gets right on ``items``: the larger of a
        uniform guess among each item's possible answers (``chance``) and always giving the
        items' most common answer (theory of mind's "unknown" is 5/12 of its answers, above a
        guess among three)."""
        answers = [int(a) for a in items["answer_id"]]
        if not answers:
            raise InputError("chance_accuracy needs at least one item; the dataset is empty")
        common = max(answers.count(a) for a in set(answers)) / len(answers)
        return max(common, float(self.chance(items)) if self.chance is not None else 0.0)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to the registry (once per name)."""
    if task.name in TASKS:
        raise InputError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


_FILES: dict[str, Task] = {}
# (is this name task data?, its Task): set by cdist.tasks.from_file, which needs Task itself
_FILE_LOADER: list[tuple[Callable[[str], bool], Callable[[str], Task]]] = []


def register_file_loader(is_data: Callable[[str], bool], load: Callable[[str], Task]) -> None:
    """How ``get_task`` reads a task given as data (``cdist.tasks.from_file`` sets it)."""
    _FILE_LOADER[:] = [(is_data, load)]


def get_task(name: str | Task) -> Task:
    """The registered task called ``name``, or the task of the data file or folder at ``name``
    (``cdist.tasks.from_file``); a ``Task`` is returned as it is.

    Raises:
        UnknownTaskError: ``name`` is neither registered nor task data; the message lists the
            registered names.
    """
    if isinstance(name, Task):
        return name
    if name in TASKS:
        return TASKS[name]
    for is_data, load in _FILE_LOADER:
        if is_data(name):
            if name not in _FILES:
                _FILES[name] = load(name)
            return _FILES[name]
    raise UnknownTaskError(f"unknown task {name!r}; choose from {sorted(TASKS)}, or give a "
                           ".jsonl or .csv file or a datasets folder of your own items")


def default_words(task: str | Task, tokenizer) -> dict[str, WordChoice]:
    """Which default words the task's generator uses with ``tokenizer`` when given no word lists:
    per word-list argument (``"objects"``, ``"states"``, ...), the words kept (single tokens) and
    dropped.

    Raises:
        UnknownTaskError: ``task`` is not registered.
    """
    return {role: single_token_words(tokenizer, words)
            for role, words in get_task(task).word_lists.items()}
