"""Train the model-organism zoo and write it to zoo/ (weights, tokenizer, manifest.json per model).

    python experiments/zoo.py                       # every model in cdist.zoo.ZOO_CONFIGS
    python experiments/zoo.py --only tom-teacher    # one model; an interrupted run resumes from
                                                    # runs/zoo/
    python experiments/zoo.py --tiny                # a seconds-long smoke run (writes zoo/et-tiny)

The same as ``cdist zoo train``. Each model's manifest records its config, seed, steps, wall time,
training history, the commit that trained it, and its accuracy on --eval-items fresh held-out items.
"""

import sys

from cdist import cli

if __name__ == "__main__":
    sys.exit(cli.main(["zoo", "train", *sys.argv[1:]]))
