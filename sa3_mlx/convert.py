"""``sa3 convert``: an original PyTorch release -> the official MLX file set.

Writes what the official bundles hold, so a converted model loads as fast as they do
and through the same strict loaders:

* ``t5gemma_f16.npz``: fp16 encoder tensors, ``META`` (config JSON), ``TOKENIZER_MODEL``
  (the folder's SentencePiece model), ``rope_inv_freq``;
* ``dit_<name>_f16.npz``: fp16 DiT tensors with the ``cond.*`` conditioner tensors;
* ``same_{s,l}_{encoder,decoder}_f32.npz``: fp32 codec halves (weight norm fused).

Besides those, ``sa3_model.json`` records what the official files cannot (the sampling
objective and shift, the T5 length and padding, the seconds range, codec options) and
``tokenizer/`` keeps the release's tokenizer files, so ``--model OUT_DIR`` runs exactly
like the original release. A converted ``small-music``/``small-sfx``/``medium`` also works as
``--weights-dir OUT_DIR --dit sm-music`` (etc.), with the official runner's defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import upstream
from .weights import NpzWeights, WeightDict

MANIFEST = upstream.CONVERTED_MANIFEST
TOKENIZER_DIR = "tokenizer"
T5_FILE = "t5gemma_f16.npz"
# Repo name endings of the released generators -> the official DiT file names.
OFFICIAL_NAMES = {"small-music": "sm-music", "small-sfx": "sm-sfx", "medium": "medium"}


def dit_name(source: str | Path) -> str:
    """``stabilityai/stable-audio-3-small-music`` -> ``sm-music``; other names pass through, slugged."""
    name = Path(str(source).rstrip("/")).name.lower()
    for ending, official in OFFICIAL_NAMES.items():
        if name.endswith(ending):
            return official
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-") or "model"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to a temporary name, renamed into place (no half-written file is left)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _meta(config) -> np.ndarray:
    fields = {k: v for k, v in asdict(config).items() if v is not None}
    return np.frombuffer(json.dumps(fields).encode("utf-8"), dtype=np.uint8)


def convert(source: str | Path, out_dir: str | Path, progress: bool = True) -> list[Path]:
    """Convert ``source`` (repo id or folder) into ``out_dir``; returns the files written."""
    from .models.t5gemma import default_rope_inv_freq

    model = upstream.load(source, progress=progress)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    family = model.codec.family
    for role in ("encoder", "decoder"):
        path = out / f"same_{family}_{role}_f32.npz"
        _save_npz(path, {k: np.asarray(v, dtype=np.float32) for k, v in model.same_weights[role].items()})
        written.append(path)
    manifest = dict(
        source=str(source), model_type=model.model_type, codec=asdict(model.codec),
    )
    if model.is_generator:
        config, t5 = model.t5_weights()
        tokenizer = upstream.HFTokenizer(model.text_folder())
        sp_model = tokenizer.sentencepiece_model()
        if sp_model is None:
            raise upstream.UpstreamError(
                f"{model.text_folder()}: no tokenizer.model (the official T5 file embeds the SentencePiece model)"
            )
        arrays = {k: np.asarray(v, dtype=np.float16) for k, v in t5.items()}
        arrays["META"] = _meta(config)
        arrays["TOKENIZER_MODEL"] = np.frombuffer(sp_model, dtype=np.uint8)
        arrays["rope_inv_freq"] = np.array(default_rope_inv_freq(config), dtype=np.float32)
        path = out / T5_FILE
        _save_npz(path, arrays)
        written.append(path)

        name = dit_name(source)
        path = out / f"dit_{name}_f16.npz"
        _save_npz(path, {k: np.asarray(v, dtype=np.float16) for k, v in model.dit_weights.items()})
        written.append(path)

        tokenizer_dir = out / TOKENIZER_DIR
        tokenizer_dir.mkdir(exist_ok=True)
        for file in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
            if (model.text_folder() / file).is_file():
                shutil.copy2(model.text_folder() / file, tokenizer_dir / file)
                written.append(tokenizer_dir / file)
        manifest.update(
            dit_file=path.name, text=asdict(model.text), sampling=asdict(model.sampling),
            seconds_range=list(model.seconds_range), dit_config=model.dit_config,
            training_seconds=model.training_seconds,
        )
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    written.append(path)
    return written


class ConvertedModel:
    """A ``sa3 convert`` folder, with the surface :class:`~sa3_mlx.pipeline.Pipeline` uses
    of :class:`~sa3_mlx.upstream.UpstreamModel`, read from the official-format files."""

    def __init__(self, root: Path):
        self.root = root
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise upstream.UpstreamError(f"{root / MANIFEST}: cannot read ({e})") from None
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
        self._dit_weights = None

    @property
    def dit_weights(self) -> dict:
        """The stored DiT tensors (read on first use; LoRA merging starts from them)."""
        if self._dit_weights is None:
            npz = NpzWeights(self.dit_file)
            self._dit_weights = {k: npz[k] for k in npz}
            npz.close()
        return self._dit_weights

    def load_dit(self, dtype: mx.Dtype = mx.float32, weights=None):
        from .conditioning import load_conditioner
        from .models.dit import DiTConfig, load_dit

        source = WeightDict(weights, self.dit_file.name) if weights is not None else self.dit_file
        dit, config, cond = load_dit(source, dtype=dtype)
        upstream.check_dit_config(config, DiTConfig(**self.dit_config), self.root / MANIFEST)
        return dit, load_conditioner(cond, self.dit_file.name, seconds_range=self.seconds_range)

    def load_codec(self, role: str, dtype: mx.Dtype = mx.float32):
        from .models.same import load_same

        overrides = self.codec.decoder_overrides if role == "decoder" else self.codec.encoder_overrides
        path = self.root / f"same_{self.codec.family}_{role}_f32.npz"
        model = load_same(path, role, family=self.codec.family, dtype=dtype, **overrides)
        upstream.check_codec_sizes(model.config, self.codec, role, self.root / MANIFEST)
        return model

    def load_text(self, dtype: mx.Dtype = mx.float32):
        """The official T5 file's encoder with the release's own tokenizer (BOS, padding side)."""
        from .models.t5gemma import load_t5gemma

        encoder, _, _ = load_t5gemma(self.root / T5_FILE, dtype=dtype)
        return encoder, upstream.HFTokenizer(self.root / TOKENIZER_DIR)


def run(argv: list[str]) -> int:
    """``sa3 convert REPO_OR_PATH OUT_DIR``."""
    from .cli.parsing import Parser

    p = Parser(prog="sa3 convert", description="Convert an original Stable Audio 3 release (Hugging Face repo "
               "or local folder with model_config.json) into the official MLX file set.")
    p.add_argument("source", metavar="REPO_OR_PATH")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    args = p.parse_args(argv)
    for path in convert(args.source, args.out_dir):
        print(path)
    return 0
