"""The real-LM teacher and student of the SmolLM2 tables, made from the GGUF file.

    python experiments/smollm2_models.py                  # -> runs/smollm2/{teacher,student}
    python experiments/smollm2_models.py --teacher-steps 20 --student-steps 5 --out /tmp/smoke
    python experiments/smollm2_models.py --task ioi --out runs/smollm2-ioi

**Entity tracking** (the default):

The paper's teacher is Llama-3-8B fine-tuned on the task and its student a smaller pretrained
Llama. Here, from SmolLM2-135M-Instruct (``cdist.pretrained``; weak at the Prakash form as it
comes):
- teacher: every weight fine-tuned on entity-tracking items (2 to ``--max-boxes`` boxes, the
  Prakash template) against their answers;
- student: SmolLM2 without layers 12-19 (``--student-layers 0-11 20-29``, ``models.keep_layers``):
  a shallower model whose circuit has to be found anew, fine-tuned the same way for 10 steps only
  (a warm stage: it does the task in part, so there is a circuit to find and room to learn).
  Dropping middle layers keeps the last ones, which the unembedding reads: on 60 validation items
  the first 15 layers alone start at a CE of 47, layers 0-4 and 20-29 at 9.0, layers 0-11 and
  20-29 at 5.6 (the whole model: 4.8). Fine-tuned, 0-4 + 20-29 stayed at chance among the
  context's objects for 40 steps (0.29 on the 2-7-box mix; 0.48 at 2 boxes, 0.14 at 7), while
  0-11 + 20-29 reached 0.45 at step 10 and 0.58 at step 15 (``--student-steps 10``).

**IOI** (``--task ioi``): SmolLM2 does IOI as it comes (0.842 on these 120 items of the
``mixed`` templates; 0.955 on the IOI table's 200 validation items of the ``when`` template), so
the teacher is the GGUF itself, not fine-tuned; the student is the same cut (layers 0-11 and
20-29), which starts near zero, fine-tuned for 6 steps at lr 3e-5 on the ``mixed`` templates
(every step evaluated): 0.017 -> 0.667 on 120 items, short of the teacher on purpose.

Both are ``cdist finetune --portable`` (``cdist.finetune``: plain task fine-tuning, checkpointed
and resumable; an interrupted call continues where it stopped, and a finished model is reused;
``cdist.numerics``: AVX2 kernels and one thread, so that every x86-64 machine makes the same
weights, the fingerprints the tables check), the same as

    cdist finetune --model SmolLM2-135M-Instruct.Q4_1.gguf --template prakash \
        --n-boxes 2 3 4 5 6 7 --steps 100 --portable --out runs/smollm2/teacher
    cdist finetune --model SmolLM2-135M-Instruct.Q4_1.gguf --template prakash \
        --n-boxes 2 3 4 5 6 7 --keep-layers 0-11 20-29 --steps 10 --portable \
        --out runs/smollm2/student

Each role's folder ``OUT/<role>`` holds its checkpoint (``model/``, a transformers checkpoint),
its run and its ``finetune.json``; ``OUT/models.json`` gathers the records (config, commit, wall
times, validation accuracy before and after, each checkpoint's fingerprint,
``cdist.store.model_fingerprint``: a table refuses a model that is not the one recorded). The
checkpoints (0.5 GB for the teacher in float32) stay out of git.
"""

import argparse
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", choices=["entity_tracking", "ioi"], default="entity_tracking")
parser.add_argument("--out", default=None, help="where the checkpoints and runs go (default: "
                    "runs/smollm2, or runs/smollm2-ioi for IOI)")
parser.add_argument("--seed", type=int, default=0, help="data order and items")
parser.add_argument("--max-boxes", type=int, default=7,
                    help="entity tracking: items have 2 to this many boxes")
parser.add_argument("--train-items", type=int, default=3000, help="fine-tuning items")
parser.add_argument("--val-items", type=int, default=120, help="validation items (logged)")
parser.add_argument("--batch-size", type=int, default=16, help="items per step")
parser.add_argument("--lr", type=float, default=1e-4, help="the teacher's AdamW learning rate")
parser.add_argument("--teacher-steps", type=int, default=100,
                    help="the teacher's steps (entity tracking; IOI's teacher is not trained)")
