"""Original PyTorch releases (``model_config.json`` + ``model.safetensors`` + the T5 folder), read by
:mod:`sa3_mlx.upstream`; also the face of ``sa3 convert`` folders (:mod:`.converted`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from . import CodecLayout, ModelDefaults


class ReleaseSource:
    """A parsed release (an :class:`~sa3_mlx.upstream.UpstreamModel`, or a converted folder with the
    same surface). It brings its own codec; its files were fetched when it was opened."""

    is_release = True

    def __init__(self, model, name: str | None = None):
        if not model.is_generator:
            raise ValueError(f"{name or model.root} is a codec (model_type 'autoencoder'), not a generator")
        self.model = model
        self.name = str(name or model.root)
        self.codec = model.codec.name
        self.codecs = (self.codec,)
        spec = model.sampling
        self.defaults = ModelDefaults(spec.default_steps, spec.default_cfg, spec.default_sampler, spec.objective)
        self.prompt_tokens = model.text.max_length
        self.shift = spec.shift
        self.training_seconds = model.training_seconds
        self.quantization = getattr(model, "quantization", None)  # a quantized sa3 convert folder's

    def codec_layout(self, codec: str) -> CodecLayout:
        c = self.model.codec
        return CodecLayout(c.family, c.chunk_size, c.stride, c.sample_rate)

    def fetch(self, codec: str, encoder: bool = False) -> list[Path]:
        return []  # fetched when the release was opened

    def load_text(self, dtype):
        return self.model.load_text(dtype=dtype)

    def dit_weights(self) -> Mapping:
        return self.model.dit_weights

    def load_dit(self, dtype, weights: Mapping | None = None, quantize=None):
        return self.model.load_dit(dtype, weights, quantize)

    def load_codec(self, codec: str, role: str, dtype):
        if codec != self.codec:
            raise ValueError(f"{self.name} carries its own codec ({self.codec}); another one cannot be chosen")
        return self.model.load_codec(role, dtype=dtype)
