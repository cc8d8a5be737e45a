"""Reading the official weight files and loading them strictly into modules.

The official MLX port loads with ``strict=False``: a missing key silently keeps its
random initialisation and a mis-shaped one is never noticed. Here every key of a
module must be present in the file with the right shape, every key of the file must
be used (or be one the model explicitly ignores), and the error names the file,
the key and what was expected.

Arrays are read lazily from the ``.npz`` (a zip of ``.npy`` members) and cast one at
a time, so loading never holds two full copies of a model.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


class WeightError(ValueError):
    """A weight file that is missing, unreadable or does not match the model."""


class NpzWeights(Mapping):
    """A read-only, lazy ``key -> np.ndarray`` view of an ``.npz`` weight file.

    ``shape(key)`` reads only the ``.npy`` header, so a model's config can be
    inferred from a multi-gigabyte file without reading its tensors.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.is_file():
            raise WeightError(f"weight file not found: {self.path}")
        try:
            self._zip = zipfile.ZipFile(self.path)
            members = self._zip.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightError(
                f"{self.path}: not a readable .npz file ({e}); delete it and download it again"
            ) from None
        self._members = {m[:-4]: m for m in members if m.endswith(".npy")}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        member = self._members[key]
        try:
            with self._zip.open(member) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise WeightError(
                f"{self.path}: tensor '{key}' is corrupt ({e}); delete the file and download it again"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._members

    def __len__(self) -> int:
        return len(self._members)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            try:
                with self._zip.open(self._members[key]) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    )
                    shape, _, _ = read_header(f)
            except KeyError:
                raise
            except Exception as e:  # any header damage reads as corruption
                raise WeightError(f"{self.path}: tensor '{key}' is corrupt ({e})") from None
            self._shapes[key] = tuple(shape)
        return self._shapes[key]

    def json(self, key: str) -> dict:
        """A JSON object stored as a uint8 byte array (the T5Gemma ``META`` blob)."""
        try:
            return json.loads(self[key].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightError(f"{self.path}: '{key}' is not valid JSON ({e})") from None

    def close(self) -> None:
        self._zip.close()


class WeightDict(dict):
    """An in-memory ``key -> array`` mapping with the same ``shape``/``name`` surface as NpzWeights."""

    def __init__(self, arrays: Mapping, name: str = "<memory>"):
        super().__init__(arrays)
        self.name = name

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self[key].shape)


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to a temporary name beside ``path``, renamed into place (no half-written file is left)."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_all(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of an ``.npz`` file, read into memory (LoRA merging needs the stored values)."""
    npz = NpzWeights(path)
    try:
        return {k: npz[k] for k in npz}
    finally:
        npz.close()


class WeightView(Mapping):
    """A lazy view of some keys of a weight mapping: arrays are read only when accessed."""

    def __init__(self, weights: Mapping, keys: Iterable[str]):
        self._weights = weights
        self._keys = list(keys)
        self._key_set = set(self._keys)
        self.name = getattr(weights, "name", "<memory>")

    def __getitem__(self, key: str):
        if key not in self._key_set:
            raise KeyError(key)
        return self._weights[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self._weights, key)


class Overlay(Mapping):
    """A weight mapping with some tensors replaced (a LoRA merge's changed ones): the others are read
    from ``base`` only when accessed, so a lazy file stays lazy."""

    def __init__(self, base: Mapping, changes: Mapping, name: str | None = None):
        self._base = base
        self._changes = dict(changes)
        unknown = [k for k in self._changes if k not in base]
        if unknown:
            raise KeyError(unknown[0])
        self.name = name or getattr(base, "name", "<memory>")

    @property
    def changes(self) -> dict:
        return self._changes

    def __getitem__(self, key: str):
        return self._changes[key] if key in self._changes else self._base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def __contains__(self, key: object) -> bool:
        return key in self._base

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._changes:
            return tuple(self._changes[key].shape)
        return shape_of(self._base, key)


