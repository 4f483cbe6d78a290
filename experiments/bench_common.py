"""What the benchmark scripts (``bench_scale.py``, ``bench_discovery.py``) share: their machine
arguments and checks, random-weight Llama models, the measurements they both make (a batched
function against its twin, float32 against bfloat16, a distillation step by the optimizer's clock)
and the JSON record each writes with the device and commit it was measured on.

Nothing here imports torch at module level, so that a script's ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

__all__ = ["add_machine_args", "compare", "distill_clock", "distill_summary", "dtype_drift",
           "load_model", "parser", "prefilter_search", "random_llama", "ratio", "save_results",
           "setup_machine", "spread_head_map", "spread_heads", "transformer_lens_comparison"]


# ---- arguments and the machine -------------------------------------------------------------------
def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` is the script's docstring, as written."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_machine_args(group, *, dtype_default: str | None, dtype_choices: list[str],
                     dtype_help: str | None = None) -> None:
    """``--device``, ``--dtype``, ``--seed`` and ``--threads``."""
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    group.add_argument("--dtype", default=dtype_default, choices=dtype_choices, help=dtype_help)
    group.add_argument("--seed", type=int, default=0, help="weights, prompts and data order")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def setup_machine(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """``args.device`` as a torch device this machine has (else the parser's one-line error, exit
    2), with torch's CPU threads set; on CUDA it is made the current GPU, which the memory counters
    and ``synchronize`` read (plain "cuda" is the first GPU)."""
    import torch

    from cdist.errors import InputError
    from cdist.models import check_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = check_device(args.device)
    except InputError as err:
        parser.error(str(err))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    return device


def random_llama(shape, tokenizer, *, seed: int, device: str, dtype, name: str | None = None):
    """A Llama of ``shape`` (layers, d_model, heads, key/value heads, d_mlp) with random weights and
    Llama-3's rope theta, in eval mode: speed and memory do not depend on the weights. ``name``:
    announce it on stderr first (the large shapes take a while)."""
    from cdist.models import new_llama

    if name:
        print(f"making the {name} model ...", file=sys.stderr, flush=True)

    layers, width, heads, kv, mlp = shape
    return new_llama(n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=kv, d_mlp=mlp,
                     vocab_size=len(tokenizer), rope_theta=500000.0, seed=seed,
                     tokenizer=tokenizer, device=device, dtype=dtype).eval()


def spread_heads(model, n: int) -> list:
    """``n`` heads evenly over a model's flat head index (every layer, for ``n`` >= its layers)."""
    from cdist.types import Head

    total, per = model.cfg.n_layers * model.cfg.n_heads, model.cfg.n_heads
    return [Head(i // per, i % per) for i in (j * total // n for j in range(n))]


# ---- measurements --------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either was not measured (peak GPU memory on the CPU)."""
    return None if a is None or b is None else a / b


def compare(fast, slow, device: str, repeats: int) -> tuple[float, float, float]:
    """A batched function against its one-at-a-time twin on the same inputs: their best times over
    ``repeats`` calls (the batched one after a warm-up call) and the largest absolute difference of
    their tensors."""
    from cdist.provenance import timed

    fast()  # warm-up (kernels, allocator)
    got, t_fast = timed(fast, device, repeats)
    want, t_slow = timed(slow, device, repeats)
    return t_fast, t_slow, (got - want).abs().max().item()


def dtype_drift(name: str, model, scan, items) -> dict:
    """A scan of ``model`` (float32) on ``items``, then again after casting it to bfloat16: the
    largest absolute difference of the ranking metric beside its largest float32 value (printed,
    under ``name``)."""
    import torch

    from cdist.models import cast

    fp32 = scan(items)
    cast(model, torch.bfloat16)
    bf16 = scan(items)
    metric = fp32.metric
    diff = (bf16[metric] - fp32[metric]).abs().max().item()
    scale = fp32[metric].abs().max().item()
    print(f"{name}, bfloat16 vs float32: max |{metric} difference| {diff:.2e}, largest "
          f"|{metric}| {scale:.2e} ({diff / scale if scale else math.nan:.1%}), "
          f"{len(items)} prompts")
    return {"metric": metric, "max_abs_diff": diff, "max_abs_fp32": scale, "prompts": len(items)}


def spread_head_map(student, teacher, n_pairs: int):
    """The student heads a circuit arm trains, spread over its layers (so the backward pass reaches
    the first), and a head map pairing each with a teacher head spread the same way, read at the
    three entity-tracking positions in turn."""
    import torch

    from cdist.matching import HeadMap
    from cdist.types import HeadPair

    trained, places = spread_heads(student, n_pairs), ("pos_last", "pos_query_label",
                                                       "pos_prev_label")
    pairs = tuple(HeadPair(s, t, places[i % 3], places[i % 3]) for i, (s, t) in
                  enumerate(zip(trained, spread_heads(teacher, n_pairs), strict=True)))
    return trained, HeadMap(pairs, tuple(trained), tuple(p.teacher for p in pairs),
                            torch.zeros(n_pairs, n_pairs), "distance", "manual")


def distill_clock(run, steps: int, device: str, *, label: str, tokens: float) -> dict:
    """Time ``run(run_dir)`` (a ``distill`` call of ``steps`` steps) by torch's global optimizer
    hook, which stamps each step's end after a synchronize: the steps' times after the first (a
    warm-up; the median counts, and ``tokens`` a step over it), AdamW's state after the last step
    (two moments per trained weight, and its step counters) and, on CUDA, the peak memory of the
    steps after the first and the memory held before the run; printed under ``label``."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from cdist.provenance import synchronize

    on_gpu = torch.device(device).type == "cuda"
    stamps, state = [], {}

    def after_step(opt, *_):
        synchronize(device)
        stamps.append(time.perf_counter())
        if len(stamps) == 1 and on_gpu:
            torch.cuda.reset_peak_memory_stats()  # the first step warms up
        if len(stamps) == steps:
            held = [(key, t) for s in opt.state.values() for key, t in s.items()
                    if torch.is_tensor(t)]
            moments = [t for key, t in held if key in ("exp_avg", "exp_avg_sq")]
            state.update(elements=sum(t.numel() for t in moments), dtype=str(moments[0].dtype)[6:],
                         bytes=sum(t.nbytes for _, t in held),
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None)

    resident = torch.cuda.memory_allocated() / 2**30 if on_gpu else None
    hook = register_optimizer_step_post_hook(after_step)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            result = run(run_dir)
    finally:
        hook.remove()
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    step = statistics.median(times)
    r = {"step_s": step, "step_times_s": times, "tokens_per_s": tokens / step,
         "trained_params": result["trainable"]["params"],
         "param_share": result["trainable"]["param_share"],
         "optimizer_state_elements": state["elements"], "optimizer_state_bytes": state["bytes"],
         "moment_dtype": state["dtype"], "peak_gib": state["peak_gib"], "resident_gib": resident}
    peak = (f"peak {r['peak_gib']:.2f} GiB (models {r['resident_gib']:.2f})" if on_gpu
            else "peak memory n/a on the CPU")
    print(f"distill step, {label}: {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} "
          f"tokens/s, {peak}, AdamW state {r['optimizer_state_bytes'] / 2**20:.3g} MiB "
          f"({r['moment_dtype']}), {r['param_share']:.2%} of the weights trained")
    return r


def distill_summary(ce: dict, cka: dict, full: dict, cached: dict, n_pairs: int, tokens: float,
                    t_cache: float, on_gpu: bool) -> dict:
    """The ratios of the four ``distill_clock`` runs (CE only, CE + CKA, the same training every
    weight, CE + CKA from a teacher cache), printed: CKA's cost per step, and what training the
    circuit alone saves in AdamW state and memory."""
    summary = {
        "trained_heads": n_pairs, "tokens_per_step": tokens, "target_cka_over_ce": 1.10,
        "cka_over_ce": cka["step_s"] / ce["step_s"], "cache_build_s": t_cache,
        "cached_over_live": cached["step_s"] / cka["step_s"],
        "cached_peak_ratio": ratio(cached["peak_gib"], cka["peak_gib"]),
        "state_ratio": cka["optimizer_state_elements"] / full["optimizer_state_elements"],
        "state_bytes_ratio": cka["optimizer_state_bytes"] / full["optimizer_state_bytes"],
        "param_ratio": cka["trained_params"] / full["trained_params"],
        "peak_ratio": ratio(cka["peak_gib"], full["peak_gib"])}
    print(f"CE + CKA step / CE step {summary['cka_over_ce']:.3f}x (target <= 1.10x); circuit / "
          f"full: AdamW state {summary['state_ratio']:.5f}x ({summary['state_bytes_ratio']:.5f}x "
          f"in bytes), trained weights {summary['param_ratio']:.5f}x"
          + (f", peak memory {summary['peak_ratio']:.3f}x" if on_gpu else ""))
    print(f"teacher cache: built in {t_cache:.1f} s; a step from it / a step with the live teacher "
          f"{summary['cached_over_live']:.3f}x"
          + (f", peak memory {summary['cached_peak_ratio']:.3f}x" if on_gpu else ""))
    return summary


# ---- discovery's measurements --------------------------------------------------------------------
def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """``args.model`` as (model, tokenizer, name for the record, template of its items): a zoo
    model (its own template), a checkpoint directory or ``.gguf`` file, ``smollm2`` (the GGUF file
    of ``cdist.pretrained``), or ``llama-3.2-1b`` / ``random``, random weights in Llama-3.2-1B's
    shape or ``args.shape`` with the Llama-3 tokenizer. Else the parser's one-line error."""
    from pathlib import Path

    import torch

    from cdist import zoo
    from cdist.models import cast, load_llama
    from cdist.tokenizers import llama3_tokenizer

    dtype = getattr(torch, args.dtype)
    template = args.template or "prakash"
    if args.model in ("llama-3.2-1b", "random"):
        tokenizer = llama3_tokenizer()
        shape = [16, 2048, 32, 8, 8192] if args.model == "llama-3.2-1b" else args.shape
        model = random_llama(shape, tokenizer, seed=args.seed, device=args.device, dtype=dtype)
        return model, tokenizer, args.model, template
    if args.model in zoo.names():
        model, tokenizer = zoo.load(args.model, device=args.device)
        template = args.template or zoo.manifest(args.model)["config"]["template"]
        return cast(model, dtype), tokenizer, args.model, template
    if args.model == "smollm2" or Path(args.model).is_dir() or args.model.endswith(".gguf"):
        from cdist.pretrained import smollm2_gguf

        source = smollm2_gguf() if args.model == "smollm2" else Path(args.model)
        if not source.exists():
            parser.error(f"{source} does not exist; give a checkpoint directory or .gguf file")
        model = load_llama(source, device=args.device, dtype=dtype)
        return model, model.tokenizer, source.stem if source.suffix else source.name, template
    parser.error(f"unknown model {args.model!r}; choose a zoo model ({zoo.names()}), a checkpoint "
                 "directory or .gguf file, smollm2, llama-3.2-1b or random")


def transformer_lens_comparison(model, items, device: str, repeats: int, scan_kw: dict) -> dict:
    """Activation patching of every head's output at every position on the same items and metric
    (the mean answer probability): cdist's ``activation_patching_scan`` against TransformerLens's
    ``get_act_patch_attn_head_out_all_pos`` (Nanda's patching helpers), their times, the largest
    difference and whether the five heads whose patching lowers the answer's probability most
    agree, in order. ``items`` must be of one length (TransformerLens takes one unpadded batch)."""
    import torch
    from transformer_lens import patching as tl_patching

    from cdist.discovery import activation_patching
    from cdist.provenance import timed

    clean = torch.tensor(items["input_ids"], device=device)
    corrupt = torch.tensor(items["corrupt_input_ids"], device=device)
    answer = torch.tensor(items["answer_id"], device=device)
    last = torch.tensor(items["pos_last"], device=device)
    rows = torch.arange(len(items), device=device)

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
        scan = activation_patching.activation_patching_scan(model, items, **scan_kw)
        return scan["prob_change"].double() + base.double().cpu()

    got, t_ours = timed(ours, device, repeats)
    want, t_tl = timed(theirs, device)  # minutes at real depth: once
    want = want.double().cpu()
    diff = (got - want).abs().max().item()
    same_top5 = torch.equal(got.flatten().argsort()[:5], want.flatten().argsort()[:5])
    print(f"activation patching, {len(items)} items: cdist {t_ours:.1f} s, TransformerLens "
          f"{t_tl:.1f} s ({t_tl / t_ours:.1f}x), max |diff| {diff:.1e}, same top 5: {same_top5}")
    return {"cdist_s": t_ours, "transformer_lens_s": t_tl, "speedup": t_tl / t_ours,
            "max_abs_diff": diff, "same_top5": same_top5, "items": len(items)}


def prefilter_search(model, items, device: str, prefilter: int, recall_top: int,
                     patch_kw: dict) -> dict:
    """The entity-tracking path-patching search (``ET_SEARCH``, Prakash et al. 2024) exact and
    with path attribution's top ``prefilter`` senders per group, timed; and, group by group, the
    pre-filter's recall of the exact search's chosen heads and top ``recall_top`` heads."""
    from cdist.discovery import search as et_search
    from cdist.provenance import timed

    search = et_search.ET_SEARCH
    (exact, exact_scans), t_exact = timed(lambda: et_search.entity_tracking_circuit(
        model, items, search=search, **patch_kw), device)
    (pre, _), t_pre = timed(lambda: et_search.entity_tracking_circuit(
        model, items, search=search, prefilter=prefilter, **patch_kw), device)
    recall = {}
    for step in search:
        receivers = exact.groups[step.receivers] if step.receivers else ()
        if not step.receivers or receivers:
            recall[step.name] = _recall(model, items, step, receivers, exact.groups[step.name],
                                        exact_scans[step.name], prefilter, recall_top,
                                        patch_kw["batch_size"])
    same = exact.groups == pre.groups
    print(f"entity-tracking search, {len(items)} items: exact {t_exact:.0f} s, pre-filtered "
          f"(top {prefilter}) {t_pre:.0f} s ({t_exact / t_pre:.1f}x); same circuit: {same}")
    return {"items": len(items), "exact_s": t_exact, "prefiltered_s": t_pre,
            "prefilter": prefilter, "speedup": t_exact / t_pre,
            "exact_groups": {g: [str(h) for h in hs] for g, hs in exact.groups.items()},
            "prefiltered_groups": {g: [str(h) for h in hs] for g, hs in pre.groups.items()},
            "same_circuit": same, "recall": recall}


def _recall(model, items, step, receivers, chosen, exact_scan, prefilter: int, recall_top: int,
            batch_size: int) -> dict:
    """One search group: the share of the exact search's chosen heads, and of its top heads, that
    path attribution (run with the exact search's receivers) puts among its top ``prefilter``,
    with the Spearman correlation of the two rankings."""
    from scipy.stats import spearmanr

    from cdist.discovery.attribution_patching import path_attribution_scan

    attribution = path_attribution_scan(model, items, receivers=receivers,
                                        receiver_input=step.receiver_input,
                                        position=step.position, batch_size=batch_size)
    candidates = set(attribution.ranking().top(prefilter))
    # Only senders below the last receiver can reach it (the others score 0 in both scans and
    # would pad the top heads and the correlation), and only a head that lowers the answer's
    # probability counts among the exact search's top heads.
    reach = max((r.layer for r in receivers), default=model.cfg.n_layers) * model.cfg.n_heads
    exact_scores = exact_scan[exact_scan.metric].flatten()[:reach]
    top = [h for h in exact_scan.ranking().top(recall_top)
           if exact_scores[h.layer * model.cfg.n_heads + h.head] < 0]
    rho = spearmanr(exact_scores, attribution[attribution.metric].flatten()[:reach]).statistic
    found = {
        "chosen": [str(h) for h in chosen],
        "chosen_recall": sum(h in candidates for h in chosen) / len(chosen) if chosen else None,
        f"top{recall_top}": [str(h) for h in top],
        f"top{recall_top}_recall": sum(h in candidates for h in top) / len(top) if top else None,
        "spearman": float(rho)}
    print(f"  {step.name}: chosen {[str(h) for h in chosen]}, recall of the chosen "
          f"{found['chosen_recall']}, of the top {len(top)} "
          f"{found[f'top{recall_top}_recall']}, Spearman {rho:.2f}")
    return found


# ---- the record ----------------------------------------------------------------------------------
def save_results(path: str, config: dict, device: str, results: dict, **extra) -> None:
    """Write ``{"config", "device", "commit", **extra, "results"}`` as JSON to ``path``,
    atomically, and say so."""
    from cdist.checkpoints import atomic_write_json
    from cdist.provenance import git_commit

    atomic_write_json({"config": config, "device": device, "commit": git_commit(), **extra,
                       "results": results}, path)
    print(f"wrote {path}")
