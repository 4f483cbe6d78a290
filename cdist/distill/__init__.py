"""Circuit distillation (Wadhwa, Amir & Wallace 2025, arXiv 2509.25002): train only the matched
student heads, on the task loss plus CKA alignment with the teacher's circuit heads.

The loss (``cdist.distill.loss``), per batch of m prompts:

    L = ce_weight * CE(student logits at pos_last, teacher's predicted answer)
        + cka_weight * sum over matched pairs (s, t) of (1 - CKA(z_s, z_t))
        + kd_weight * T^2 * KL(teacher || student at temperature T)

where z_s and z_t are the heads' outputs at the pair's own positions (``HeadPair.student_position``
and ``teacher_position``: where the teacher head does its work), one row per prompt, never a padding
position; ``cka_position`` puts every pair at one column instead. CE only, Align CKA only,
CE + Align CKA, CE + Rand CKA (a ``matching.random_control`` map), CE + Shuffled CKA
(``shuffle_teacher``: the aligned pairs, the teacher's rows permuted within each batch, so the
gradient has the same scale but no item correspondence) and logit KD are all settings of one
``DistillConfig`` (``cdist.distill.config``).

Only the chosen student heads change (``trainable="heads"``), as a frozen base plus a trainable
delta of their weight slices; ``trainable="all"`` trains every weight (``cdist.distill.params``).
Every ``eval_every`` steps (and at step 0) the run logs accuracy, validation CE and per-pair CKA on
held-out items, and the CE and CKA terms' gradient norms (``cdist.distill.diagnostics``).

The teacher may be a ``cdist.teacher_cache.TeacherCache`` instead of a model: its stored labels,
logits and head ``z`` replace the teacher's forward passes (``cdist.distill.teachers``).

Under ``torchrun`` (``cdist.distributed``) the run is data-parallel: every rank draws the same
global batch and takes its equal share of the rows, the trained weights are wrapped in
``DistributedDataParallel`` (which averages their gradients), and each CKA term is computed on the
global batch, its rows gathered from every rank with their gradients, so the loss and the gradients
are those of one process on the global batch. Rank 0 evaluates, logs and checkpoints; the
diagnostics are computed on it alone.

Runs are resumable and refuse a saved run of other settings or inputs (``cdist.distill.loop``).
A finished run's folder becomes a transformers checkpoint of the trained student with
``export_run`` (``cdist.distill.export``; ``cdist export`` on the command line).
With ``labels="answers"`` and no teacher the same loop is plain task fine-tuning (how the real-LM
teacher and student are made, ``experiments/smollm2_models.py``).
"""

from __future__ import annotations

from cdist.distill.batches import batch_stream, permutation
from cdist.distill.config import DistillConfig, KVPolicy, Labels, Trainable
from cdist.distill.export import export_run, trained_student
from cdist.distill.loop import Run, distill
from cdist.distill.params import HeadDelta, trainable_share
from cdist.distill.plan import check_pair, make_plan

__all__ = ["DistillConfig", "HeadDelta", "KVPolicy", "Labels", "Trainable", "check_pair", "distill",
           "export_run", "trainable_share", "trained_student"]

# A run's pieces under the names the tests drive them by (tests/torchrun_distill.py takes one
# step by hand; tests/test_distill.py reads the data order and the shuffled control's permutations).
_Run = Run
_plan = make_plan
_batches = batch_stream
_permutation = permutation