def shape_of(weights: Mapping, key: str) -> tuple[int, ...]:
    """Shape of one tensor without reading it where the mapping allows."""
    if hasattr(weights, "shape"):
        return weights.shape(key)
    return tuple(weights[key].shape)


def require(weights: Mapping, key: str, file: str) -> tuple[int, ...]:
    """Shape of a tensor the config inference needs; a clear error if it is absent."""
    if key not in weights:
        raise WeightError(f"{file}: missing key '{key}' (needed to infer the model's size)")
    return shape_of(weights, key)


def count_indexed(weights: Iterable[str], prefix: str) -> int:
    """Number of consecutive ``prefix{i}.`` groups (e.g. transformer layers)."""
    keys = set(weights)
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _quantized_layers(module: nn.Module) -> dict[str, nn.QuantizedLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)}


def _expected(module: nn.Module, weights: Mapping) -> tuple[dict, dict]:
    """``(expected key -> shape, quantized layer name -> layer read from a float weight)``.

    A quantized layer (``nn.QuantizedLinear``) is read from a quantized file (``X.weight`` packed,
    ``X.scales``, ``X.biases``) when the weights hold its ``X.scales``, else from a float file, whose
    ``X.weight`` has the unquantized ``[out, in]`` shape and is quantized as it is read."""
    expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
    from_float = {}
    for name, layer in _quantized_layers(module).items():
        prefix = f"{name}." if name else ""
        if f"{prefix}scales" in weights or f"{prefix}biases" in weights:
            continue
        from_float[name] = layer
        del expected[f"{prefix}scales"], expected[f"{prefix}biases"]
        out_dims, packed = layer.weight.shape
        expected[f"{prefix}weight"] = (out_dims, packed * 32 // layer.bits)
    return expected, from_float


def load_strict(
    module: nn.Module,
    weights: Mapping,
    file: str,
    dtype: mx.Dtype = mx.float32,
    keep_dtype: Iterable[str] = (),
    linear_layout=None,
) -> None:
    """Copy ``weights`` into ``module``: every parameter present, every key used, shapes equal.

    ``weights`` maps module parameter names to arrays (numpy or mlx), already
    sanitized to the module's naming. Floating tensors are cast to ``dtype`` one at
    a time and evaluated at once, so the source array can be released before the
    next one is read. Keys in ``keep_dtype`` keep their own dtype (e.g. fp32 tables).

    Quantized layers (``nn.QuantizedLinear``, see :mod:`sa3_mlx.quantize`) take a quantized file's
    packed uint32 weight and its scales and biases (finite, cast to ``dtype``), or a float file's
    weight, quantized as it is read (scales and biases rounded to fp16, then cast to ``dtype``).
    """
    expected, from_float = _expected(module, weights)
    provided = list(weights.keys())
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in provided if k not in expected]
    problems = []
    for k in missing[:5]:
        problems.append(f"missing key '{k}' (expected shape {_fmt(expected[k])})")
    for k in unexpected[:5]:
        problems.append(f"unexpected key '{k}' (shape {_fmt(shape_of(weights, k))})")
    hint = ""
    for k in provided:
        if k in expected:
            found = shape_of(weights, k)
            if tuple(found) != tuple(expected[k]):
                if not hint and (k.endswith((".scales", ".biases")) or k in ("scales", "biases")):
                    layer = _quantized_layers(module)[k.rsplit(".", 1)[0] if "." in k else ""]
                    hint = (f" (quantization scales and biases: one per {layer.group_size} inputs at {layer.bits} "
                            "bits; the file was quantized with another group size than its record says)")
                problems.append(f"key '{k}' has shape {_fmt(found)}, expected {_fmt(expected[k])}")
    if problems:
        more = len(missing) + len(unexpected) - min(len(missing), 5) - min(len(unexpected), 5)
        tail = f" (and {more} more)" if more > 0 else ""
        raise WeightError(f"{file}: " + "; ".join(problems[:6]) + tail + hint)
    loaded = _convert(module, weights, provided, file, dtype, keep_dtype, linear_layout, from_float)
    module.update(tree_unflatten(loaded))
    if linear_layout is not None:
        module.linear_weights_transposed = True


