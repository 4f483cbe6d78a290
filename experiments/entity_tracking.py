"""Table 1 of circuit distillation, entity tracking: python experiments/entity_tracking.py --help

Every row of the paper's table for a teacher and a student (zoo names or local Llama-3 checkpoint
directories), over several seeds, with McNemar's tests, a lambda sweep on validation items, and the
CE-curve and head-correspondence figures; see cdist.pipeline for what each row is and which items
it uses.

    python experiments/entity_tracking.py  # the zoo, 3 seeds, all rows
    python experiments/entity_tracking.py --teacher /ckpt/Llama-3.1-8B \
        --student /ckpt/Llama-3.2-1B --lrs 2e-5 --device cuda
    python experiments/entity_tracking.py --draw-only  # only the figures, again, from
        # results/entity_tracking/results.json (--out R --figures F: another table's)
"""

import sys

from cdist import cli

if __name__ == "__main__":  # the same as: cdist table --task entity_tracking --figures figures ...
    sys.exit(cli.table_script("entity_tracking", sys.argv[1:]))