parser.add_argument("--student-layers", nargs="+", default=["0-11", "20-29"], metavar="A-B",
                    help="the teacher's layers the student keeps (ranges, inclusive)")
parser.add_argument("--student-steps", type=int, default=None,
                    help="the student's steps (default: 10; IOI 6)")
parser.add_argument("--student-lr", type=float, default=None,
                    help="the student's learning rate (default: 1e-4; IOI 3e-5)")
parser.add_argument("--eval-every", type=int, default=None,
                    help="steps between evaluations (default: 5; IOI 1)")
args = parser.parse_args()
try:
    keep = tuple(i for part in args.student_layers
                 for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))
except ValueError:
    parser.error(f"--student-layers {args.student_layers}: give ranges like 0-4 20-29")

from cdist import numerics  # noqa: E402  (after argparse, so that --help answers at once)

# before any model loads: the recorded fingerprints then hold on any x86-64 machine
numerics.pin()
from cdist import models  # noqa: E402
from cdist.checkpoints import atomic_write_json  # noqa: E402
from cdist.errors import CdistError  # noqa: E402
from cdist.evaluate import accuracy  # noqa: E402
from cdist.finetune import FinetuneConfig, finetune, items  # noqa: E402
from cdist.pretrained import smollm2_gguf  # noqa: E402
from cdist.store import model_fingerprint  # noqa: E402

# each task's defaults: what its recorded models were made with
DEFAULTS = {"entity_tracking": {"student_steps": 10, "student_lr": 1e-4, "eval_every": 5},
            "ioi": {"student_steps": 6, "student_lr": 3e-5, "eval_every": 1}}
for name, value in DEFAULTS[args.task].items():
    if getattr(args, name) is None:
        setattr(args, name, value)
out = Path(args.out or ("runs/smollm2" if args.task == "entity_tracking" else "runs/smollm2-ioi"))


def make() -> None:
    """The models and their record (module doc)."""
    source = smollm2_gguf()
    task = ({"task": "entity_tracking", "template": "prakash",
             "n_boxes": tuple(range(2, args.max_boxes + 1))} if args.task == "entity_tracking"
            else {"task": "ioi", "template": "mixed"})
    shared = dict(**task, train_items=args.train_items, val_items=args.val_items,
                  batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed,
                  numerics="portable")
    roles = {"teacher": FinetuneConfig(**shared, lr=args.lr, steps=args.teacher_steps),
             "student": FinetuneConfig(**shared, lr=args.student_lr, steps=args.student_steps,
                                       keep_layers=keep)}
    base = models.load_llama(source)
    val = items(roles["teacher"], base.tokenizer, args.val_items, "test")
    record = {"task": args.task, "models": {},
              "source": {"file": source.name, "val_accuracy": accuracy(base, val),
                         "val_items": len(val)}}
    if args.task == "ioi":  # the source is the teacher: recorded, not trained
        record["models"]["teacher"] = {"path": str(source), "fingerprint": model_fingerprint(base),
                                       "val_accuracy": record["source"]["val_accuracy"],
                                       "kept_layers": None}
        print(f"teacher: the GGUF as it comes, validation accuracy "
              f"{record['source']['val_accuracy']:.3f}")
    # the student first: it is cut from a copy, and the teacher's training then changes base itself
    for role in [r for r in ("student", "teacher") if r not in record["models"]]:
        cfg = roles[role]
        made = finetune(base, cfg, out / role, source=str(source),
                        command=f"experiments/smollm2_models.py --task {args.task} ({role})")
        record["models"][role] = made | {"path": str(out / role / "model"),
                                         "kept_layers": list(keep) if role == "student" else None}
        print(f"{role}: validation accuracy {made['val_accuracy_before']:.3f} -> "
              f"{made['val_accuracy_after']:.3f} in {cfg.steps} steps, "
              f"{made['wall_time_s']:.0f} s{' (reused)' if made.get('reused') else ''} "
              f"-> {out / role / 'model'}")
    atomic_write_json(record, out / "models.json")


try:
    make()
except CdistError as err:  # no GGUF, a folder in use or refused: one line, as cdist's CLI
    parser.exit(2, f"{parser.prog}: error: {err}\n")
