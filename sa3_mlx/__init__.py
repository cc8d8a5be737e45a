"""sa3-mlx: Stable Audio 3 inference in pure MLX.

    from sa3_mlx import load, generate
    pipe = load("sm-music")                       # downloads the weights on first use
    result = generate(pipe, "lofi house loop 120 BPM", seconds=10, seed=1)
    result.audio        # numpy [batch, 2, samples] float32 at result.sample_rate (44100)

The models stay loaded in ``pipe``: call ``generate`` as often as you like.

    from sa3_mlx import train
    run = train("my_songs/", "stabilityai/stable-audio-3-small-music-base", steps=2000, out="loras/my_style")
    run.lora            # the LoRA file (upstream's format; load it with load(..., loras=[run.lora]))
    run.log             # one dict per step: loss, lr, grad_norm, t
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
    loras=(), bits: int | None = None, group_size: int | None = None,
):
    """A :class:`~sa3_mlx.pipeline.Pipeline` for ``model``.

    ``model`` is "sm-music", "sm-sfx" or "medium" (the official MLX files, from
    ``weights_dir`` (flat, or with an ``MLX/`` folder) or the Hugging Face cache,
    downloaded on first use), or an original release: a Hugging Face repo id such as
    "stabilityai/stable-audio-3-small-music" or a local folder with ``model_config.json``
    (or one written by ``sa3 convert``). ``loras``: ``"FILE[:STRENGTH]"`` adapters,
    stacked in order (``pipe.set_lora_strength`` changes them later). ``bits`` (8 or 4):
    quantize the DiT's transformer-block linear layers as they load (MLX affine quantization,
    ``group_size`` 32, 64 or 128 weights per scale, default 64). Models load lazily on the
    first generation and stay resident.
    """
    from .pipeline import Pipeline
    from .quantize import spec
    from .runtime import configure_process

    quantize = spec(bits, group_size)  # a ValueError before anything loads
    configure_process()
    return Pipeline(model, codec, weights_dir=weights_dir, dit_dtype=dit_dtype, loras=loras, quantize=quantize)


def generate(pipeline, prompt: str, **settings):
    """Generate audio with a loaded pipeline; see :meth:`Pipeline.generate` for the settings."""
    return pipeline.generate(prompt, **settings)


def train(data: str | Path, model: str, resume: bool = False, **settings):
    """Train a LoRA on a folder of audio (what ``sa3 train`` runs) and return its
    :class:`~sa3_mlx.training.run.TrainResult` (run folder, LoRA file, log, timing).

    ``settings`` are the fields of :class:`~sa3_mlx.training.run.TrainConfig` (``adapter``,
    ``rank``, ``alpha``, ``steps``, ``lr``, ``batch_size``, ``include``, ``exclude``, ``out``,
    ``save_every``, ``crop``, ``seed``, ``base_precision``, ...). ``resume=True`` continues the
    run in ``out`` exactly. Pass ``on_step=callable`` to see each step's record.
    """
    from .runtime import configure_process
    from .training.run import TrainConfig, train as run_training

    configure_process(training=True)  # on CUDA: no CUDA graphs, when nothing ran on the GPU before
    hooks = {k: settings.pop(k) for k in ("on_step", "on_start", "warn", "encode_progress") if k in settings}
    return run_training(TrainConfig(data=str(data), model=str(model), **settings), resume=resume, **hooks)


__all__ = ["load", "generate", "train", "__version__"]
