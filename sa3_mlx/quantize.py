"""Quantized weights: MLX's affine quantization of the DiT's transformer-block linear layers.

``Quantization(bits, group_size)`` is what a run asks for (``--quantize 4``, ``load(bits=4)``). The policy
(:func:`dit_targets`, measured in ``docs/fidelity.md``): the linear layers inside the DiT's transformer
blocks (self- and cross-attention projections, the feed-forward) are quantized: 91% of the small DiT's
parameters, 94% of the medium one's. Everything else stays as stored: the per-block local-conditioning
embedder (257 inputs, which no group size divides; computed once per generation), the input/output
projections and convolutions, the conditioning, timestep and global embedders (quantizing them too cost
5 dB of DiT-output SNR on the reference case for 3-9% of the parameters), norms, memory tokens and the
conditioner. The text encoder and the codecs are not quantized (measured in ``docs/fidelity.md``).

Two ways in, one result:

* at load time, from a float file: each target weight is quantized as it is read
  (:func:`sa3_mlx.weights.load_strict`), so the full-precision model never exists in memory;
* from a quantized file (``sa3 convert --quantize``, :func:`quantized_arrays`): ``X.weight`` (uint32),
  ``X.scales`` and ``X.biases`` (fp16) for each target, and a ``QUANTIZATION`` record (JSON: bits,
  group size, mode, the quantized layers) that the loader reads instead of guessing. Every key is checked
  like any other (missing, unexpected, mis-shaped, non-finite scales are errors).

Both round the scales and biases to fp16 (the files' precision), so a file written by ``sa3 convert
--quantize 4`` loads bit-identical to quantizing the fp16 file at load time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .models.layers import QuantizedLinear
from .weights import WeightError, WeightView, shape_of

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mx.quantize's default
RECORD_KEY = "QUANTIZATION"  # the uint8 JSON record in a quantized file
MODE = "affine"


@dataclass(frozen=True)
class Quantization:
    """``bits`` (8 or 4) per weight, one fp16 scale and bias per ``group_size`` (32, 64, 128) inputs."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"quantization bits must be one of {', '.join(map(str, BITS))} (got {self.bits!r})")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))} "
                             f"(got {self.group_size!r})")

    def __str__(self) -> str:
        return f"{self.bits}-bit (group {self.group_size})"

    @property
    def bytes_per_weight(self) -> float:
        """Packed weight plus its share of the fp16 scale and bias."""
        return self.bits / 8 + 4 / self.group_size


def spec(bits: int | str | None, group_size: int | str | None = None) -> Quantization | None:
    """``Quantization`` from the settings' words (``"4"``, ``"64"``) or numbers; None when ``bits`` is None."""
    if bits is None:
        if group_size is not None:
            raise ValueError("a quantization group size needs the bits (8 or 4)")
        return None
    try:
        bits = int(bits)
        group_size = DEFAULT_GROUP_SIZE if group_size is None else int(group_size)
    except (TypeError, ValueError):
        raise ValueError(f"quantization bits and group size must be whole numbers (got {bits!r}, {group_size!r})")
    return Quantization(bits, group_size)


# ---- the policy --------------------------------------------------------------------------------


def dit_targets(dit: nn.Module, q: Quantization) -> list[str]:
    """The DiT's linear layers that ``q`` quantizes: those inside the transformer blocks whose inputs split
    into whole groups (the local-conditioning embedder's 257 inputs do not, and it is 1% of a block)."""
    return [name for name, m in dit.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("transformer.layers.")
            and ".to_local_embed." not in name and m.weight.shape[1] % q.group_size == 0]


def swap(module: nn.Module, names: list[str], q: Quantization) -> None:
    """Replace the ``nn.Linear`` layers ``names`` of ``module`` by empty :class:`QuantizedLinear` layers of
    the same shape (the loader fills them). A name that is not a linear layer is a ``WeightError``."""
    layers = dict(module.named_modules())
    updates = []
    for name in names:
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear):
            raise WeightError(f"the quantization record names '{name}', which is not a linear layer of the model")
        if layer.weight.shape[1] % q.group_size:
            raise WeightError(f"'{name}' has {layer.weight.shape[1]} inputs, which do not split into groups of "
                              f"{q.group_size}")
        updates.append((name, QuantizedLinear.like(layer, q.group_size, q.bits)))
    if updates:
        from mlx.utils import tree_unflatten

        module.update_modules(tree_unflatten(updates))


def quantize_weight(w, q: Quantization) -> tuple[mx.array, mx.array, mx.array]:
    """``(packed uint32, scales, biases)`` of a float ``[out, in]`` weight: quantized from its fp32 values,
    the scales and biases rounded to fp16 (the files' precision)."""
    w = mx.array(w) if not isinstance(w, mx.array) else w
    packed, scales, biases = mx.quantize(w.astype(mx.float32), group_size=q.group_size, bits=q.bits)
    return packed, scales.astype(mx.float16), biases.astype(mx.float16)


