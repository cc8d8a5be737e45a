"""sa3-mlx: Stable Audio 3 inference in pure MLX.

    from sa3_mlx import load, generate
    pipe = load("sm-music")                       # downloads the weights on first use
    result = generate(pipe, "lofi house loop 120 BPM", seconds=10, seed=1)
    result.audio        # numpy [batch, 2, samples] float32 at result.sample_rate (44100)

The models stay loaded in ``pipe``: call ``generate`` as often as you like.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path

from .backend import exact_fp32, load_fast_blas

# The only import-time effects, because they must precede any import of mlx: on Linux CPUs
# MLX then uses OpenBLAS/MKL (~30x faster matmul), and on NVIDIA GPUs fp32 stays fp32
# instead of TF32. Other process settings (memory reuse) are the entry points' to make
# (sa3_mlx.runtime.configure_process: the CLI, the studio, bench and load() call it).
load_fast_blas()
exact_fp32()


def load(
    model: str = "sm-music", codec: str | None = None, weights_dir: str | Path | None = None, dit_dtype=None,
    loras=(),
):
    """A :class:`~sa3_mlx.pipeline.Pipeline` for ``model``.

    ``model`` is "sm-music", "sm-sfx" or "medium" (the official MLX files, from
    ``weights_dir`` (flat, or with an ``MLX/`` folder) or the Hugging Face cache,
    downloaded on first use), or an original release: a Hugging Face repo id such as
    "stabilityai/stable-audio-3-small-music" or a local folder with ``model_config.json``
    (or one written by ``sa3 convert``). ``loras``: ``"FILE[:STRENGTH]"`` adapters,
    stacked in order (``pipe.set_lora_strength`` changes them later). Models load
    lazily on the first generation and stay resident.
    """
    from .pipeline import Pipeline
    from .runtime import configure_process

    configure_process()
    return Pipeline(model, codec, weights_dir=weights_dir, dit_dtype=dit_dtype, loras=loras)


def generate(pipeline, prompt: str, **settings):
    """Generate audio with a loaded pipeline; see :meth:`Pipeline.generate` for the settings."""
    return pipeline.generate(prompt, **settings)


__all__ = ["load", "generate", "__version__"]
