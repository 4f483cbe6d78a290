"""``python -m cdist`` is the ``cdist`` command, as ``python -m cdist.cli`` is."""

import sys

from cdist.cli import main

sys.exit(main())
