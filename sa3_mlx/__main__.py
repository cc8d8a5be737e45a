"""``python -m sa3_mlx``: the same as the ``sa3`` command."""

import sys

from .commands import main

sys.exit(main())
