"""Process-wide settings that entry points (the CLI, the studio, ``sa3 bench``, :func:`sa3_mlx.load`)
apply, and a library import does not.

What must happen before MLX is imported (choosing a fast BLAS on Linux CPUs, keeping fp32
as fp32 on NVIDIA GPUs) stays in ``sa3_mlx/__init__.py``; everything else is here.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import backend

_configured = False
# MLX CUDA compiles its kernels at first use (NVRTC) and keeps them in this folder: on an H200
# the fused training step's first use took 118-224 s, a later process's 1.5 s; the compiled step's
# over 95 s (small model) and over 200 s (medium dora-rows), a later process's 0.4-1.4 s.
KERNEL_CACHE = Path.home() / ".cache" / "sa3-mlx" / "cuda-kernels"
# MLX CUDA records the kernels it launches into CUDA graphs (``MLX_USE_CUDA_GRAPHS``, read once, at the
# process's first GPU work). A sampler step gains from that, a training step loses: on an H200 (bf16,
# r16, 256 latents) the small model's dora-rows step took 110-188 ms with graphs off against 252-340 ms
# with them, medium dora-rows 161-174 against 394 ms, medium lora 144-167 against 260 ms; a sampler step of the
# small DiT at 30 s took 9.2-11.6 ms with graphs off against 5.4-7.3 ms with them (docs/performance.md).
CUDA_GRAPHS_VAR = "MLX_USE_CUDA_GRAPHS"


def configure_process(training: bool = False) -> None:
    """Keep freed memory for reuse (glibc; see :func:`sa3_mlx.backend.reuse_freed_memory`) and MLX CUDA's
    compiled kernels across processes (:data:`KERNEL_CACHE`, unless ``MLX_PTX_CACHE_DIR`` is set). Idempotent.

    ``training`` (``sa3 train``, ``sa3 bench --train``, :func:`sa3_mlx.train`): on CUDA, launch kernels
    directly rather than through CUDA graphs (:data:`CUDA_GRAPHS_VAR`), unless the variable is set. MLX
    reads it at the process's first GPU work, so this must come before any."""
    global _configured
    if training and CUDA_GRAPHS_VAR not in os.environ and on_cuda():
        os.environ[CUDA_GRAPHS_VAR] = "0"
    if not _configured:
        backend.reuse_freed_memory()
        if "MLX_PTX_CACHE_DIR" not in os.environ and on_cuda():  # read when MLX first compiles a kernel
            try:
                KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
                os.environ["MLX_PTX_CACHE_DIR"] = str(KERNEL_CACHE)
            except OSError:
                pass  # MLX's own default then
        _configured = True


def compile_by_default() -> bool:
    """mx.compile fuses each sampler step into one graph: a large win on GPUs, none on CPUs.
    ``SA3_COMPILE=0|1`` overrides."""
    import mlx.core as mx

    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    return {"0": False, "1": True}.get(os.environ.get("SA3_COMPILE", ""), on_gpu)


def compile_training_step_by_default() -> bool:
    """The training step (forward and backward pass) as one compiled graph: on GPUs, where the step is bound
    by launching its ~20k operations (docs/performance.md); not on CPUs. ``SA3_COMPILE=0|1`` overrides."""
    return compile_by_default()


def merge_adapted_weights_by_default(checkpointing: bool = False) -> bool:
    """The training step's adapted weights formed once per step by their stacks (``TrainStep(merged_weights=)``):
    where the step is compiled (GPUs: fewer products, and a step is bound by its number of operations), not
    with gradient checkpointing (asked for to save memory: the merged weights and their gradients are kept), and
    not on CPUs, where its full-size weight gradients cost more than the products it saves."""
    return compile_training_step_by_default() and not checkpointing


def training_step_modes(compiled: bool | None, merged_weights: bool | None,
                        checkpointing: bool = False) -> dict[str, bool]:
    """``TrainStep``'s ``compiled`` and ``merged_weights``: each as given, or this device's default when None
    (what ``sa3 train``, ``sa3_mlx.train`` and ``sa3 bench --train`` mean by ``auto``)."""
    return {"compiled": compile_training_step_by_default() if compiled is None else bool(compiled),
            "merged_weights": merge_adapted_weights_by_default(checkpointing) if merged_weights is None
            else bool(merged_weights)}


def on_cuda() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())
