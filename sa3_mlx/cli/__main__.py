"""``python -m sa3_mlx.cli``: the same as the ``sa3`` command."""

import sys

from . import main

sys.exit(main())