def update_strict(module: nn.Module, weights: Mapping, file: str, dtype: mx.Dtype = mx.float32,
                  linear_layout=None) -> None:
    """Replace some parameters of a loaded ``module`` (a LoRA merge's changed tensors), converted as
    :func:`load_strict` converts them (layout, dtype; a float weight of a quantized layer is quantized
    again). Every key must be a parameter of the module with its (unquantized) shape."""
    quantized = {f"{n}.weight" if n else "weight": layer for n, layer in _quantized_layers(module).items()}
    expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
    for key, layer in quantized.items():
        expected[key] = (layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits)
    problems = [f"unexpected key '{k}'" for k in weights if k not in expected]
    problems += [f"key '{k}' has shape {_fmt(shape_of(weights, k))}, expected {_fmt(expected[k])}"
                 for k in weights if k in expected and tuple(shape_of(weights, k)) != tuple(expected[k])]
    if problems:
        raise WeightError(f"{file}: " + "; ".join(problems[:6]))
    from_float = {key.rsplit(".", 1)[0] if "." in key else "": layer for key, layer in quantized.items()
                  if key in weights}
    layout = linear_layout if getattr(module, "linear_weights_transposed", False) else None
    loaded = _convert(module, weights, list(weights), file, dtype, (), layout, from_float)
    module.update(tree_unflatten(loaded))


def _convert(module, weights, keys, file, dtype, keep_dtype, linear_layout, from_float) -> list:
    keep = set(keep_dtype)
    # nn.Linear weights a backend wants stored another way (see kernels.Kernels.linear_weight_layout).
    relayout = set()
    if linear_layout is not None:
        relayout = {f"{name}.weight" if name else "weight" for name, m in module.named_modules()
                    if isinstance(m, nn.Linear)}
    quantized = _quantized_layers(module)
    packed = {f"{n}.weight" if n else "weight": layer for n, layer in quantized.items() if n not in from_float}
    quantize_now = {f"{n}.weight" if n else "weight": layer for n, layer in from_float.items()}
    tables = {f"{n}.{t}" if n else t for n in quantized for t in ("scales", "biases")}
    loaded = []
    for k in keys:
        arr = weights[k]
        transposed = k in relayout and not isinstance(arr, mx.array)
        if transposed:
            arr = linear_layout(np.asarray(arr))
        a = mx.array(arr) if not isinstance(arr, mx.array) else arr
        if k in packed:
            if a.dtype != mx.uint32:
                kind = str(a.dtype).rsplit(".", 1)[-1]
                raise WeightError(f"{file}: key '{k}' holds {kind} values, expected a quantized layer's packed "
                                  "uint32 weight (a damaged or foreign file)")
            mx.eval(a)
            loaded.append((k, a))
            del arr, a
            continue
        if not mx.issubdtype(a.dtype, mx.floating):  # every other parameter of these models is floating point
            kind = str(a.dtype).rsplit(".", 1)[-1]
            raise WeightError(f"{file}: key '{k}' holds {kind} values, expected floating-point weights "
                              "(a damaged or foreign file)")
        if k in quantize_now:
            layer = quantize_now[k]
            prefix = k[: -len("weight")]
            q, scales, biases = mx.quantize(a.astype(mx.float32), group_size=layer.group_size, bits=layer.bits)
            scales, biases = (t.astype(mx.float16).astype(dtype) for t in (scales, biases))
            mx.eval(q, scales, biases)
            loaded += [(k, q), (prefix + "scales", scales), (prefix + "biases", biases)]
            del arr, a
            continue
        if k not in keep:
            a = a.astype(dtype)
        mx.eval(a)
        if k in tables and not mx.isfinite(a).all().item():
            raise WeightError(f"{file}: key '{k}' holds non-finite quantization {k.rsplit('.', 1)[-1]} "
                              "(a damaged file); write it again (sa3 convert --quantize)")
        loaded.append((k, a.T if transposed else a))
        del arr, a
    return loaded
