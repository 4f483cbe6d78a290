"""Time the batched discovery scans against their one-at-a-time twins, and against TransformerLens,
on the same model and data; time the entity-tracking search and measure its pre-filter's recall.

    python experiments/bench_discovery.py  # et-teacher from the zoo, CPU
    python experiments/bench_discovery.py --model llama-3.2-1b --device cuda --items 256 \\
        --reference-items 4
    python experiments/bench_discovery.py --model smollm2 --no-reference --items 64 \\
        --search-items 64 --prefilter 30 --tl-items 16   # SmolLM2 (30 layers, 270 heads)

``--model`` is a zoo model, a checkpoint directory or ``.gguf`` file, ``smollm2`` (the GGUF file of
``cdist.pretrained``), or ``llama-3.2-1b`` / ``random``: random weights in Llama-3.2-1B's shape (16
layers, 32 heads, 8 key/value heads, d_model 2048) or ``--shape``, with the real Llama-3 tokenizer
(speed does not depend on weights).

1. Unless ``--no-reference``: for the mean-ablation scan, path patching into the logits (value
   fetchers) and path patching into the values of two receiver heads (position detectors), the
   batched function and its ``*_reference`` twin run on the same ``--reference-items`` items; both
   times, the speed-up, heads per second and the max abs difference of the scores are printed.
2. The batched mean-ablation scan of every head over ``--items`` items.
3. ``--tl-items N``: activation patching of every head's output at every position, cdist's
   ``activation_patching_scan`` against TransformerLens's ``get_act_patch_attn_head_out_all_pos`` on
   the same N items and metric (the mean answer probability): both times and the max difference.
4. ``--search-items N``: the entity-tracking path-patching search (``ET_SEARCH``) on N items, exact
   (every sender) and with ``--prefilter P`` (path attribution's top P senders per group); then the
   pre-filter's recall, group by group, against the exact search: path attribution is run with the
   exact search's receivers, and the recall is the share of the exact search's chosen heads, and of
   its top ``--recall-top`` heads, that are among attribution's top P (with the Spearman
   correlation of the two rankings over every head).

Results go to results/bench_discovery-<model>-<device>.json with the config, device name and commit.
"""

import argparse
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="et-teacher",
                    help="a zoo model, a checkpoint directory or .gguf file, smollm2, or "
                         "llama-3.2-1b / random (random weights)")
parser.add_argument("--shape", type=int, nargs=5, default=[16, 2048, 32, 8, 8192],
                    metavar=("LAYERS", "D_MODEL", "HEADS", "KV_HEADS", "D_MLP"),
                    help="--model random: its shape")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--template", default=None,
                    help="the items' template (default: a zoo model's own, else prakash)")
parser.add_argument("--n-boxes", type=int, default=None,
                    help="boxes per item (default: the generator's, 7)")
parser.add_argument("--items", type=int, default=256, help="items for the timed full ablation scan")
parser.add_argument("--reference-items", type=int, default=16,
                    help="items for the batched-vs-reference runs")
parser.add_argument("--no-reference", action="store_true",
                    help="skip the batched-vs-reference runs (the twins are slow at real depth)")
parser.add_argument("--tl-items", type=int, default=0,
                    help="items for the TransformerLens comparison (0: skip it)")
parser.add_argument("--search-items", type=int, default=0,
                    help="items for the entity-tracking search (0: skip it)")
parser.add_argument("--prefilter", type=int, default=30,
                    help="senders per group that the pre-filtered search scans exactly")
parser.add_argument("--recall-top", type=int, default=10,
                    help="the exact search's top heads per group whose recall is reported")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--heads-per-pass", type=int, default=16)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--repeats", type=int, default=3,
                    help="timed calls per side; the best one counts")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()

import torch  # noqa: E402  (after argparse, so that --help answers at once)
from scipy.stats import spearmanr  # noqa: E402

from cdist import tasks, zoo  # noqa: E402
from cdist.checkpoints import atomic_write_json  # noqa: E402
from cdist.discovery import ablation, activation_patching, path_patching  # noqa: E402
from cdist.discovery.attribution_patching import path_attribution_scan  # noqa: E402
from cdist.discovery.search import ET_SEARCH, entity_tracking_circuit  # noqa: E402
from cdist.errors import InputError  # noqa: E402
from cdist.models import cast, check_device, load_llama, new_llama  # noqa: E402
from cdist.provenance import device_name, git_commit, timed  # noqa: E402
from cdist.tokenizers import llama3_tokenizer  # noqa: E402
from cdist.types import Head  # noqa: E402

