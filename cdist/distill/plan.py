"""What a run reads and trains, and the checks of its inputs made before any model is touched."""

from __future__ import annotations

from dataclasses import dataclass

from cdist import models
from cdist.activations import Site
from cdist.distill.config import DistillConfig
from cdist.errors import InputError, MismatchError
from cdist.matching import HeadMap
from cdist.models import HookedTransformer
from cdist.teacher_cache import TeacherCache, tokenizer_fingerprint
from cdist.types import Head, HeadPair

__all__ = ["Plan", "check_pair", "checked_plan", "make_plan", "reads_teacher"]


@dataclass(frozen=True)
class Plan:
    """What a run reads and trains, checked against its inputs before any model is touched."""

    pairs: list[HeadPair]
    heads: tuple[Head, ...]  # the student heads trained when trainable="heads"
    student_sites: list[Site]
    teacher_sites: list[Site]
    columns: list[str]  # position columns the batches must carry


def make_plan(head_map: HeadMap | None, heads, train_data, eval_data, cfg: DistillConfig) -> Plan:
    """The run's pairs (at ``cfg.cka_position`` when given), trained heads, sites and position
    columns; refuses items that cannot serve and settings that have nothing to act on."""
    if len(train_data) < cfg.batch_size:
        raise InputError(f"{len(train_data)} training items cannot fill one batch of "
                         f"{cfg.batch_size}; lower batch_size or give more items")
    if len(eval_data) < 4:
        raise InputError(f"eval_data has {len(eval_data)} items; the debiased CKA and accuracy "
                         "need at least 4")
    if head_map is not None:
        head_map.check()
    if head_map is not None and cfg.cka_position is not None:
        head_map = head_map.at(cfg.cka_position)
    pairs = list(head_map.pairs) if head_map is not None else []
    if cfg.cka_weight and not pairs:
        raise InputError("cka_weight > 0 needs a head map with pairs (cdist.matching); got none")
    train_heads = tuple(sorted(set(heads if heads is not None else (p.student for p in pairs))))
    if cfg.trainable == "heads" and not train_heads:
        raise InputError("trainable='heads' needs heads to train: pass a head map or heads=[...]")
    s_sites, t_sites = head_map.sites() if head_map is not None else ([], [])
    columns = sorted({col for _, col in s_sites + t_sites} - {"pos_last"})
    needed = {"input_ids", "answer_id", "pos_last"}  # what every batch and evaluation reads
    for name, items in (("train_data", train_data), ("eval_data", eval_data)):
        if not needed <= set(items.column_names):
            raise InputError(f"{name} lacks the columns {sorted(needed - set(items.column_names))}"
                             "; make the items with a task generator (cdist.tasks)")
    missing = sorted(set(columns) - set(train_data.column_names)
                     | set(columns) - set(eval_data.column_names))
    if missing:
        raise InputError(f"the head map reads position columns {missing} that the items lack; "
                         "build the items with the task generator or place the pairs at existing "
                         "columns (HeadMap.placed / at)")
    return Plan(pairs, train_heads, s_sites, t_sites, columns)


def reads_teacher(cfg: DistillConfig, plan: Plan) -> bool:
    """Whether a run needs the teacher at all (plain fine-tuning on the answers does not)."""
    return cfg.labels == "teacher" or bool(cfg.kd_weight) or bool(plan.pairs)


def checked_plan(student: HookedTransformer, teacher: HookedTransformer | TeacherCache | None,
                 head_map: HeadMap | None, heads, train_data, eval_data,
                 cfg: DistillConfig) -> Plan:
    """``make_plan``, after checking that the teacher and student can be distilled one into the
    other, and before checking that the plan's heads are theirs and the teacher can serve it."""
    if teacher is not None:
        check_pair(teacher, student)
    plan = make_plan(head_map, heads, train_data, eval_data, cfg)
    models.check_heads(student, [*plan.heads, *(p.student for p in plan.pairs)],
                       "the student's heads")
    if isinstance(teacher, TeacherCache):
        teacher.check_sites(plan.teacher_sites)
        if cfg.kd_weight and not teacher.has_logits:
            raise InputError("kd_weight > 0 needs the teacher's logits; build the teacher cache "
                             "with logits=True")
    elif teacher is not None:
        models.check_heads(teacher, [p.teacher for p in plan.pairs], "the teacher's heads")
    if teacher is None and reads_teacher(cfg, plan):
        raise InputError("teacher=None only fine-tunes: it needs labels='answers', kd_weight=0 and "
                         "no head map")
    return plan


def check_pair(teacher: HookedTransformer | TeacherCache, student: HookedTransformer) -> None:
    """Refuse a teacher (or a teacher cache) and a student that do not share a vocabulary and
    tokenizer: the teacher's labels are token ids of the student's output, and KD compares the two
    logit vectors entry by entry."""
    from cdist.tokenizers import tokenizer_difference

    d_vocab = teacher.d_vocab if isinstance(teacher, TeacherCache) else teacher.cfg.d_vocab
    if d_vocab != student.cfg.d_vocab:
        raise MismatchError(f"the teacher has {d_vocab} output tokens and the student "
                            f"{student.cfg.d_vocab}; distil between models of one tokenizer")
    if isinstance(teacher, TeacherCache):
        if teacher.tokenizer != tokenizer_fingerprint(student.tokenizer):
            raise MismatchError("the teacher cache was built with another tokenizer than the "
                                "student's; distil between models of one tokenizer")
        return
    if teacher.tokenizer is not None and student.tokenizer is not None:
        difference = tokenizer_difference(teacher.tokenizer, student.tokenizer)
        if difference:
            raise MismatchError(f"the teacher's and the student's tokenizers differ: {difference}; "
                                "distil between models of one tokenizer")
