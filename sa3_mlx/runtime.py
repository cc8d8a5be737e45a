"""Process-wide settings that entry points (the CLI, the studio, ``sa3 bench``, :func:`sa3_mlx.load`)
apply, and a library import does not.

What must happen before MLX is imported (choosing a fast BLAS on Linux CPUs, keeping fp32
as fp32 on NVIDIA GPUs) stays in ``sa3_mlx/__init__.py``; everything else is here.
"""

from __future__ import annotations

from . import backend

_configured = False


def configure_process() -> None:
    """Keep freed memory for reuse (glibc; see :func:`sa3_mlx.backend.reuse_freed_memory`). Idempotent."""
    global _configured
    if not _configured:
        backend.reuse_freed_memory()
        _configured = True
