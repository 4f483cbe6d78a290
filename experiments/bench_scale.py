"""Discovery, a distillation step and memory at the real Llama-3 shapes, in one run, with random
weights (speed does not depend on them).

    python experiments/bench_scale.py --device cuda              # 8B teacher, 1B student, bfloat16
    python experiments/bench_scale.py --device cuda --student 3b --out results/bench_scale-3b.json
    python experiments/bench_scale.py --teacher tiny --student tiny --prompts 4 --check-prompts 4 \\
        --n-boxes 3 --steps 2 --batch-size 4 --scan-batch-size 4 --train-share 0.25 --threads 2 \\
        --out /tmp/bench_scale.json                               # CPU, what the test runs

Shapes (layers, d_model, heads, key/value heads, d_mlp): ``1b`` Llama-3.2-1B (16, 2048, 32, 8,
8192), ``3b`` Llama-3.2-3B (28, 3072, 24, 8, 8192), ``8b`` Llama-3.1-8B (32, 4096, 32, 8, 14336),
``135m`` SmolLM2-135M's (30, 576, 9, 3, 1536; for CPU runs), ``tiny`` (3, 32, 4, 2, 64); rope
theta 500000, the Llama-3 tokenizer (128,256 ids). [Targets on one H100 in brackets.]

1. The student's full mean-ablation scan of every head on ``--prompts`` Prakash-form prompts (head
   means over the same prompts, timed apart) [1B: 512 heads x 256 prompts under 10 s].
2. The teacher's entity-tracking path-patching search (``ET_SEARCH``) on those prompts [8B: under
   10 minutes]. Random weights clear no noise bar, so each group keeps its top ``--k`` heads
   whatever their effect and every group is searched as on a trained model; the senders each group
   scanned are recorded (receivers in layer 0 leave a group none).
3. bfloat16 against its float32 twin: both models are made in float32; the ablation scan (student)
   and the path-patching scan into the logits (teacher) run on ``--check-prompts`` prompts, then
   again after the cast to bfloat16; the largest absolute score difference is reported beside the
   largest float32 score. The models then take ``--dtype`` (float32 keeps bfloat16-valued weights).
4. Four ``distill`` runs of ``--steps`` + 1 steps, the first a warm-up: CE only, CE + Align CKA on
   the same trained heads, CE + Align CKA training every weight (full fine-tuning), and CE + Align
   CKA from a teacher-activation cache (``cdist.teacher_cache``, its build timed) with the teacher
   moved off the GPU. torch's
   global optimizer hook stamps each step's end after a CUDA synchronize, so a step is forward,
   backward and AdamW without the runs' evaluations (the median step counts); tokens/s = batch x
   prompt length / step [CE + CKA at most 1.10x CE]. The hook also reads AdamW's state (two moments
   per trained weight, in its dtype) [in proportion to the trained share] and, on CUDA, the peak
   memory of the steps after the first (null on the CPU).

Trained heads: ``--train-share`` of the student's (the paper trains 11-15%), spread evenly over its
layers (so the backward pass reaches the first), each paired with a teacher head spread the same way
and read at the three entity-tracking positions in turn. Config, device, commit, torch version and
every number go to ``--out`` (default ``results/bench_scale-<device>.json``).
"""

import argparse
import sys

SHAPES = {"1b": (16, 2048, 32, 8, 8192), "3b": (28, 3072, 24, 8, 8192),
          "8b": (32, 4096, 32, 8, 14336), "135m": (30, 576, 9, 3, 1536), "tiny": (3, 32, 4, 2, 64)}
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
group = parser.add_argument_group("models")
group.add_argument("--teacher", default="8b", choices=SHAPES, help="the teacher's shape")
group.add_argument("--student", default="1b", choices=SHAPES, help="the student's shape")
group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
group.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="both models' weights (default: bfloat16 on cuda, else float32)")
group.add_argument("--seed", type=int, default=0, help="weights, prompts and data order")
group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
group = parser.add_argument_group("discovery")
group.add_argument("--prompts", type=int, default=256, help="prompts of the timed scans")
group.add_argument("--n-boxes", type=int, default=7, help="boxes per prompt")
group.add_argument("--check-prompts", type=int, default=32,
                   help="prompts of the bfloat16-against-float32 scans (at least 4)")