try:
    check_device(args.device)
except InputError as err:
    parser.error(str(err))

if args.threads:
    torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)

template = args.template or "prakash"
if args.model in ("llama-3.2-1b", "random"):
    tokenizer = llama3_tokenizer()
    layers, width, heads, kv, mlp = ([16, 2048, 32, 8, 8192] if args.model == "llama-3.2-1b"
                                     else args.shape)
    model = new_llama(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=kv, d_mlp=mlp,
                      vocab_size=len(tokenizer), seed=args.seed, tokenizer=tokenizer,
                      rope_theta=500000.0, device=args.device, dtype=dtype).eval()
    name = args.model
elif args.model in zoo.names():
    model, tokenizer = zoo.load(args.model, device=args.device)
    model = cast(model, dtype)
    template = args.template or zoo.manifest(args.model)["config"]["template"]
    name = args.model
elif args.model == "smollm2" or Path(args.model).is_dir() or args.model.endswith(".gguf"):
    from cdist.pretrained import smollm2_gguf

    source = smollm2_gguf() if args.model == "smollm2" else Path(args.model)
    if not source.exists():
        parser.error(f"{source} does not exist; give a checkpoint directory or .gguf file")
    model = load_llama(source, device=args.device, dtype=dtype)
    tokenizer, name = model.tokenizer, source.stem if source.suffix else source.name
else:
    parser.error(f"unknown model {args.model!r}; choose a zoo model ({zoo.names()}), a checkpoint "
                 "directory or .gguf file, smollm2, llama-3.2-1b or random")
make = dict(template=template) | ({"n_boxes": args.n_boxes} if args.n_boxes else {})
data = tasks.entity_tracking(max(args.items, args.tl_items, args.search_items),
                             tokenizer=tokenizer, seed=args.seed + 1, split="test", **make)
small = data.select(range(min(args.reference_items, len(data))))
reference = tasks.entity_tracking(64, tokenizer=tokenizer, seed=args.seed + 2, split="test",
                                  **make)
n_heads = model.cfg.n_layers * model.cfg.n_heads
machine = device_name(args.device)


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
print(f"{name} ({n_heads} heads) on {machine}, {args.dtype}")
results = {}
for case, (fast, slow) in ({} if args.no_reference else cases).items():
    fast()  # warm-up (kernels, allocator)
    got, t_fast = timed(fast, args.device, args.repeats)
    want, t_slow = timed(slow, args.device, args.repeats)
    diff = (got - want).abs().max().item()
    results[case] = {"batched_s": t_fast, "reference_s": t_slow, "speedup": t_slow / t_fast,
                     "max_abs_diff": diff, "heads_per_s_batched": n_heads / t_fast,
                     "items": len(small)}
    print(f"{case:>22}: batched {t_fast:7.2f} s, reference {t_slow:8.2f} s, "
          f"speed-up {t_slow / t_fast:6.1f}x, "
          f"{n_heads / t_fast:8.1f} heads/s, max |diff| {diff:.2e} ({len(small)} items)")
full = data.select(range(args.items))
_, t_full = timed(lambda: ablation.head_ablation_scan(model, full, means=means,
                                                      batch_size=args.batch_size,
                                                      heads_per_pass=args.heads_per_pass),
                  args.device)
results["full_ablation_scan"] = {"seconds": t_full, "items": len(full), "heads": n_heads}
print(f"full ablation scan: {n_heads} heads x {len(full)} items in {t_full:.2f} s")

