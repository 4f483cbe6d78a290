"""Redraw the zoo circuits' heatmaps from saved scores (HTML and PNG).

    python experiments/figures.py          # results/discovery/scores/*.json -> figures/discovery/
    python experiments/figures.py --out R --figures F

The same as ``cdist zoo circuits --draw-only``.
"""

import sys

from cdist import cli

if __name__ == "__main__":
    sys.exit(cli.main(["zoo", "circuits", "--draw-only", *sys.argv[1:]]))
