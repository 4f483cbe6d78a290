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

5. ``--growth-items N``: a ranked circuit grown to ``--growth-target`` faithfulness on N held-out
   items (the full scan's ranking, up to a fifth of the heads), by doubling and bisection
   (``faithfulness.grow_until_faithful``) and by its plain twin, one evaluation per added head
   (``grow_one_at_a_time``, how cdist grew circuits before): each one's heads, evaluations and time.

Results go to ``results/bench_discovery-<model>-<device>.json`` with the config, device name and
commit.
"""

import bench_common as bench

# ---- config --------------------------------------------------------------------------------------
parser = bench.parser(__doc__)
parser.add_argument("--model", default="et-teacher",
                    help="a zoo model, a checkpoint directory or .gguf file, smollm2, or "
                         "llama-3.2-1b / random (random weights)")
parser.add_argument("--shape", type=int, nargs=5, default=[16, 2048, 32, 8, 8192],
                    metavar=("LAYERS", "D_MODEL", "HEADS", "KV_HEADS", "D_MLP"),
                    help="--model random: its shape")
bench.add_machine_args(parser, dtype_default="float32", dtype_choices=["float32", "bfloat16"])
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
parser.add_argument("--growth-items", type=int, default=0,
                    help="held-out items for the circuit-growth comparison (0: skip it)")
parser.add_argument("--growth-target", type=float, default=0.8,
                    help="the faithfulness the grown circuit must reach")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--heads-per-pass", type=int, default=16)
parser.add_argument("--repeats", type=int, default=3,
                    help="timed calls per side; the best one counts")
args = parser.parse_args()

from cdist import tasks  # noqa: E402  (after argparse, so that --help answers at once)
from cdist.discovery import ablation, faithfulness, path_patching  # noqa: E402
from cdist.evaluate import accuracy  # noqa: E402
from cdist.provenance import device_name, timed  # noqa: E402
from cdist.types import Head  # noqa: E402

bench.setup_machine(parser, args)
machine = device_name(args.device)
scan_kw = dict(batch_size=args.batch_size, heads_per_pass=args.heads_per_pass)
patch_kw = dict(batch_size=args.batch_size, senders_per_pass=args.heads_per_pass)

# ---- load: the model and its items ---------------------------------------------------------------
model, tokenizer, name, template = bench.load_model(parser, args)
make = dict(template=template) | ({"n_boxes": args.n_boxes} if args.n_boxes else {})
data = tasks.entity_tracking(max(args.items, args.tl_items, args.search_items),
                             tokenizer=tokenizer, seed=args.seed + 1, split="test", **make)
small = data.select(range(min(args.reference_items, len(data))))
reference = tasks.entity_tracking(64, tokenizer=tokenizer, seed=args.seed + 2, split="test",
                                  **make)
n_heads = model.cfg.n_layers * model.cfg.n_heads
means = ablation.head_means(model, reference)
print(f"{name} ({n_heads} heads) on {machine}, {args.dtype}")

# ---- run: batched scans against their one-at-a-time twins ----------------------------------------
top = model.cfg.n_layers - 1
into_values = dict(receivers=[Head(top, 0), Head(top, model.cfg.n_heads - 1)],
                   receiver_input="v", position="pos_query_label")
cases = {
    "ablation_scan": (
        lambda: ablation.head_ablation_scan(model, small, means=means, **scan_kw)["prob_drop"],
        lambda: ablation.head_ablation_scan_reference(model, small, means=means)["prob_drop"]),
    "path_patching_logits": (
        lambda: path_patching.path_patching_scan(model, small, **patch_kw)["relative_change"],
        lambda: path_patching.path_patching_scan_reference(model, small)["relative_change"]),
    "path_patching_values": (
        lambda: path_patching.path_patching_scan(
            model, small, **into_values, **patch_kw)["relative_change"],
        lambda: path_patching.path_patching_scan_reference(
            model, small, **into_values)["relative_change"]),
}
results = {}
for case, (fast, slow) in ({} if args.no_reference else cases).items():
    t_fast, t_slow, diff = bench.compare(fast, slow, args.device, args.repeats)
    results[case] = {"batched_s": t_fast, "reference_s": t_slow, "speedup": t_slow / t_fast,
                     "max_abs_diff": diff, "heads_per_s_batched": n_heads / t_fast,
                     "items": len(small)}
    print(f"{case:>22}: batched {t_fast:7.2f} s, reference {t_slow:8.2f} s, "
          f"speed-up {t_slow / t_fast:6.1f}x, "
          f"{n_heads / t_fast:8.1f} heads/s, max |diff| {diff:.2e} ({len(small)} items)")
full = data.select(range(args.items))
scan, t_full = timed(lambda: ablation.head_ablation_scan(model, full, means=means, **scan_kw),
                     args.device)
results["full_ablation_scan"] = {"seconds": t_full, "items": len(full), "heads": n_heads}
print(f"full ablation scan: {n_heads} heads x {len(full)} items in {t_full:.2f} s")

# ---- run: against TransformerLens, and the pre-filtered search -----------------------------------
if args.tl_items:
    items = data.select(range(args.tl_items))
    if len({len(ids) for ids in items["input_ids"]}) > 1:
        parser.error("--tl-items: the items differ in length, and TransformerLens's helper takes "
                     "one unpadded batch; use a template and tokenizer that give equal lengths")
    results["transformer_lens_activation_patching"] = bench.transformer_lens_comparison(
        model, items, args.device, args.repeats, scan_kw)
if args.search_items:
    items = data.select(range(args.search_items))
    results["entity_tracking_search"] = bench.prefilter_search(
        model, items, args.device, args.prefilter, args.recall_top,
        dict(patch_kw, batch_size=min(args.batch_size, 16)))

if args.growth_items:
    held_out = tasks.entity_tracking(args.growth_items, tokenizer=tokenizer, seed=args.seed + 3,
                                     split="test", **make)
    full_acc = accuracy(model, held_out)
    ranked = scan.ranking().top(n_heads)
    grow = dict(full_accuracy=full_acc, threshold=args.growth_target,
                max_heads=max(1, n_heads // 5), batch_size=args.batch_size)
    (n_fast, tried), t_fast = timed(lambda: faithfulness.grow_until_faithful(
        model, [], ranked, held_out, means, **grow), args.device)
    (n_plain, plain_evals), t_plain = timed(lambda: faithfulness.grow_one_at_a_time(
        model, [], ranked, held_out, means, **grow), args.device)
    results["circuit_growth"] = {
        "items": len(held_out), "full_accuracy": full_acc, "target": args.growth_target,
        "max_heads": grow["max_heads"], "bisection": {"heads": n_fast, "evaluations": len(tried),
                                                      "seconds": t_fast, "tried": tried},
        "one_at_a_time": {"heads": n_plain, "evaluations": plain_evals, "seconds": t_plain},
        "speedup": t_plain / t_fast}
    print(f"circuit growth to faithfulness {args.growth_target} on {len(held_out)} items (full "
          f"accuracy {full_acc:.3f}): bisection {n_fast} heads in {len(tried)} evaluations, "
          f"{t_fast:.1f} s; one at a time {n_plain} heads in {plain_evals} evaluations, "
          f"{t_plain:.1f} s; speed-up {t_plain / t_fast:.1f}x")

# ---- save ----------------------------------------------------------------------------------------
bench.save_results(f"results/bench_discovery-{name}-{args.device.split(':')[0]}.json", vars(args),
                   machine, results)
