"""Find the task circuit of every zoo model and measure how faithful it is.

    python experiments/discovery.py                         # every zoo model -> results/discovery/,
                                                            # heatmaps -> figures/discovery/
    python experiments/discovery.py --only et-teacher       # one model

The same as ``cdist zoo circuits`` (``cdist.zoo.survey`` says which items, methods and scans).
"""

import sys

from cdist import cli

if __name__ == "__main__":
    sys.exit(cli.main(["zoo", "circuits", *sys.argv[1:]]))
