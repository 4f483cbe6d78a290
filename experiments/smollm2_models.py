"""The real-LM teacher and student of the SmolLM2 entity-tracking table, made from the GGUF file.

    python experiments/smollm2_models.py                  # -> runs/smollm2/{teacher,student}
    python experiments/smollm2_models.py --teacher-steps 20 --student-steps 5 --out /tmp/smoke

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

Both are plain task fine-tuning (``distill`` with ``labels="answers"`` and no teacher), checkpointed
and resumable: an interrupted call continues where it stopped, and a finished model is reused.
Each goes to ``OUT/<role>`` as a transformers checkpoint; ``OUT/models.json`` records the config,
the commit, the wall times, the validation accuracy before and after, and each checkpoint's
fingerprint (``cdist.store.model_fingerprint``: a table refuses a model that is not the one
recorded). The checkpoints (0.5 GB for
the teacher in float32) stay out of git.
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="runs/smollm2", help="where the checkpoints and runs go")
parser.add_argument("--seed", type=int, default=0, help="data order and items")
parser.add_argument("--max-boxes", type=int, default=7, help="items have 2 to this many boxes")
parser.add_argument("--train-items", type=int, default=3000, help="fine-tuning items")
parser.add_argument("--val-items", type=int, default=120, help="validation items (logged)")
parser.add_argument("--batch-size", type=int, default=16, help="items per step")
parser.add_argument("--lr", type=float, default=1e-4, help="the teacher's AdamW learning rate")
parser.add_argument("--teacher-steps", type=int, default=100, help="the teacher's steps")
parser.add_argument("--student-layers", nargs="+", default=["0-11", "20-29"], metavar="A-B",
                    help="the teacher's layers the student keeps (ranges, inclusive)")
parser.add_argument("--student-steps", type=int, default=10, help="the student's steps")
parser.add_argument("--student-lr", type=float, default=1e-4, help="the student's learning rate")
parser.add_argument("--eval-every", type=int, default=5, help="steps between evaluations")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
args = parser.parse_args()
try:
    keep = [i for part in args.student_layers
            for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
except ValueError:
    parser.error(f"--student-layers {args.student_layers}: give ranges like 0-4 20-29")

import datasets  # noqa: E402  (after argparse, so that --help answers at once)
import torch  # noqa: E402

from cdist import distill, models, tasks  # noqa: E402
from cdist.checkpoints import atomic_write_json  # noqa: E402
from cdist.evaluate import accuracy  # noqa: E402
from cdist.pretrained import smollm2_gguf  # noqa: E402
from cdist.provenance import git_commit  # noqa: E402
from cdist.store import model_fingerprint  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
commit = git_commit()
record_path = out / "models.json"
record = json.loads(record_path.read_text()) if record_path.exists() else {}
# What each model depends on: a finished model is reused only under the same settings.
shared = ("seed", "max_boxes", "train_items", "val_items", "batch_size", "eval_every")
settings = {
    "teacher": {k: getattr(args, k) for k in (*shared, "lr", "teacher_steps")},
    "student": {k: getattr(args, k) for k in (*shared, "student_layers", "student_lr",
                                              "student_steps")},
}
for role, done in record.get("models", {}).items():
    if done["settings"] != settings[role]:
        parser.error(f"{out / role} was made with other settings ({done['settings']}); delete it "
                     f"and its entry in {record_path}, or use another --out")

source = smollm2_gguf()
base = models.load_llama(source)
tokenizer = base.tokenizer


def items(n: int, seed: int, split: str):
    """``n`` items spread evenly over 2 to ``--max-boxes`` boxes, shuffled."""
    counts = range(2, args.max_boxes + 1)
    parts = [tasks.entity_tracking(n // len(counts) + (i < n % len(counts)), tokenizer=tokenizer,
                                   n_boxes=b, template="prakash", seed=seed * 100 + b, split=split)
             for i, b in enumerate(counts)]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


# Seeds 1000 and up: the table's own items (ExperimentConfig.data_seed 0) come from seeds 1 to 20.
train = items(args.train_items, 1000 + args.seed, "train")
val = items(args.val_items, 2000 + args.seed, "test")


def make(role: str, model, steps: int, lr: float) -> None:
    """Fine-tune ``model`` (every weight) and save it as ``OUT/role``, unless that is done."""
    if (out / role / "config.json").exists() and role in record.get("models", {}):
        print(f"{role}: {out / role} exists, reused")
        return
    cfg = distill.DistillConfig(steps=steps, lr=lr, batch_size=args.batch_size,
                                trainable="all", labels="answers", eval_every=args.eval_every,
                                seed=args.seed)
    started, before = time.time(), accuracy(model, val)
    run = distill.distill(model, None, None, train, val, cfg, out / f"{role}-run")
    after = accuracy(model, val)
    models.save_llama(model, out / role)
    record.setdefault("models", {})[role] = {
        "path": str(out / role), "settings": settings[role], "layers": model.cfg.n_layers,
        "steps": steps,
        "kept_layers": keep if role == "student" else None,
        "config": asdict(cfg), "commit": commit,
        "val_accuracy_before": before, "val_accuracy_after": after,
        "train_wall_time_s": run["wall_time_s"], "wall_time_s": round(time.time() - started, 1),
        "curve": [(m["step"], m["accuracy"]) for m in run["metrics"]],
        # of the checkpoint as a table loads it: a table refuses a model that is not this one
        "fingerprint": model_fingerprint(models.load_llama(out / role)),
    }
    atomic_write_json(record, record_path)
    # the saved checkpoint is the run's product (recorded above); the run's copy is not needed
    (out / f"{role}-run" / "state.pt").unlink(missing_ok=True)
    print(f"{role}: validation accuracy {before:.3f} -> {after:.3f} in {steps} steps, "
          f"{record['models'][role]['wall_time_s']:.0f} s -> {out / role}")


record["source"] = {"file": source.name, "val_accuracy": accuracy(base, val),
                    "val_items": len(val)}
# The student is cut from the untouched model, before the teacher's training changes it.
student = models.keep_layers(base, keep)
make("teacher", base, args.teacher_steps, args.lr)
del base
make("student", student, args.student_steps, args.student_lr)
atomic_write_json(record, record_path)
