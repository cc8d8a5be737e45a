"""Where a model comes from: the :class:`ModelSource` interface and :func:`open_source`.

A source knows a generator's recommended settings, its codec and text length, how
to fetch its files, and how to load its three parts (text encoder, DiT with its
conditioner, codec halves). :class:`~sa3_mlx.pipeline.Pipeline` holds one source and
asks it for everything model-specific; it never asks which kind of source it holds.

Implementations:

* :mod:`.official` -- the official MLX files (hub or ``--weights-dir``);
* :mod:`.release` -- original PyTorch releases (``model_config.json`` + safetensors);
* :mod:`.converted` -- folders written by ``sa3 convert``;
* :mod:`.modules` -- modules built in memory: full-size random weights (``sa3 bench
  --random-weights``) or given modules (tests).

Adding a source: a class with the members of :class:`ModelSource` in a new module
here, and a branch in :func:`open_source` that recognises what names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

from ..audio import SAMPLE_RATE
from ..settings import OBJECTIVE_SAMPLERS, SAMPLERS


@dataclass(frozen=True)
class ModelDefaults:
    """A generator's recommended sampling settings, and its diffusion objective (which decides the
    samplers it takes: ``settings.OBJECTIVE_SAMPLERS``)."""

    steps: int
    cfg: float
    sampler: str  # a key of sampling.SAMPLERS
    objective: str = "rf_denoiser"  # rf_denoiser (distilled) or rectified_flow (base)

    @property
    def samplers(self) -> tuple[str, ...]:
        return OBJECTIVE_SAMPLERS.get(self.objective, SAMPLERS)


# The official MLX bundles hold the distilled (rf_denoiser) generators.
DISTILLED_DEFAULTS = ModelDefaults(steps=8, cfg=1.0, sampler="pingpong", objective="rf_denoiser")
PROMPT_TOKENS = 256  # the official MLX/TensorRT runners' T5 length: 256 tokens + 1 seconds token


@dataclass(frozen=True)
class CodecLayout:
    """What a generator's length rule needs of its codec (upstream ``generate()``'s headroom rule)."""

    family: str  # "s" or "l"
    chunk_size: int = 32  # generate() aligns lengths to chunk_size / stride latents
    stride: int = 16
    sample_rate: int = SAMPLE_RATE


@runtime_checkable
class ModelSource(Protocol):
    """A generator's files and facts. Every loader is strict: a wrong file is a ``WeightError``."""

    name: str  # what the metadata records: "sm-music", a repo id or a folder
    defaults: ModelDefaults
    codec: str  # the codec it was trained with ("same-s" or "same-l")
    codecs: tuple[str, ...]  # the codecs it can decode with
    prompt_tokens: int  # the T5 sequence length
    shift: dict | None  # sampling_distribution_shift_options (None: the LogSNR default)
    training_seconds: float | None  # clips beyond this are off-distribution (None: unknown)
    is_release: bool  # True for original releases and conversions of them (--model)

    def codec_layout(self, codec: str) -> CodecLayout: ...
    def fetch(self, codec: str, encoder: bool = False) -> list[Path]: ...
    def load_text(self, dtype) -> tuple[Any, Any]: ...  # (T5GemmaEncoder, tokenizer)
    def dit_weights(self) -> Mapping: ...  # the stored DiT + cond.* tensors, lazy where it can (LoRA merging)
    # (DiT, Conditioner); quantize: a sa3_mlx.quantize.Quantization or None
    def load_dit(self, dtype, weights: Mapping | None = None, quantize=None) -> tuple[Any, Any]: ...
    def load_codec(self, codec: str, role: str, dtype) -> Any: ...  # SAMEEncoder / SAMEDecoder


def open_source(model: str | Path, weights_dir: str | Path | None = None, progress: bool = True) -> ModelSource:
    """The source a name means: an official generator (``hub.MODELS``), a ``sa3 convert`` folder,
    or an original release (a local folder with ``model_config.json`` or a hub repo id)."""
    from .. import hub, upstream

    if str(model) in hub.MODELS:
        from .official import OfficialSource

        return OfficialSource(str(model), weights_dir, progress)
    if not upstream.is_upstream_source(model):
        raise ValueError(
            f"unknown model {model!r} (choose from {', '.join(hub.MODELS)}, or give a Hugging Face "
            "repo id or a folder with model_config.json)"
        )
    root = upstream.resolve(model, progress)
    if (root / hub.CONVERTED_MANIFEST).is_file():
        from .converted import ConvertedSource

        return ConvertedSource(root, name=str(model))
    from .release import ReleaseSource

    return ReleaseSource(upstream.parse(root), name=str(model))


def missing_files(model: str | Path, codec: str | None = None, weights_dir: str | Path | None = None,
                  encoder: bool = False) -> list[str]:
    """What a run of ``model`` would have to download here: the official files not in ``weights_dir`` (or the
    Hugging Face cache), or a release that is neither a local folder nor in the cache. Never touches the
    network; empty when everything is local."""
    from .. import hub, upstream

    if str(model) in hub.MODELS:
        missing = []
        for name in hub.files_for(str(model), codec, encoder):
            if weights_dir is not None:
                try:
                    hub.local_file(weights_dir, name)
                except hub.WeightsUnavailable:
                    missing.append(f"{name} (not in {weights_dir})")
            elif hub.cached_file(name) is None:
                missing.append(f"{hub.REPO_FOLDER}/{name} (not in the Hugging Face cache)")
        return missing
    path = Path(model).expanduser()
    if path.is_dir():
        return [] if upstream.is_upstream_source(path) else [f"{path}/{upstream.CONFIG_FILE}"]
    if not upstream.is_upstream_source(model):
        return [f"{model} (no such folder, and not a Hugging Face repo id)"]
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(str(model), upstream.CONFIG_FILE)
    return [] if isinstance(found, str) else [f"{model} (not in the Hugging Face cache)"]
