"""``sa3 convert``: an original PyTorch release -> the official MLX file set.

Writes what the official bundles hold, so a converted model loads as fast as they do
and through the same strict loaders:

* ``t5gemma_f16.npz``: fp16 encoder tensors, ``META`` (config JSON), ``TOKENIZER_MODEL``
  (the folder's SentencePiece model), ``rope_inv_freq``;
* ``dit_<name>_f16.npz``: fp16 DiT tensors with the ``cond.*`` conditioner tensors;
* ``same_{s,l}_{encoder,decoder}_f32.npz``: fp32 codec halves (weight norm fused).

With ``quantize`` (``sa3 convert --quantize 4``), the DiT file is ``dit_<name>_q4.npz`` (``_q8``; a group
size other than 64 adds ``g32``/``g128``): the transformer blocks' linear layers quantized from the fp16
values (:func:`sa3_mlx.quantize.quantized_arrays`, with its ``QUANTIZATION`` record), which loads
quantized directly and equals loading the fp16 file with ``--quantize`` bit for bit.

Besides those, ``sa3_model.json`` records what the official files cannot (the sampling
objective and shift, the T5 length and padding, the seconds range, codec options) and
``tokenizer/`` keeps the release's tokenizer files, so ``--model OUT_DIR`` runs exactly
like the original release. A converted ``small-music``/``small-sfx``/``medium`` also works as
``--weights-dir OUT_DIR --dit sm-music`` (etc.), with the official runner's defaults.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import upstream
from .weights import save_npz
from .hub import CONVERTED_MANIFEST as MANIFEST
from .hub import CONVERTED_TOKENIZER_DIR as TOKENIZER_DIR
from .hub import T5GEMMA_FILE as T5_FILE
# Repo name endings of the released generators -> the official DiT file names.
OFFICIAL_NAMES = {"small-music": "sm-music", "small-sfx": "sm-sfx", "medium": "medium"}


def dit_name(source: str | Path) -> str:
    """``stabilityai/stable-audio-3-small-music`` -> ``sm-music``; other names pass through, slugged."""
    name = Path(str(source).rstrip("/")).name.lower()
    for ending, official in OFFICIAL_NAMES.items():
        if name.endswith(ending):
            return official
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-") or "model"


def _meta(config) -> np.ndarray:
    fields = {k: v for k, v in asdict(config).items() if v is not None}
    return np.frombuffer(json.dumps(fields).encode("utf-8"), dtype=np.uint8)


def quantized_dit_file(name: str, q) -> str:
    suffix = "" if q.group_size == 64 else f"g{q.group_size}"
    return f"dit_{name}_q{q.bits}{suffix}.npz"


def _quantized_dit(weights: dict, q) -> dict[str, np.ndarray]:
    """The fp16 DiT tensors (``cond.*`` included) with the quantization policy's layers quantized."""
    from .models.dit import DiT, DiTConfig, sanitize
    from .quantize import dit_targets, quantized_arrays
    from .weights import WeightDict

    weights = WeightDict(weights, "dit")
    dit_part, _ = sanitize(weights)
    targets = dit_targets(DiT(DiTConfig.from_weights(dit_part, "dit")), q)  # shapes only: nothing is evaluated
    return quantized_arrays(weights, q, targets)


def convert(source: str | Path, out_dir: str | Path, progress: bool = True, quantize=None) -> list[Path]:
    """Convert ``source`` (repo id or folder) into ``out_dir``; returns the files written. ``quantize``
    (a :class:`sa3_mlx.quantize.Quantization`): write the DiT quantized."""
    from .models.t5gemma import default_rope_inv_freq

    root = upstream.resolve(source, progress)
    if (root / MANIFEST).is_file():
        raise upstream.UpstreamError(f"{root} was written by sa3 convert already; it loads with --model as it is")
    model = upstream.parse(root)
    if quantize is not None and not model.is_generator:
        raise upstream.UpstreamError(f"{root} is a codec (model_type 'autoencoder'); only a generator's DiT is "
                                     "quantized")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    family = model.codec.family
    for role in ("encoder", "decoder"):
        path = out / f"same_{family}_{role}_f32.npz"
        save_npz(path, {k: np.asarray(v, dtype=np.float32) for k, v in model.same_weights[role].items()})
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
        save_npz(path, arrays)
        written.append(path)

        name = dit_name(source)
        dit = {k: np.asarray(v, dtype=np.float16) for k, v in model.dit_weights.items()}
        if quantize is None:
            path = out / f"dit_{name}_f16.npz"
        else:
            path = out / quantized_dit_file(name, quantize)
            dit = _quantized_dit(dit, quantize)
        save_npz(path, dit)
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
            quantization=None if quantize is None else dict(bits=quantize.bits, group_size=quantize.group_size),
        )
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    written.append(path)
    return written
