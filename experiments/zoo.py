"""Train the model-organism zoo and write it to zoo/ (weights, tokenizer, manifest.json per model).

    python experiments/zoo.py                       # every model in cdist.zoo.ZOO_CONFIGS
    python experiments/zoo.py --only tom-teacher    # one model; an interrupted run resumes from
                                                    # runs/zoo/
    python experiments/zoo.py --tiny                # a seconds-long smoke run (writes zoo/et-tiny)

Each model's manifest records its config, seed, steps, wall time, training history, the commit that
trained it, and its accuracy on --eval-items fresh held-out items.
"""

import argparse
import dataclasses
import time

import torch

from cdist import evaluate, zoo
from cdist.provenance import git_commit
from cdist.zoo import organisms

# ---------------------------------------------------------------------------- config
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--only", nargs="*", default=None, help="names to train (default: all)")
parser.add_argument("--run-dir", default="runs/zoo", help="where training state is checkpointed")
parser.add_argument("--eval-items", type=int, default=1000,
                    help="held-out items for the final accuracy")
parser.add_argument("--eval-seed", type=int, default=2024, help="seed of the held-out items")
parser.add_argument("--tiny", action="store_true",
                    help="train only zoo.TINY_CONFIG (a seconds-long smoke run)")
parser.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
configs = {zoo.TINY_CONFIG.name: zoo.TINY_CONFIG} if args.tiny else zoo.ZOO_CONFIGS
names = args.only or list(configs)
unknown = sorted(set(names) - set(configs))
if unknown:
    parser.error(f"unknown zoo model(s) {unknown}; choose from {sorted(configs)}")


def depth(name: str) -> int:
    """How many init_from steps lead to a model trained from scratch."""
    base = configs[name].init_from
    return 0 if base is None else 1 + depth(base)


# a model that starts from another (init_from) is trained after it, along any chain
names.sort(key=depth)
for name in names:
    base = configs[name].init_from
    if base and base not in names and base not in zoo.names():
        parser.error(f"{name} starts from {base}, which is not in {zoo.zoo_dir()}; "
                     f"add it: --only {base} {name}")

# ---------------------------------------------------------------------------- train, measure, save
commit = git_commit()  # the code that trains, read before anything else can change the tree
tokenizer = zoo.organism_tokenizer()
for name in names:
    cfg = configs[name]
    started = time.time()
    model, manifest = organisms.train_organism(cfg, tokenizer, f"{args.run_dir}/{name}",
                                               init=zoo.init_weights(cfg))
    test = organisms.held_out(cfg, tokenizer, args.eval_items, seed=args.eval_seed)
    acc = evaluate.accuracy(organisms.LogitsOf(model, tokenizer), test)
    manifest |= {
        "name": name,
        "commit": commit,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_heads_total": cfg.n_layers * cfg.n_heads,
        "accuracy": {"test_items": args.eval_items, "seed": args.eval_seed, "value": acc},
        "config": dataclasses.asdict(cfg),
    }
    path = zoo.save(model, tokenizer, name, manifest)
    print(f"{name}: accuracy {acc:.3f} on {args.eval_items} held-out items, "
          f"{manifest['steps']} steps, "
          f"{time.time() - started:.0f}s -> {path}")
