"""Folders written by ``sa3 convert``: the official file set plus ``sa3_model.json`` and ``tokenizer/``."""

from __future__ import annotations

import json
from pathlib import Path

from .. import hub, upstream
from ..weights import NpzWeights, Overlay
from .release import ReleaseSource


class ConvertedModel:
    """A ``sa3 convert`` folder with the surface of :class:`~sa3_mlx.upstream.UpstreamModel`,
    read from the official-format files."""

    def __init__(self, root: Path):
        self.root = root
        manifest_path = root / hub.CONVERTED_MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise upstream.UpstreamError(f"{manifest_path}: cannot read ({e})") from None
        self.model_type = manifest["model_type"]
        codec = dict(manifest["codec"])
        for key in ("decoder_overrides", "encoder_overrides"):
            if "sliding_window" in codec[key]:
                codec[key]["sliding_window"] = tuple(codec[key]["sliding_window"])
        self.codec = upstream.CodecSpec(**codec)
        self.is_generator = "dit_file" in manifest
        if self.is_generator:
            self.dit_file = root / manifest["dit_file"]
            self.text = upstream.TextSpec(**manifest["text"])
            self.sampling = upstream.SamplingSpec(**manifest["sampling"])
            self.seconds_range = tuple(manifest["seconds_range"])
            self.training_seconds = manifest.get("training_seconds")
            self.dit_config = manifest["dit_config"]
            self.quantization = None
            if manifest.get("quantization"):
                from ..quantize import Quantization

                q = manifest["quantization"]
                try:
                    self.quantization = Quantization(q["bits"], q["group_size"])
                except (KeyError, TypeError, ValueError) as e:
                    raise upstream.UpstreamError(f"{manifest_path}: damaged 'quantization' entry ({e})") from None
        self._dit_weights = None

    @property
    def dit_weights(self) -> dict:
        """The stored DiT tensors (read on first use; LoRA merging starts from them)."""
        if self._dit_weights is None:
            self._dit_weights = NpzWeights(self.dit_file)  # lazy: a merge reads what it changes
        return self._dit_weights

    def load_dit(self, dtype, weights=None, quantize=None):
        from ..conditioning import load_conditioner
        from ..models.dit import DiTConfig, load_dit

        source = Overlay(weights, {}, self.dit_file.name) if weights is not None else self.dit_file
        dit, config, cond = load_dit(source, dtype=dtype, quantize=quantize)
        upstream.check_dit_config(config, DiTConfig(**self.dit_config), self.root / hub.CONVERTED_MANIFEST)
        return dit, load_conditioner(cond, self.dit_file.name, seconds_range=self.seconds_range)

    def load_codec(self, role: str, dtype):
        from ..models.same import load_same

        overrides = self.codec.decoder_overrides if role == "decoder" else self.codec.encoder_overrides
        path = self.root / f"same_{self.codec.family}_{role}_f32.npz"
        model = load_same(path, role, family=self.codec.family, dtype=dtype, **overrides)
        upstream.check_codec_sizes(model.config, self.codec, role, self.root / hub.CONVERTED_MANIFEST)
        return model

    def load_text(self, dtype):
        """The official T5 file's encoder with the release's own tokenizer (BOS, padding side)."""
        from ..models.t5gemma import load_t5gemma

        encoder, _, _ = load_t5gemma(self.root / hub.T5GEMMA_FILE, dtype=dtype)
        return encoder, upstream.HFTokenizer(self.root / hub.CONVERTED_TOKENIZER_DIR)


class ConvertedSource(ReleaseSource):
    """A ``sa3 convert`` folder as a model source: the release it came from, at the official files' speed."""

    def __init__(self, root: Path, name: str | None = None):
        super().__init__(ConvertedModel(Path(root)), name=name)