if args.tl_items:
    from transformer_lens import patching as tl_patching

    items = data.select(range(args.tl_items))
    if len({len(ids) for ids in items["input_ids"]}) > 1:
        parser.error("--tl-items: the items differ in length, and TransformerLens's helper takes "
                     "one unpadded batch; use a template and tokenizer that give equal lengths")
    clean = torch.tensor(items["input_ids"], device=args.device)
    corrupt = torch.tensor(items["corrupt_input_ids"], device=args.device)
    answer = torch.tensor(items["answer_id"], device=args.device)
    last = torch.tensor(items["pos_last"], device=args.device)
    rows = torch.arange(len(items), device=args.device)

    def mean_prob(logits):
        return logits[rows, last].float().softmax(-1)[rows, answer].mean()

    def theirs():
        with torch.no_grad():
            _, corrupt_cache = model.run_with_cache(corrupt)
            return tl_patching.get_act_patch_attn_head_out_all_pos(model, clean, corrupt_cache,
                                                                   mean_prob)

    def ours():
        with torch.no_grad():
            base = mean_prob(model(clean))
        scan = activation_patching.activation_patching_scan(
            model, items, batch_size=args.batch_size, heads_per_pass=args.heads_per_pass)
        return scan["prob_change"].double() + base.double().cpu()

    got, t_ours = timed(ours, args.device, args.repeats)
    want, t_tl = timed(theirs, args.device)  # minutes at real depth: once
    want = want.double().cpu()
    diff = (got - want).abs().max().item()
    # the five heads whose patching lowers the answer's probability most, in order
    same_top5 = torch.equal(got.flatten().argsort()[:5], want.flatten().argsort()[:5])
    results["transformer_lens_activation_patching"] = {
        "cdist_s": t_ours, "transformer_lens_s": t_tl, "speedup": t_tl / t_ours,
        "max_abs_diff": diff, "same_top5": same_top5, "items": len(items)}
    print(f"activation patching, {len(items)} items: cdist {t_ours:.1f} s, TransformerLens "
          f"{t_tl:.1f} s ({t_tl / t_ours:.1f}x), max |diff| {diff:.1e}, same top 5: {same_top5}")

if args.search_items:
    items = data.select(range(args.search_items))
    search = ET_SEARCH
    kw = dict(batch_size=min(args.batch_size, 16), senders_per_pass=args.heads_per_pass)
    (exact, exact_scans), t_exact = timed(lambda: entity_tracking_circuit(
        model, items, search=search, **kw), args.device)
    (pre, _), t_pre = timed(lambda: entity_tracking_circuit(
        model, items, search=search, prefilter=args.prefilter, **kw), args.device)
    recall = {}
    for step in search:
        receivers = exact.groups[step.receivers] if step.receivers else ()
        if step.receivers and not receivers:
            continue
        attribution = path_attribution_scan(model, items, receivers=receivers,
                                            receiver_input=step.receiver_input,
                                            position=step.position, batch_size=kw["batch_size"])
        candidates = set(attribution.ranking().top(args.prefilter))
        exact_scan = exact_scans[step.name]
        chosen = exact.groups[step.name]
        # Only senders below the last receiver can reach it (the others score 0 in both scans and
        # would pad the top heads and the correlation), and only a head that lowers the answer's
        # probability counts among the exact search's top heads.
        reach = max((r.layer for r in receivers), default=model.cfg.n_layers) * model.cfg.n_heads
        exact_scores = exact_scan[exact_scan.metric].flatten()[:reach]
        top = [h for h in exact_scan.ranking().top(args.recall_top)
               if exact_scores[h.layer * model.cfg.n_heads + h.head] < 0]
        rho = spearmanr(exact_scores, attribution[attribution.metric].flatten()[:reach]).statistic
        recall[step.name] = {
            "chosen": [str(h) for h in chosen],
            "chosen_recall": (sum(h in candidates for h in chosen) / len(chosen)
                              if chosen else None),
            f"top{args.recall_top}": [str(h) for h in top],
            f"top{args.recall_top}_recall": (sum(h in candidates for h in top) / len(top)
                                             if top else None),
            "spearman": float(rho)}
        print(f"  {step.name}: chosen {[str(h) for h in chosen]}, recall of the chosen "
              f"{recall[step.name]['chosen_recall']}, of the top {len(top)} "
              f"{recall[step.name][f'top{args.recall_top}_recall']}, Spearman {rho:.2f}")
    same = exact.groups == pre.groups
    results["entity_tracking_search"] = {
        "items": len(items), "exact_s": t_exact, "prefiltered_s": t_pre,
        "prefilter": args.prefilter, "speedup": t_exact / t_pre,
        "exact_groups": {g: [str(h) for h in hs] for g, hs in exact.groups.items()},
        "prefiltered_groups": {g: [str(h) for h in hs] for g, hs in pre.groups.items()},
        "same_circuit": same, "recall": recall}
    print(f"entity-tracking search, {len(items)} items: exact {t_exact:.0f} s, pre-filtered "
          f"(top {args.prefilter}) {t_pre:.0f} s ({t_exact / t_pre:.1f}x); same circuit: {same}")

path = f"results/bench_discovery-{name}-{args.device.split(':')[0]}.json"
atomic_write_json({"config": vars(args), "device": machine, "commit": git_commit(),
                   "results": results}, path)
print(f"wrote {path}")