group.add_argument("--scan-batch-size", type=int, default=32, help="prompts per scan batch")
group.add_argument("--heads-per-pass", type=int, default=16, help="heads or senders per pass")
group.add_argument("--memory-budget", type=float, default=None,
                   help="GiB the timed ablation scan may hold (replaces its batch size)")
group.add_argument("--k", type=int, default=2, help="heads per group of the search")
group = parser.add_argument_group("distillation")
group.add_argument("--steps", type=int, default=10, help="timed steps per run (>= 1)")
group.add_argument("--batch-size", type=int, default=32, help="prompts per step (CKA's m)")
group.add_argument("--train-share", type=float, default=0.125,
                   help="share of the student's heads that are trained and CKA-paired")
group = parser.add_argument_group("parts and output")
for part in ("ablation", "search", "check", "distill"):
    group.add_argument(f"--no-{part}", action="store_true", help=f"skip the {part} measurement")
group.add_argument("--out", default=None, help="the results file")
args = parser.parse_args()
if args.steps < 1 or args.check_prompts < 4 or args.batch_size < 2:
    parser.error("--steps >= 1, --check-prompts >= 4 and --batch-size >= 2 are needed")

import math  # noqa: E402  (after argparse, so that --help answers at once)
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from cdist import tasks  # noqa: E402
from cdist.checkpoints import atomic_write_json  # noqa: E402
from cdist.discovery import ablation, path_patching  # noqa: E402
from cdist.discovery.search import ET_SEARCH, entity_tracking_circuit  # noqa: E402
from cdist.distill import DistillConfig, distill  # noqa: E402
from cdist.errors import InputError  # noqa: E402
from cdist.matching import HeadMap  # noqa: E402
from cdist.models import cast, check_device, new_llama  # noqa: E402
from cdist.provenance import device_name, git_commit, synchronize, timed  # noqa: E402
from cdist.teacher_cache import build_teacher_cache  # noqa: E402
from cdist.tokenizers import llama3_tokenizer  # noqa: E402
from cdist.types import Head, HeadPair  # noqa: E402

# --------------------------------------------------------------------------------------------------
# config, models, prompts
# --------------------------------------------------------------------------------------------------
if args.threads:
    torch.set_num_threads(args.threads)
try:
    device = check_device(args.device)
except InputError as err:
    parser.error(str(err))
on_gpu = device.type == "cuda"
if on_gpu:  # the memory counters and synchronize read this one; plain "cuda" is the first GPU
    torch.cuda.set_device(device.index or 0)
dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
machine = device_name(args.device)
out = args.out or f"results/bench_scale-{args.device.split(':')[0]}.json"
results: dict = {}
tokenizer = llama3_tokenizer()


def build(shape: str, seed: int):
    print(f"making the {shape} model ...", file=sys.stderr, flush=True)
    layers, width, heads, kv, mlp = SHAPES[shape]
    return new_llama(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=kv, d_mlp=mlp,
                     vocab_size=len(tokenizer), rope_theta=500000.0, seed=seed, tokenizer=tokenizer,
                     device=args.device, dtype=dtype if args.no_check else torch.float32).eval()


