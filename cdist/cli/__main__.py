"""``python -m cdist.cli`` (and ``torchrun -m cdist.cli``, one process per rank) is the ``cdist``
command."""

import sys

from cdist.cli import main

sys.exit(main())
