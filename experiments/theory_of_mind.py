"""Table 2 of circuit distillation, theory of mind: python experiments/theory_of_mind.py --help

Every row of the paper's table for a teacher and a student (zoo names or local Llama-3 checkpoint
directories), over several seeds, with McNemar's tests, a lambda sweep on validation items, and the
CE-curve and head-correspondence figures; see cdist.pipeline for what each row is and which items
it uses.

    python experiments/theory_of_mind.py  # the zoo, 3 seeds, all rows
    python experiments/theory_of_mind.py --teacher /ckpt/Llama-3.1-8B \
        --student /ckpt/Llama-3.2-1B --lrs 2e-5 --device cuda
    python experiments/theory_of_mind.py --draw-only  # only the figures, again, from
        # results/theory_of_mind/results.json (--out R --figures F: another table's)
"""

import sys

from cdist import cli

if __name__ == "__main__":  # the same as: cdist table --task theory_of_mind --figures figures ...
    sys.exit(cli.table_script("theory_of_mind", sys.argv[1:]))
