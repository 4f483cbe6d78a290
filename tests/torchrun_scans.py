"""The worker of ``tests/test_distributed_scans.py``: the discovery scans under torchrun, on the
CPU::

    torchrun --standalone --nproc-per-node 2 tests/torchrun_scans.py OUT.pt CHECKPOINT_DIR

Each rank runs the scans of ``run_scans`` on the tiny model of ``build`` (shapes checked, as the
test suite checks them), recording which heads it intervened on; rank 0 saves every rank's results
to ``OUT.pt``. The test imports ``build`` and ``run_scans`` to run the same scans in one process.
Not collected by pytest (its name is not ``test_*``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # the test suite's shape checks (pyproject.toml), for the ranks too
    from jaxtyping import install_import_hook

    install_import_hook(["cdist.discovery", "cdist.distributed"],
                        "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

from cdist import distributed, store, tasks, zoo  # noqa: E402
from cdist.discovery import ablation, activation_patching, engine, path_patching  # noqa: E402
from cdist.discovery.search import entity_tracking_circuit  # noqa: E402
from cdist.models import new_llama  # noqa: E402
from cdist.types import Head  # noqa: E402


def build():
    """A tiny random three-layer GQA Llama (test_patching's ``model3``) and five entity-tracking
    items."""
    tok = zoo.organism_tokenizer()
    model = new_llama(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                      vocab_size=len(tok), seed=5, tokenizer=tok).eval()
    with torch.no_grad():  # larger attention weights, so that heads matter
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "_W_K", "W_V", "_W_V", "W_O")):
                p.mul_(3.0)
    data = tasks.entity_tracking(5, tokenizer=tok, n_boxes=3, template="compact", seed=4)
    return model, data


@contextlib.contextmanager
def heads_run():
    """A list that collects the flat heads (or senders) every pass of a scan intervenes on, with
    repeats (once per batch), in this process."""
    ran: list[int] = []
    original = engine.one_head_variants

    def spy(chunk, n_heads, n_rows):
        ran.extend(chunk.tolist())
        return original(chunk, n_heads, n_rows)

    engine.one_head_variants = path_patching.one_head_variants = spy
    try:
        yield ran
    finally:
        engine.one_head_variants = path_patching.one_head_variants = original


def killed_and_resumed(scan, kept: Path, module, name: str) -> tuple[object, bool]:
    """``scan(resume=kept)`` killed in its second batch (at ``module.name``, called once a
    batch), then called again: its result, and whether this process's running sums were on disk
    after the kill (``<kept>.rank<r>`` under torchrun) and gone once the scan was made."""
    real, calls = getattr(module, name), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    setattr(module, name, killed)
    try:
        scan(resume=kept)
    except KeyboardInterrupt:
        pass
    finally:
        setattr(module, name, real)
    own = kept.with_name(f"{kept.name}.rank{distributed.rank()}") if distributed.active() else kept
    was_kept = own.is_file()
    return scan(resume=kept), was_kept and not own.exists()


def run_scans(model, data, checkpoint_dir) -> dict:
    """Every split scan, a search written to ``checkpoint_dir`` and its resumption.

    Returns:
        ``scans`` (name -> metric -> ``[layer, head_index]`` tensor), ``circuits`` (the search's,
        then the resumed one's, as dicts), ``ran`` (name -> sorted flat heads this process
        intervened on, once per batch), ``writes`` (the checkpoint files this process wrote)
        and ``resumed_from_disk`` (name -> whether a killed scan kept its own running sums and
        removed them when it was done).
    """
    means = ablation.head_means(model, data)
    search = dict(k=2, min_effect=0.0, prefilter=5, batch_size=2, senders_per_pass=2,
                  checkpoint_dir=checkpoint_dir)
    runs = {
        "mean_ablation": lambda: ablation.head_ablation_scan(
            model, data, means=means, batch_size=2, heads_per_pass=3),
        "mean_ablation_resumed": lambda: killed_and_resumed(
            lambda resume: ablation.head_ablation_scan(model, data, means=means, batch_size=2,
                                                       heads_per_pass=3, resume=resume),
            Path(checkpoint_dir) / "scan.partial.pt", ablation, "one_head_scan"),
        "mean_ablation_at_last": lambda: ablation.head_ablation_scan(
            model, data, means=means, batch_size=3, heads_per_pass=2, position="pos_last"),
        "activation_patching": lambda: activation_patching.activation_patching_scan(
            model, data, batch_size=2, heads_per_pass=3),
        "activation_patching_some": lambda: activation_patching.activation_patching_scan(
            model, data, batch_size=3, heads=["a0.h1", "a1.h3", "a2.h0"]),
        "path_patching": lambda: path_patching.path_patching_scan(
            model, data, batch_size=2, senders_per_pass=3),
        "path_patching_resumed": lambda: killed_and_resumed(
            lambda resume: path_patching.path_patching_scan(model, data, batch_size=2,
                                                            senders_per_pass=3, resume=resume),
            Path(checkpoint_dir) / "path.partial.pt", path_patching, "_patched_chunks"),
        "path_patching_k": lambda: path_patching.path_patching_scan(
            model, data, receivers=[Head(2, 0), Head(2, 3)], receiver_input="k",
            position="pos_query_label", batch_size=3, senders_per_pass=2),
        # one sender: a rank with nothing to run
        "path_patching_one": lambda: path_patching.path_patching_scan(
            model, data, senders=["a0.h2"]),
        "search": lambda: entity_tracking_circuit(model, data, **search),
        "resumed": lambda: entity_tracking_circuit(model, data, **search),
    }
    writes: list[str] = []
    original_write = store.atomic_write_json

    def write(obj, path, **kwargs):
        writes.append(path.name)
        original_write(obj, path, **kwargs)

    store.atomic_write_json = write
    out = {"scans": {}, "circuits": [], "ran": {}, "writes": writes, "resumed_from_disk": {}}
    try:
        for name, scan in runs.items():
            with heads_run() as ran:
                result = scan()
            out["ran"][name] = sorted(ran)
            if name.endswith("_resumed"):
                result, out["resumed_from_disk"][name] = result
            if isinstance(result, tuple):  # a search: its circuit and every group's scans
                circuit, result = result
                out["circuits"].append(circuit.to_dict())
                out["scans"] |= {f"{name}/{group}": scan for group, scan in result.items()}
            else:
                out["scans"][name] = result
    finally:
        store.atomic_write_json = original_write
    out["scans"] = {name: dict(scan.metrics) for name, scan in out["scans"].items()}
    return out


def main(out_path: str, checkpoint_dir: str) -> None:
    # Ranks that disagree wait for each other's collectives for ever (gloo's timeout is 30 minutes):
    # a rank still running after this long prints where it waits and exits, and torchrun ends
    # the others. The scans take seconds.
    faulthandler.dump_traceback_later(90, exit=True)
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    assert distributed.world_size() > 1, "run under torchrun with 2 or more processes"
    model, data = build()
    result = run_scans(model, data, checkpoint_dir) | {"rank": distributed.rank()}
    everyone = [None] * distributed.world_size()
    torch.distributed.all_gather_object(everyone, result)
    if distributed.is_main():
        torch.save(everyone, out_path)
    distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
