"""Peak host memory of ``load_llama`` against the size of the model it loads.

    python experiments/bench_loading.py                       # Llama-3.2-1B shape, bf16 -> bf16
    python experiments/bench_loading.py --load-dtype float32  # the same checkpoint as float32
    python experiments/bench_loading.py --shape tiny          # seconds; what the test suite runs

Writes a random-weight checkpoint of the shape (speed and memory do not depend on the weights) in
the checkpoint dtype, then, in a fresh process per loader, loads it and reads the process's peak
resident memory (``ru_maxrss``) against its resident memory just before loading (after the
imports). The ratio reported is that increase over the loaded model's own size (its parameters'
bytes in the requested dtype; a tied checkpoint's unembedding is a second matrix in
TransformerLens, so the model is larger than the file). The same is measured for transformers'
``LlamaForCausalLM.from_pretrained`` as a reference. Results go to
``results/bench_loading-<shape>-<dtype>.json`` with the config and commit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {
    # Llama-3.2-1B: 16 layers, 32 query heads over 8 key/value heads, tied embeddings
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True),
}


def _rss_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1e6


def make_checkpoint(shape: str, dtype: str, out: Path, seed: int = 0) -> Path:
    """A random-weight Llama checkpoint of ``shape`` in ``dtype``, written tensor by tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], torch_dtype=dtype)
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    weights = {k: (torch.randn(s, generator=gen) * 0.02).to(getattr(torch, dtype))
               for k, s in names.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    return out


def measure(loader: str, ckpt: Path, dtype: str) -> dict:
    """Run in a fresh process: load ``ckpt`` with ``loader`` and report memory."""
    import time

    import torch

    from cdist.models import load_llama

    torch.set_num_threads(2)
    before = _rss_gb()
    start = time.perf_counter()
    if loader == "cdist":
        model = load_llama(ckpt, dtype=getattr(torch, dtype))
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    # kB resolution (what /proc and ru_maxrss give), so that a tiny shape's ratio is still exact
    return {"loader": loader, "seconds": round(seconds, 2), "rss_before_gb": round(before, 6),
            "peak_rss_gb": round(peak, 6), "load_increase_gb": round(peak - before, 6),
            "model_gb": round(model_gb, 6), "ratio": round((peak - before) / model_gb, 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--checkpoint-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--load-dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: the checkpoint's")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default results/bench_loading-<shape>-<dtype>.json)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip transformers' from_pretrained")
    parser.add_argument("--measure", nargs=3, metavar=("LOADER", "CKPT", "DTYPE"),
                        help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.measure[2])))
        return {}
    from cdist.checkpoints import atomic_write_json
    from cdist.provenance import git_commit

    load_dtype = args.load_dtype or args.checkpoint_dtype
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(args.shape, args.checkpoint_dtype, Path(tmp) / "ckpt")
        file_gb = (ckpt / "model.safetensors").stat().st_size / 1e9
        for loader in ("cdist",) + (() if args.no_reference else ("transformers",)):
            child = subprocess.run(
                [sys.executable, __file__, "--measure", loader, str(ckpt), load_dtype],
                capture_output=True, text=True, check=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    result = {"shape": args.shape, "shape_config": SHAPES[args.shape],
              "checkpoint_dtype": args.checkpoint_dtype, "load_dtype": load_dtype,
              "checkpoint_file_gb": round(file_gb, 3), "runs": runs, "commit": git_commit(),
              "command": " ".join(["python", "experiments/bench_loading.py", *(argv or [])])}
    for run in runs:
        print(f"{run['loader']:>12}: {run['seconds']:6.1f} s, peak +{run['load_increase_gb']:.2f} "
              f"GB for a {run['model_gb']:.2f} GB model ({run['ratio']:.2f}x), "
              f"file {file_gb:.2f} GB")
    out = args.out or Path("results") / f"bench_loading-{args.shape}-{load_dtype}.json"
    atomic_write_json(result, out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