def quantize_module(module: nn.Module, q: Quantization, names: list[str], dtype: mx.Dtype | None = None) -> None:
    """Quantize the linear layers ``names`` of a module built in memory (random weights, tests), in place,
    one layer at a time; scales and biases in ``dtype`` (default: each layer's own)."""
    layers = dict(module.named_modules())
    dtypes = {name: dtype or layers[name].weight.dtype for name in names if isinstance(layers.get(name), nn.Linear)}
    weights = {name: layers[name].weight for name in dtypes}
    biases = {name: layers[name].bias for name in dtypes if "bias" in layers[name]}
    swap(module, names, q)
    layers = dict(module.named_modules())
    for name in list(weights):
        packed, scales, group_biases = quantize_weight(weights.pop(name), q)  # the float weight dies here
        layer = layers[name]
        layer.weight, layer.scales, layer.biases = packed, scales.astype(dtypes[name]), group_biases.astype(dtypes[name])
        if name in biases:
            layer.bias = biases[name].astype(dtypes[name])
        mx.eval(layer.parameters())
    module.quantization = q


# ---- files -------------------------------------------------------------------------------------


def record(q: Quantization, layers: list[str]) -> np.ndarray:
    """The ``QUANTIZATION`` record of a file: JSON as uint8 bytes."""
    text = json.dumps({"bits": q.bits, "group_size": q.group_size, "mode": MODE, "layers": list(layers)})
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def read_record(weights: Mapping, file: str) -> tuple[Quantization, list[str]] | None:
    """``(quantization, quantized layers)`` of a file that has a ``QUANTIZATION`` record, None otherwise.
    A damaged record is a ``WeightError``."""
    if RECORD_KEY not in weights:
        return None
    try:
        data = json.loads(np.asarray(weights[RECORD_KEY]).tobytes().decode("utf-8"))
        if data.get("mode", MODE) != MODE:
            raise ValueError(f"mode {data.get('mode')!r} (only affine is supported)")
        layers = data["layers"]
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            raise ValueError("'layers' must be a list of layer names")
        return Quantization(data["bits"], data["group_size"]), layers
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise WeightError(f"{file}: the {RECORD_KEY} record is damaged ({e}); write the file again "
                          "(sa3 convert --quantize)") from None


class LogicalShapes(WeightView):
    """A quantized file seen with its layers' unquantized shapes (``X.weight`` ``[out, in]`` instead of the
    packed ``[out, in * bits / 32]``), for the config inference; no tensor is read. ``keys``: the keys shown
    (default all)."""

    def __init__(self, weights: Mapping, q: Quantization, layers: list[str], keys: Iterable[str] | None = None):
        super().__init__(weights, weights if keys is None else keys)
        self._q = q
        self._packed = {f"{name}.weight": name for name in layers}

    def shape(self, key: str) -> tuple[int, ...]:
        shape = shape_of(self._weights, key)
        if key in self._packed and len(shape) == 2:
            return (shape[0], shape[1] * 32 // self._q.bits)
        return shape


def quantized_arrays(weights: Mapping, q: Quantization, layers: list[str]) -> dict[str, np.ndarray]:
    """A float weight mapping as a quantized file's arrays: each of ``layers`` as ``X.weight`` (uint32),
    ``X.scales``, ``X.biases`` (fp16), every other tensor as it is, and the ``QUANTIZATION`` record."""
    targets = {f"{name}.weight" for name in layers}
    missing = sorted(targets - set(weights))
    if missing:
        raise WeightError(f"{getattr(weights, 'name', '<memory>')}: no weight '{missing[0]}' to quantize")
    out = {}
    for key in weights:
        if key in targets:
            packed, scales, biases = quantize_weight(weights[key], q)
            prefix = key[: -len(".weight")]
            out[key], out[f"{prefix}.scales"], out[f"{prefix}.biases"] = (np.array(a) for a in (packed, scales, biases))
        else:
            out[key] = np.asarray(weights[key])
    out[RECORD_KEY] = record(q, layers)
    return out


class DequantizedView(LogicalShapes):
    """A quantized file seen as a float one (LoRA merging starts from float weights): each quantized
    layer's ``X.weight`` dequantized to fp32 ``[out, in]`` when read, its ``X.scales``/``X.biases`` and the
    record hidden. Merging into these and quantizing again is all a quantized file allows; quantizing the
    fp16 file at load time (``--quantize``) merges into the stored weights instead."""

    def __init__(self, weights: Mapping, q: Quantization, layers: list[str]):
        hidden = {RECORD_KEY} | {f"{name}.{t}" for name in layers for t in ("scales", "biases")}
        super().__init__(weights, q, layers, keys=[k for k in weights if k not in hidden])

    def __getitem__(self, key: str):
        if key not in self._packed:
            return super().__getitem__(key)  # KeyError for the hidden keys
        prefix = self._packed[key]
        w = mx.dequantize(mx.array(self._weights[key]), mx.array(self._weights[f"{prefix}.scales"]).astype(mx.float32),
                          mx.array(self._weights[f"{prefix}.biases"]).astype(mx.float32),
                          group_size=self._q.group_size, bits=self._q.bits)
        return np.array(w)


def float_view(weights: Mapping) -> Mapping:
    """``weights`` as float tensors: a quantized file through :class:`DequantizedView`, others as they are."""
    stored = read_record(weights, getattr(weights, "name", "<memory>"))
    return weights if stored is None else DequantizedView(weights, *stored)
