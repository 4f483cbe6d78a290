"""Worker of tests/test_distributed_distill.py, run as
``torchrun --standalone --nproc-per-node N tests/torchrun_distill.py OUT [--cache DIR]``
(or as one plain process, for the reference).

Distils test_distill's tiny student for a few steps and saves, from rank 0: the first step's loss,
terms and gradients, the trained weights and the logged metrics. Every rank also saves how many rows
its first batch had, so the test can see that the batch was split.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distill import CFG, fresh, head_map, make_items  # noqa: E402

from cdist import distill, distributed, zoo  # noqa: E402
from cdist.teacher_cache import build_teacher_cache  # noqa: E402

torch.set_num_threads(1)
distributed.init_from_env("cpu")
out = Path(sys.argv[1])
cache_dir = sys.argv[sys.argv.index("--cache") + 1] if "--cache" in sys.argv else None
tok = zoo.organism_tokenizer()
train, test = make_items(tok)
cfg = replace(CFG, kd_weight=0.5, shuffle_teacher=True)  # every term, the permutation included
hmap = head_map()

# one step, by hand: the loss and the gradients DDP leaves on the trained weights
student, teacher = fresh(tok, 1), fresh(tok, 2)
if cache_dir:
    teacher = build_teacher_cache(teacher, hmap.sites()[1], {"train": train, "eval": test},
                                  cache_dir, logits=True)
plan = distill._plan(hmap, None, train, test, cfg)
student.requires_grad_(False)
run = distill._Run(student, teacher, plan, cfg, train, test, None)
batch = next(distill._batches(train, cfg.batch_size, cfg.seed, run.pad, plan.columns))
rows = []  # the batch sizes the student's forward passes saw
hook = student.embed.register_forward_hook(lambda module, args, z: rows.append(z.shape[0]))
terms, loss = run.step(batch, distill._permutation(cfg.batch_size, cfg.seed, 0), 1)
hook.remove()
first = {"loss": loss, "rows": rows, **{k: v.detach() for k, v in terms.items()},
         "grads": [p.grad.clone() for p in run.trained]}
torch.save(first, out / f"first-rank{distributed.rank()}.pt")

# a whole run, with its evaluations and checkpoints (written by rank 0)
student = fresh(tok, 1)
result = distill.distill(student, teacher, hmap, train, test, cfg, out / "run", progress=False)
if distributed.is_main():
    torch.save({"weights": {n: p.detach() for n, p in student.named_parameters()},
                "metrics": result["metrics"]}, out / "run.pt")
