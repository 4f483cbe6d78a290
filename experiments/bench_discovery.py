"""Time the batched discovery scans against their one-at-a-time twins, on the same model and data.

    python experiments/bench_discovery.py  # et-teacher from the zoo, CPU
    python experiments/bench_discovery.py --model llama-3.2-1b --device cuda --items 256 \\
        --reference-items 4

For each of the mean-ablation scan, path patching into the logits (value fetchers) and path
patching into the values of two receiver heads (position detectors), it runs the batched function
and its ``*_reference`` twin on the same ``--reference-items`` items, checks that they agree (max
abs difference of the scores), and prints both times, the speed-up and heads per second. Then it
times the batched ablation scan alone over ``--items`` items. ``--model llama-3.2-1b`` is a
Llama-3.2-1B-shaped model with random weights (16 layers, 32 heads, 8 key/value heads, d_model
2048) and the real Llama-3 tokenizer; speed does not depend on weights. Results go to
results/bench_discovery-<model>-<device>.json with the config, device name and commit.
"""

import argparse
import time

import torch

from cdist import tasks, zoo
from cdist.checkpoints import atomic_write_json
from cdist.discovery import ablation, path_patching
from cdist.models import new_llama
from cdist.provenance import git_commit
from cdist.tokenizers import llama3_tokenizer
from cdist.types import Head

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="et-teacher",
                    help="a zoo model, or llama-3.2-1b / random (random weights)")
parser.add_argument("--shape", type=int, nargs=5, default=[16, 2048, 32, 8, 8192],
                    metavar=("LAYERS", "D_MODEL", "HEADS", "KV_HEADS", "D_MLP"),
                    help="--model random: its shape")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--items", type=int, default=256, help="items for the timed full ablation scan")
parser.add_argument("--reference-items", type=int, default=16,
                    help="items for the batched-vs-reference runs")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--heads-per-pass", type=int, default=16)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--repeats", type=int, default=3,
                    help="timed calls per side; the best one counts")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)

if args.model in ("llama-3.2-1b", "random"):
    tokenizer = llama3_tokenizer()
    layers, width, heads, kv, mlp = ([16, 2048, 32, 8, 8192] if args.model == "llama-3.2-1b"
                                     else args.shape)
    model = new_llama(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=kv, d_mlp=mlp,
                      vocab_size=len(tokenizer), seed=args.seed, tokenizer=tokenizer,
                      rope_theta=500000.0).to(args.device, dtype).eval()
    make = dict(template="prakash")
elif args.model in zoo.names():
    model, tokenizer = zoo.load(args.model, device=args.device)
    model = model.to(dtype)
    make = dict(template=zoo.manifest(args.model)["config"]["template"])
else:
    parser.error(f"unknown model {args.model!r}; choose llama-3.2-1b, random or one of "
                 f"{zoo.names()}")
data = tasks.entity_tracking(args.items, tokenizer=tokenizer, seed=args.seed + 1, split="test",
                             **make)
small = data.select(range(min(args.reference_items, len(data))))
reference = tasks.entity_tracking(64, tokenizer=tokenizer, seed=args.seed + 2, split="test",
                                  **make)
n_heads = model.cfg.n_layers * model.cfg.n_heads
on_gpu = args.device.startswith("cuda")
device_name = (torch.cuda.get_device_name() if on_gpu
               else f"CPU ({torch.get_num_threads()} threads)")


def timed(fn, repeats: int = 1):
    """fn's result and its best wall time over ``repeats`` calls (the least disturbed one, as
    timeit does)."""
    times = []
    for _ in range(repeats):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, min(times)


means = ablation.head_means(model, reference)
top = model.cfg.n_layers - 1
receivers = [Head(top, 0), Head(top, model.cfg.n_heads - 1)]
cases = {
    "ablation_scan": (
        lambda: ablation.head_ablation_scan(model, small, means=means, batch_size=args.batch_size,
                                            heads_per_pass=args.heads_per_pass)["prob_drop"],
        lambda: ablation.head_ablation_scan_reference(model, small, means=means)["prob_drop"],
    ),
    "path_patching_logits": (
        lambda: path_patching.path_patching_scan(
            model, small, batch_size=args.batch_size,
            senders_per_pass=args.heads_per_pass)["relative_change"],
        lambda: path_patching.path_patching_scan_reference(model, small)["relative_change"],
    ),
    "path_patching_values": (
        lambda: path_patching.path_patching_scan(
            model, small, receivers=receivers, receiver_input="v", position="pos_query_label",
            batch_size=args.batch_size, senders_per_pass=args.heads_per_pass)["relative_change"],
        lambda: path_patching.path_patching_scan_reference(
            model, small, receivers=receivers, receiver_input="v",
            position="pos_query_label")["relative_change"],
    ),
}
print(f"{args.model} ({n_heads} heads) on {device_name}, {args.dtype}; "
      f"{len(small)} items per comparison")
results = {}
for name, (fast, slow) in cases.items():
    fast()  # warm-up (kernels, allocator)
    got, t_fast = timed(fast, args.repeats)
    want, t_slow = timed(slow, args.repeats)
    diff = (got - want).abs().max().item()
    results[name] = {"batched_s": t_fast, "reference_s": t_slow, "speedup": t_slow / t_fast,
                     "max_abs_diff": diff, "heads_per_s_batched": n_heads / t_fast,
                     "items": len(small)}
    print(f"{name:>22}: batched {t_fast:7.2f} s, reference {t_slow:8.2f} s, "
          f"speed-up {t_slow / t_fast:6.1f}x, "
          f"{n_heads / t_fast:8.1f} heads/s, max |diff| {diff:.2e}")
_, t_full = timed(lambda: ablation.head_ablation_scan(model, data, means=means,
                                                      batch_size=args.batch_size,
                                                      heads_per_pass=args.heads_per_pass))
results["full_ablation_scan"] = {"seconds": t_full, "items": len(data), "heads": n_heads}
print(f"full ablation scan: {n_heads} heads x {len(data)} items in {t_full:.2f} s")
path = f"results/bench_discovery-{args.model}-{args.device.split(':')[0]}.json"
atomic_write_json({"config": vars(args), "device": device_name, "commit": git_commit(),
                   "results": results}, path)
print(f"wrote {path}")
