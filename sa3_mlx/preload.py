"""``python -m sa3_mlx.preload``: make this environment load the fast BLAS at every interpreter start.

Writes ``sa3_mlx_fast_blas.pth`` into the environment's site-packages (``./install.sh`` does this on Linux), so
the BLAS choice no longer depends on importing ``sa3_mlx`` before ``mlx``. Delete the file to undo it.
"""

import sys

from .backend import install_preload

if __name__ == "__main__":
    if sys.argv[1:]:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    print(install_preload())
