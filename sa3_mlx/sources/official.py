"""The official MLX files of ``stabilityai/stable-audio-3-optimized`` (folder ``MLX/``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .. import hub
from . import DISTILLED_DEFAULTS, PROMPT_TOKENS, CodecLayout


class OfficialSource:
    """One of ``hub.MODELS``, read from ``weights_dir`` or the Hugging Face cache (downloaded on first use)."""

    defaults = DISTILLED_DEFAULTS
    codecs = tuple(hub.CODECS)
    prompt_tokens = PROMPT_TOKENS
    shift = None
    training_seconds = None
    is_release = False

    def __init__(self, model: str, weights_dir: str | Path | None = None, progress: bool = True):
        if model not in hub.MODELS:
            raise ValueError(f"unknown model {model!r} (choose from {', '.join(hub.MODELS)})")
        self.name = model
        self.codec = hub.MODELS[model].codec
        self.weights_dir = weights_dir
        self.progress = progress

    def _path(self, name: str) -> Path:
        return hub.resolve(name, self.weights_dir, progress=self.progress)

    def codec_layout(self, codec: str) -> CodecLayout:
        return CodecLayout(family=hub.codec_family(codec))

    def fetch(self, codec: str, encoder: bool = False) -> list[Path]:
        return [self._path(f) for f in hub.files_for(self.name, codec, encoder)]

    def load_text(self, dtype):
        from ..models.t5gemma import load_t5gemma

        encoder, tokenizer, _ = load_t5gemma(self._path(hub.T5GEMMA_FILE), dtype=dtype)
        return encoder, tokenizer

    def dit_weights(self) -> Mapping:
        from ..weights import NpzWeights

        return NpzWeights(self._path(hub.MODELS[self.name].dit_file))  # lazy: a merge reads what it changes

    def load_dit(self, dtype, weights: Mapping | None = None, quantize=None):
        from ..conditioning import load_conditioner
        from ..models.dit import load_dit
        from ..weights import Overlay

        path = self._path(hub.MODELS[self.name].dit_file)
        source = path if weights is None else Overlay(weights, {}, path.name)
        dit, _, cond = load_dit(source, dtype=dtype, quantize=quantize)
        return dit, load_conditioner(cond, path.name)

    def load_codec(self, codec: str, role: str, dtype):
        from ..models.same import load_same

        return load_same(self._path(hub.codec_file(codec, role)), role=role, dtype=dtype)
