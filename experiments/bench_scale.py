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
2. The teacher's entity-tracking path-patching search (``ET_SEARCH``, Prakash et al. 2024) on those
   prompts [8B: under 10 minutes]. Random weights clear no noise bar, so each group keeps its top
   ``--k`` heads whatever their effect and every group is searched as on a trained model; the
   senders each group scanned are recorded (receivers in layer 0 leave a group none).
3. bfloat16 against its float32 twin: both models are made in float32; the ablation scan (student)
   and the path-patching scan into the logits (teacher) run on ``--check-prompts`` prompts, then
   again after the cast to bfloat16; the largest absolute score difference is reported beside the
   largest float32 score. The models then take ``--dtype`` (float32 keeps bfloat16-valued weights).
4. Four ``distill`` runs of ``--steps`` + 1 steps, the first a warm-up: CE only, CE + Align CKA on
   the same trained heads, CE + Align CKA training every weight (full fine-tuning), and CE + Align
   CKA from a teacher-activation cache (``cdist.teacher_cache``, its build timed) with the teacher
   moved off the GPU. A step is forward, backward and AdamW, timed by the optimizer's clock
   (``bench_common.distill_clock``) without the runs' evaluations (the median step counts);
   tokens/s = batch x prompt length / step [CE + CKA at most 1.10x CE]. AdamW's state [in
   proportion to the trained share] and, on CUDA, peak memory are read beside it.

Trained heads: ``--train-share`` of the student's (the paper trains 11-15%), spread evenly over its
layers (so the backward pass reaches the first), each paired with a teacher head spread the same way
and read at the three entity-tracking positions in turn. Config, device, commit, torch version and
every number go to ``--out`` (default ``results/bench_scale-<device>.json``).
"""

import bench_common as bench

# ---- config --------------------------------------------------------------------------------------
SHAPES = {"1b": (16, 2048, 32, 8, 8192), "3b": (28, 3072, 24, 8, 8192),
          "8b": (32, 4096, 32, 8, 14336), "135m": (30, 576, 9, 3, 1536), "tiny": (3, 32, 4, 2, 64)}
parser = bench.parser(__doc__)
group = parser.add_argument_group("models")
group.add_argument("--teacher", default="8b", choices=SHAPES, help="the teacher's shape")
group.add_argument("--student", default="1b", choices=SHAPES, help="the student's shape")
bench.add_machine_args(group, dtype_default=None, dtype_choices=["bfloat16", "float32"],
                       dtype_help="both models' weights (default: bfloat16 on cuda, else float32)")
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
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from cdist import tasks  # noqa: E402
from cdist.discovery import ablation, path_patching  # noqa: E402
from cdist.discovery.search import ET_SEARCH, entity_tracking_circuit  # noqa: E402
from cdist.distill import DistillConfig, distill  # noqa: E402
from cdist.models import cast  # noqa: E402
from cdist.provenance import device_name, timed  # noqa: E402
from cdist.teacher_cache import build_teacher_cache  # noqa: E402
from cdist.tokenizers import llama3_tokenizer  # noqa: E402

on_gpu = bench.setup_machine(parser, args).type == "cuda"
dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
machine = device_name(args.device)
out = args.out or f"results/bench_scale-{args.device.split(':')[0]}.json"
results: dict = {}

# ---- load: models and prompts --------------------------------------------------------------------
tokenizer = llama3_tokenizer()
make = dict(tokenizer=tokenizer, n_boxes=args.n_boxes)
data = tasks.entity_tracking(args.prompts, seed=args.seed + 1, split="test", **make)
check = data.select(range(min(args.check_prompts, len(data))))  # also the runs' evaluation items
train = tasks.entity_tracking(max(args.batch_size, args.prompts), seed=args.seed + 2, **make)
tokens = args.batch_size * sum(map(len, train["input_ids"])) / len(train)  # a step's prompts
scan_kw = dict(batch_size=args.scan_batch_size, heads_per_pass=args.heads_per_pass)
patch_kw = dict(batch_size=min(args.scan_batch_size, 16), senders_per_pass=args.heads_per_pass)
student, teacher = (bench.random_llama(SHAPES[shape], tokenizer, seed=seed, device=args.device,
                                       dtype=dtype if args.no_check else torch.float32, name=shape)
                    for shape, seed in ((args.student, args.seed), (args.teacher, args.seed + 1)))
n_s, n_t = (m.cfg.n_layers * m.cfg.n_heads for m in (student, teacher))
print(f"teacher {args.teacher} ({n_t} heads), student {args.student} ({n_s} heads), "
      f"{str(dtype)[6:]}, on {machine}")

# ---- run: discovery, bfloat16 against float32 twins first, then the timed scans ------------------
twins = {"ablation": (student, not args.no_ablation, lambda items: ablation.head_ablation_scan(
             student, items, means=ablation.head_means(student, items), **scan_kw)),
         "path_patching": (teacher, not args.no_search, lambda items:
                           path_patching.path_patching_scan(teacher, items, **patch_kw))}
for name, (model, wanted, scan) in twins.items():
    if wanted and not args.no_check:
        results[f"{name}_bf16_vs_fp32"] = bench.dtype_drift(name, model, scan, check)
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

# ---- run: distillation, a step's time, AdamW's state, peak memory --------------------------------
if not args.no_distill:
    n_pairs = max(1, round(args.train_share * n_s))
    trained, head_map = bench.spread_head_map(student, teacher, n_pairs)
    base = DistillConfig(steps=args.steps + 1, lr=1e-5, batch_size=args.batch_size,
                         eval_every=args.steps + 1, seed=args.seed)
    cka = replace(base, cka_weight=1.0)
    runs = {"ce": ("CE only", base, None), "ce_cka": ("CE + Align CKA", cka, head_map),
            "full_ce_cka": ("full, CE + Align CKA", replace(cka, trainable="all"), head_map)}
    with tempfile.TemporaryDirectory() as cache_dir:
        # the teacher's side stored once; its run trains with the teacher off the GPU
        cache, t_cache = timed(lambda: build_teacher_cache(
            teacher, head_map.sites()[1], {"train": train, "eval": check}, cache_dir), args.device)
        runs["cached_ce_cka"] = ("CE + Align CKA, teacher cache", cka, head_map)
    for key, (label, cfg, hm) in runs.items():
        if key == "cached_ce_cka" and on_gpu:
            teacher.to("cpu")
            torch.cuda.empty_cache()
        source = cache if key == "cached_ce_cka" else teacher
        results[f"distill_{key}"] = bench.distill_clock(
            lambda run_dir, cfg=cfg, hm=hm, source=source: distill(
                student, source, hm, train, check, cfg, run_dir, heads=trained),
            cfg.steps, args.device, label=label, tokens=tokens)
        student.zero_grad(set_to_none=True)  # full training leaves its gradients on the weights
    results["distill"] = bench.distill_summary(*(results[f"distill_{key}"] for key in runs),
                                               n_pairs, tokens, t_cache, on_gpu)

# ---- save ----------------------------------------------------------------------------------------
if not on_gpu:
    results["note"] = "peak GPU memory is not measured on the CPU (null)"
bench.save_results(out, vars(args) | {"dtype": str(dtype)[6:], "out": out}, machine, results,
                   torch=torch.__version__,
                   shapes={"teacher": SHAPES[args.teacher], "student": SHAPES[args.student]})