def spread(model, n: int) -> list[Head]:
    """n heads evenly over a model's flat head index (every layer, for n >= its layers)."""
    total, per = model.cfg.n_layers * model.cfg.n_heads, model.cfg.n_heads
    return [Head(i // per, i % per) for i in (j * total // n for j in range(n))]


make = dict(tokenizer=tokenizer, n_boxes=args.n_boxes)
data = tasks.entity_tracking(args.prompts, seed=args.seed + 1, split="test", **make)
check = data.select(range(min(args.check_prompts, len(data))))  # also the runs' evaluation items
train = tasks.entity_tracking(max(args.batch_size, args.prompts), seed=args.seed + 2, **make)
tokens = args.batch_size * sum(map(len, train["input_ids"])) / len(train)  # a step's prompts
scan_kw = dict(batch_size=args.scan_batch_size, heads_per_pass=args.heads_per_pass)
patch_kw = dict(batch_size=min(args.scan_batch_size, 16), senders_per_pass=args.heads_per_pass)
student, teacher = build(args.student, args.seed), build(args.teacher, args.seed + 1)
n_s, n_t = (m.cfg.n_layers * m.cfg.n_heads for m in (student, teacher))
print(f"teacher {args.teacher} ({n_t} heads), student {args.student} ({n_s} heads), "
      f"{str(dtype)[6:]}, on {machine}")

# --------------------------------------------------------------------------------------------------
# discovery: bfloat16 against float32 twins, then the timed scans
# --------------------------------------------------------------------------------------------------
twins = {"ablation": (student, not args.no_ablation, lambda items: ablation.head_ablation_scan(
             student, items, means=ablation.head_means(student, items), **scan_kw)),
         "path_patching": (teacher, not args.no_search,
                           lambda items: path_patching.path_patching_scan(teacher, items,
                                                                          **patch_kw))}
for name, (model, wanted, scan) in twins.items():
    if args.no_check or not wanted:
        continue
    fp32 = scan(check)
    cast(model, torch.bfloat16)
    bf16 = scan(check)
    metric = fp32.metric
    diff = (bf16[metric] - fp32[metric]).abs().max().item()
    scale = fp32[metric].abs().max().item()
    results[f"{name}_bf16_vs_fp32"] = {"metric": metric, "max_abs_diff": diff,
                                       "max_abs_fp32": scale, "prompts": len(check)}
    print(f"{name}, bfloat16 vs float32: max |{metric} difference| {diff:.2e}, largest "
          f"|{metric}| {scale:.2e} ({diff / scale if scale else math.nan:.1%}), "
          f"{len(check)} prompts")
for model in (student, teacher):
    cast(model, dtype)
if not args.no_ablation:
    means, t_means = timed(lambda: ablation.head_means(student, data), args.device)
    ablation.head_ablation_scan(student, data.select([0]), means=means, **scan_kw)  # warm-up
    _, t_scan = timed(lambda: ablation.head_ablation_scan(
        student, data, means=means, memory_budget=args.memory_budget, **scan_kw), args.device)
    results["ablation_scan"] = {"seconds": t_scan, "means_seconds": t_means, "heads": n_s,
                                "prompts": len(data), "target_s": 10.0}
    print(f"full ablation scan: {n_s} heads x {len(data)} prompts in {t_scan:.2f} s "
          f"({t_scan / 10:.2f}x the 10 s target); head means {t_means:.2f} s")
if not args.no_search:
    (circuit, _), t_search = timed(lambda: entity_tracking_circuit(
        teacher, data, k=args.k, min_effect=-math.inf, progress=True, **patch_kw), args.device)
    senders = {s.name: n_t if s.receivers is None else teacher.cfg.n_heads * max(
        (h.layer for h in circuit.groups[s.receivers]), default=0) for s in ET_SEARCH}
    results["path_patching_search"] = {
        "seconds": t_search, "prompts": len(data), "target_s": 600.0, "senders": senders,
        "groups": {g: [str(h) for h in hs] for g, hs in circuit.groups.items()}}
    print(f"path-patching search: {len(data)} prompts in {t_search:.1f} s ({t_search / 600:.2f}x "
          f"the 10 min target); senders per group {list(senders.values())} of {n_t}")

# --------------------------------------------------------------------------------------------------
# distillation: a step's time, AdamW's state, peak memory
# --------------------------------------------------------------------------------------------------


def timed_run(cfg: DistillConfig, head_map: HeadMap | None, heads: list[Head],
              source=None) -> dict:
    """Run ``distill``; torch's global optimizer hook stamps each step's end, reads AdamW's state
    after the last step and, on CUDA, the peak memory of the steps after the first."""
    stamps, state = [], {}

    def after_step(opt, *_):
        synchronize(args.device)
        stamps.append(time.perf_counter())
        if len(stamps) == 1 and on_gpu:
            torch.cuda.reset_peak_memory_stats()  # the first step warms up
        if len(stamps) == cfg.steps:
            held = [(key, t) for s in opt.state.values() for key, t in s.items()
                    if torch.is_tensor(t)]
            moments = [t for key, t in held if key in ("exp_avg", "exp_avg_sq")]
            state.update(elements=sum(t.numel() for t in moments), dtype=str(moments[0].dtype)[6:],
                         bytes=sum(t.nbytes for _, t in held),  # AdamW's step counters too
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None)

    resident = torch.cuda.memory_allocated() / 2**30 if on_gpu else None
    hook = register_optimizer_step_post_hook(after_step)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            result = distill(student, source or teacher, head_map, train, check, cfg, run_dir,
                             heads=heads)
    finally:
        hook.remove()
        student.zero_grad(set_to_none=True)  # full training leaves its gradients on the weights
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    step = statistics.median(steps)
    return {"step_s": step, "step_times_s": steps, "tokens_per_s": tokens / step,
            "trained_params": result["trainable"]["params"],
            "param_share": result["trainable"]["param_share"],
            "optimizer_state_elements": state["elements"], "optimizer_state_bytes": state["bytes"],
            "moment_dtype": state["dtype"], "peak_gib": state["peak_gib"],
            "resident_gib": resident}


if not args.no_distill:
    n_pairs = max(1, round(args.train_share * n_s))
    trained, places = spread(student, n_pairs), ("pos_last", "pos_query_label", "pos_prev_label")
    pairs = tuple(HeadPair(s, t, places[i % 3], places[i % 3])
                  for i, (s, t) in enumerate(zip(trained, spread(teacher, n_pairs), strict=True)))
    head_map = HeadMap(pairs, tuple(trained), tuple(p.teacher for p in pairs),
                       torch.zeros(n_pairs, n_pairs), "distance", "manual")
    base = DistillConfig(steps=args.steps + 1, lr=1e-5, batch_size=args.batch_size,
                         eval_every=args.steps + 1, seed=args.seed)
    runs = {"ce": ("CE only", base, None),
            "ce_cka": ("CE + Align CKA", replace(base, cka_weight=1.0), head_map),
            "full_ce_cka": ("full, CE + Align CKA",
                            replace(base, cka_weight=1.0, trainable="all"), head_map)}
    with tempfile.TemporaryDirectory() as cache_dir:
        # the teacher's side stored once; its run trains with the teacher off the GPU
        cache, t_cache = timed(lambda: build_teacher_cache(
            teacher, head_map.sites()[1], {"train": train, "eval": check}, cache_dir), args.device)
        runs["cached_ce_cka"] = ("CE + Align CKA, teacher cache", runs["ce_cka"][1], head_map)
    for key, (label, cfg, head_map_here) in runs.items():
        if key == "cached_ce_cka" and on_gpu:
            teacher.to("cpu")
            torch.cuda.empty_cache()
        r = results[f"distill_{key}"] = timed_run(cfg, head_map_here, trained,
                                                  cache if key == "cached_ce_cka" else None)
        peak = (f"peak {r['peak_gib']:.2f} GiB (models {r['resident_gib']:.2f})" if on_gpu
                else "peak memory n/a on the CPU")
        print(f"distill step, {label}: {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} "
              f"tokens/s, {peak}, AdamW state {r['optimizer_state_bytes'] / 2**20:.3g} MiB "
              f"({r['moment_dtype']}), {r['param_share']:.2%} of the weights trained")
    ce, cka, full, cached = (results[f"distill_{key}"] for key in runs)
    summary = results["distill"] = {
        "trained_heads": n_pairs, "tokens_per_step": tokens, "target_cka_over_ce": 1.10,
        "cka_over_ce": cka["step_s"] / ce["step_s"], "cache_build_s": t_cache,
        "cached_over_live": cached["step_s"] / cka["step_s"],
        "cached_peak_ratio": cached["peak_gib"] / cka["peak_gib"] if on_gpu else None,
        "state_ratio": cka["optimizer_state_elements"] / full["optimizer_state_elements"],
        "state_bytes_ratio": cka["optimizer_state_bytes"] / full["optimizer_state_bytes"],
        "param_ratio": cka["trained_params"] / full["trained_params"],
        "peak_ratio": cka["peak_gib"] / full["peak_gib"] if on_gpu else None}
    print(f"CE + CKA step / CE step {summary['cka_over_ce']:.3f}x (target <= 1.10x); circuit / "
          f"full: AdamW state {summary['state_ratio']:.5f}x ({summary['state_bytes_ratio']:.5f}x "
          f"in bytes), trained weights {summary['param_ratio']:.5f}x"
          + (f", peak memory {summary['peak_ratio']:.3f}x" if on_gpu else ""))
    print(f"teacher cache: built in {t_cache:.1f} s; a step from it / a step with the live teacher "
          f"{summary['cached_over_live']:.3f}x"
          + (f", peak memory {summary['cached_peak_ratio']:.3f}x" if on_gpu else ""))

# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------
if not on_gpu:
    results["note"] = "peak GPU memory is not measured on the CPU (null)"
atomic_write_json({"config": vars(args) | {"dtype": str(dtype)[6:], "out": out},
                   "device": machine, "commit": git_commit(), "torch": torch.__version__,
                   "shapes": {"teacher": SHAPES[args.teacher], "student": SHAPES[args.student]},
                   "results": results}, out)
print(f"wrote {out}")
