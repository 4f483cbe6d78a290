"""``OrganismConfig``: the shape, data and schedule of one zoo model, checked where it is made.

The training loop that reads it is ``cdist.zoo.organisms``, the batches it describes are made by
``cdist.zoo.organism_data``, and the zoo's own configs are ``cdist.zoo.ZOO_CONFIGS``. What differs
between tasks is read from the task's registry record (``cdist.tasks.get_task``), never from its
name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cdist import tasks
from cdist.errors import ConfigError
from cdist.types import Head

__all__ = ["OrganismConfig"]


@dataclass(frozen=True)
class OrganismConfig:
    """Shape, data and schedule of one zoo model; a bad value fails here, in one line naming it."""

    name: str
    task: str  # a registered task (cdist.tasks.get_task)
    template: str = "compact"
    n_boxes: int = 7
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 8
    n_kv_heads: int = 4
    d_mlp: int = 512
    max_positions: int = 512  # rotary positions the model is built for; prompts are far shorter
    rms_norm_eps: float = 1e-5  # Llama-3's
    steps: int = 20_000
    batch_size: int = 64
    n_queries: int = 1
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's; a shorter second-moment memory than 0.999
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    curriculum_start: int | None = 2  # entity tracking: boxes at the start; None = always n_boxes
    curriculum_threshold: float = 0.9
    # Entity tracking: the curriculum stops here (an easier task than n_boxes).
    train_boxes: int | None = None
    warmup_templates: tuple[str, ...] = ()
    # A coin flip makes each batch all warm-up or all task, not half and half.
    warmup_whole_batches: bool = False
    eval_every: int = 250
    eval_items: int = 500
    # Students stop once test accuracy lies inside stop_window, but not before step stop_after (let
    # the head-output penalty thin the heads out first), and only if accuracy on confirm_items other
    # held-out items lies inside it too.
    stop_window: tuple[float, float] | None = None
    stop_after: int = 0
    confirm_items: int = 1000
    head_sparsity: float = 0.0  # weight of the head-output penalty (HeadOutputPenalty); 0 = none
    # Each head's term is (mean output ratio) ** power; a power below 1 favours few heads.
    head_sparsity_power: float = 0.5
    head_sparsity_ramp: int = 0  # the penalty's weight grows linearly from 0 over this many steps
    free_heads: tuple[str, ...] = ()  # heads the penalty spares ("a1.h5"): where the task may live
    init_from: str | None = None  # start from this other organism's trained weights (its name)
    self_distill: bool = False  # with init_from: fit init's answer distribution, not the labels
    seed: int = 0
    task_kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> OrganismConfig:
        """The config a manifest stores (``asdict`` as JSON, so its tuples read back as lists)."""
        tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v
                      for k, v in config.items()})

    def __post_init__(self) -> None:
        task = tasks.get_task(self.task)  # UnknownTaskError lists the registered tasks
        where = f"organism {self.name!r}"
        if self.template not in task.templates:
            raise ConfigError(f"{where}: template {self.template!r} is not a template of "
                              f"{task.name}; choose from {sorted(task.templates)}")
        # The warm-up rows are entity-tracking contexts, whatever the task.
        unknown = sorted(set(self.warmup_templates) - set(tasks.ET_TEMPLATES))
        if unknown:
            raise ConfigError(f"{where}: warmup_templates {unknown} are not entity-tracking "
                              f"templates; choose from {sorted(tasks.ET_TEMPLATES)}")
        least = {"n_layers": 1, "d_model": 1, "n_heads": 1, "n_kv_heads": 1, "d_mlp": 1,
                 "batch_size": 1, "n_queries": 1, "warmup": 1, "eval_every": 1, "eval_items": 1,
                 "confirm_items": 1, "n_boxes": 2, "steps": 0, "stop_after": 0,
                 "head_sparsity_ramp": 0, "weight_decay": 0.0, "head_sparsity": 0.0,
                 "max_positions": 2}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{where}: {name}={getattr(self, name)}; it must be at least "
                                  f"{low}")
        for name in ("lr", "head_sparsity_power", "grad_clip", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}: {name}={getattr(self, name)}; it must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}: betas={self.betas}; give two numbers in [0, 1)")
        if self.n_heads % self.n_kv_heads or self.d_model % self.n_heads:
            raise ConfigError(f"{where}: n_heads={self.n_heads} must be a multiple of "
                              f"n_kv_heads={self.n_kv_heads}, and d_model={self.d_model} a "
                              "multiple of n_heads")
        for name in ("curriculum_start", "train_boxes"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= self.n_boxes:
                raise ConfigError(f"{where}: {name}={value}; use None or 2 to "
                                  f"n_boxes={self.n_boxes}")
        if not 0 <= self.curriculum_threshold <= 1:
            raise ConfigError(f"{where}: curriculum_threshold={self.curriculum_threshold} is not "
                              "in [0, 1]")
        window = self.stop_window
        if window is not None and (len(window) != 2 or not 0 <= window[0] <= window[1] <= 1):
            raise ConfigError(f"{where}: stop_window={window}; give (low, high) with "
                              "0 <= low <= high <= 1")
        for head in map(Head.parse, self.free_heads):  # a bad name raises ValueError
            if head.layer >= self.n_layers or head.head >= self.n_heads:
                raise ConfigError(f"{where}: free head {head} is outside the model "
                                  f"({self.n_layers} layers x {self.n_heads} heads)")
        if self.self_distill and self.init_from is None:
            raise ConfigError(f"{where}: self_distill fits the init_from model's outputs; set "
                              "init_from too")
        if not isinstance(self.task_kwargs, dict):
            raise ConfigError(f"{where}: task_kwargs must be a dict of generator arguments")
