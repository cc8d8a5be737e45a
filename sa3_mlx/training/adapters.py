"""LoRA parametrizations for training: trainable fp32 tensors over a frozen base.

The adapted weight of every targeted module is recomputed from the frozen base ``W0``
and the trainable tensors on each forward pass (upstream ``torch.nn.utils.parametrize``
does the same), so :func:`mlx.core.value_and_grad` differentiates through it, norms
included (upstream does not detach them). With ``s = alpha / rank`` and ``W0`` the 2-D
view ``[out, in * k]`` of the base weight:

* ``lora``: ``W0 + s B A``; ``lora-xs``: ``W0 + s U M V^T`` (``U``, ``V`` frozen SVD bases).
* ``dora-rows`` / ``dora-cols`` (and ``-xs``): ``V = W0 + s delta``, each row (column)
  normalised and scaled by ``magnitude``.
* ``bora`` (and ``-xs``): row normalisation times ``magnitude_r``, then column
  normalisation times ``magnitude_c``.

Initial values as upstream ``add_lora``: ``lora_A`` kaiming-uniform (a = sqrt 5, i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in))), ``lora_B`` and ``M_xs`` zero, magnitudes the norms of
``W0``. Module names and the filters are the ones of :mod:`sa3_mlx.lora` (upstream's
paths relative to the DiT root ``model.`` and the conditioner root ``conditioners.``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import lora as lora_io

ADAPTER_TYPES = lora_io.ADAPTER_TYPES
PARAMS = lora_io.PARAMS
EPS = 1e-12


@dataclass(frozen=True)
class AdapterConfig:
    adapter_type: str = "dora-rows"
    rank: int = 16
    alpha: float | None = None  # None: = rank
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter type {self.adapter_type!r} is not one of {', '.join(ADAPTER_TYPES)}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.alpha_value / self.rank

    def targets(self, module: str) -> bool:
        """Upstream's filter: substring match after ``[a-b]`` expansion; exclude wins."""
        if self.include is not None and not lora_io._matches(module, self.include):
            return False
        return self.exclude is None or not lora_io._matches(module, self.exclude)

    def config_json(self) -> dict:
        """The ``lora_config`` fields upstream writes."""
        alpha = self.alpha_value
        return {"rank": self.rank, "alpha": int(alpha) if alpha == int(alpha) else alpha,
                "adapter_type": self.adapter_type, "dropout": 0.0,
                "include": None if self.include is None else list(self.include),
                "exclude": None if self.exclude is None else list(self.exclude)}


def svd_bases(w0: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``U [out, r]``, ``V [in, r]`` of ``W0`` with upstream's sign convention (fp32 result)."""
    u, v = lora_io._svd_bases(np.asarray(w0, np.float32), rank)
    return u.astype(np.float32), v.astype(np.float32)


def adapted_weight(kind: str, scale: float, params: Mapping[str, mx.array], w0: mx.array,
                   bases: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """The parametrized 2-D weight ``[out, in * k]`` (fp32) from the 2-D base ``w0``."""
    w = w0.astype(mx.float32)
    if kind.endswith("-xs"):
        u, v = bases
        delta = (u @ params["M_xs"]) @ v.T
    else:
        delta = params["lora_B"] @ params["lora_A"]
    adapted = w + scale * delta
    if kind in ("lora", "lora-xs"):
        return adapted
    if kind.startswith("dora"):
        axis = 1 if kind.startswith("dora-rows") else 0
        norm = mx.sqrt(mx.sum(adapted * adapted, axis=axis, keepdims=True))
        return adapted / (norm + EPS) * mx.expand_dims(params["magnitude"], axis)
    rows = adapted / (mx.sqrt(mx.sum(adapted * adapted, axis=1, keepdims=True)) + EPS)
    rows = params["magnitude_r"][:, None] * rows
    cols = rows / (mx.sqrt(mx.sum(rows * rows, axis=0, keepdims=True)) + EPS)
    return cols * params["magnitude_c"][None, :]


@dataclass
class Target:
    module: str  # upstream path, e.g. model.transformer.layers.0.self_attn.to_qkv
    key: str  # official MLX weight key
    shape: tuple[int, ...]  # MLX weight shape
    w0: mx.array  # frozen base, 2-D [out, in * k], in the base precision
    bases: tuple[mx.array, mx.array] | None = None  # -xs: U, V (fp32)

    @property
    def dims(self) -> tuple[int, int]:
        return int(self.w0.shape[0]), int(self.w0.shape[1])


@dataclass
class LoraParametrization:
    """The targeted modules of one model and their trainable tensors (``params[module][name]``)."""

    config: AdapterConfig
    targets: list[Target] = field(default_factory=list)

    @classmethod
    def build(cls, weights: Mapping, config: AdapterConfig, base_dtype: mx.Dtype = mx.float32,
              bases: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> "LoraParametrization":
        """Targets in upstream's order: the DiT's modules (in module order), then the seconds embedder.

        ``weights``: the unquantized base weights with official MLX names (``cond.*`` included).
        ``bases``: precomputed ``-xs`` bases per module (else computed by SVD here).
        """
        out = cls(config)
        keys = lora_io.target_keys(weights)
        modules = [(lora_io.key_to_module(k), k) for k in keys]
        dit = [(m, k) for m, k in modules if k != lora_io.SECONDS_KEY]
        dit.sort(key=lambda mk: _module_order(mk[0]))
        rest = [(m, k) for m, k in modules if k == lora_io.SECONDS_KEY]
        for module, key in dit + rest:
            if not config.targets(module):
                continue
            base = weights[key]
            if isinstance(base, mx.array) and base.dtype == mx.bfloat16:  # numpy has no bfloat16 (GPU bases)
                base = base.astype(mx.float32)
            base = np.asarray(base)
            w0 = base.reshape(base.shape[0], -1)
            b = None
            if config.adapter_type.endswith("-xs"):
                u, v = bases[module] if bases and module in bases else svd_bases(w0.astype(np.float32), config.rank)
                b = (mx.array(np.asarray(u, np.float32)), mx.array(np.asarray(v, np.float32)))
            out.targets.append(Target(module, key, tuple(base.shape), mx.array(w0).astype(base_dtype), b))
        return out

    @property
    def modules(self) -> list[str]:
        return [t.module for t in self.targets]

    def init_params(self, seed: int = 0) -> dict[str, mx.array]:
        """Upstream's initial values (flat saved names, see :func:`param_key`); ``lora_A`` from a
        seeded kaiming-uniform draw."""
        rng = np.random.default_rng(seed)
        kind, r = self.config.adapter_type, self.config.rank
        params = {}
        for t in self.targets:
            out_dim, in_dim = t.dims
            w0 = np.asarray(t.w0.astype(mx.float32))
            p = {}
            for name in PARAMS[kind]:
                if name == "lora_A":
                    bound = 1.0 / math.sqrt(in_dim)
                    p[name] = rng.uniform(-bound, bound, (r, in_dim)).astype(np.float32)
                elif name == "lora_B":
                    p[name] = np.zeros((out_dim, r), np.float32)
                elif name == "M_xs":
                    p[name] = np.zeros((r, r), np.float32)
                elif name == "magnitude":
                    p[name] = np.linalg.norm(w0, axis=0 if "cols" in kind else 1).astype(np.float32)
                elif name == "magnitude_r":
                    p[name] = np.linalg.norm(w0, axis=1).astype(np.float32)
                else:
                    p[name] = np.linalg.norm(w0, axis=0).astype(np.float32)
            params.update({param_key(t.module, k): mx.array(v) for k, v in p.items()})
        return params

    def weights(self, params: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """MLX key -> adapted weight in the base layout and precision (upstream casts back to W's dtype)."""
        kind, scale = self.config.adapter_type, self.config.scale
        out = {}
        for t in self.targets:
            mine = {p: params[param_key(t.module, p)] for p in PARAMS[kind]}
            w = adapted_weight(kind, scale, mine, t.w0, t.bases)
            out[t.key] = w.astype(t.w0.dtype).reshape(t.shape)
        return out

    def trainable_count(self) -> int:
        r, kind = self.config.rank, self.config.adapter_type
        total = 0
        for t in self.targets:
            o, i = t.dims
            sizes = {"lora_A": r * i, "lora_B": o * r, "M_xs": r * r, "magnitude": i if "cols" in kind else o,
                     "magnitude_r": o, "magnitude_c": i}
            total += sum(sizes[p] for p in PARAMS[kind])
        return total


def _module_order(module: str) -> tuple:
    """Upstream's ``named_modules`` order of the DiT (registration order of its submodules)."""
    top = ["to_timestep_embed", "to_cond_embed", "to_global_embed", "transformer", "preprocess_conv", "postprocess_conv"]
    inner = ["layers", "project_in", "project_out", "global_cond_embedder"]
    block = ["self_attn.to_qkv", "self_attn.to_out", "cross_attn.to_q", "cross_attn.to_kv", "cross_attn.to_out",
             "ff.ff.0.proj", "ff.ff.2", "to_local_embed.0", "to_local_embed.2"]
    parts = module.split(".")[1:]
    head = top.index(parts[0]) if parts[0] in top else len(top)
    if parts[0] != "transformer":
        return (head, int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0)
    if parts[1] != "layers":
        return (head, inner.index(parts[1]), int(parts[2]) if len(parts) > 2 else 0)
    rest = ".".join(parts[3:])
    return (head, inner.index("layers"), int(parts[2]), block.index(rest) if rest in block else len(block))


def param_key(module: str, param: str) -> str:
    """Upstream's saved name of a LoRA tensor: ``<module>.parametrizations.weight.0.<param>``."""
    return f"{module}{lora_io.KEY_MARK}0.{param}"


def factored_scales(kind: str, s: float, p: Mapping[str, mx.array], left: mx.array, right: mx.array, w0: mx.array,
                    constants: Mapping[str, mx.array]) -> tuple[mx.array | None, mx.array | None]:
    """Row / column scales of a scaled adapter type from the norms of ``V = W0 + s R L``, without forming ``V``:
    ``||V_i||^2 = ||W0_i||^2 + 2 s <R_i, (W0 L^T)_i> + s^2 R_i (L L^T) R_i^T`` (rows), the same with the roles
    of ``L`` and ``R`` exchanged for columns, and for bora's columns of ``diag(r) V`` with ``R`` weighted by
    ``r^2``. Works on one module (``L [r, in]``, ``R [out, r]``, ``W0 [out, in]``) or on a stack of them
    (a leading axis on every array: :class:`StackedAdapters`). ``constants``: the base's squared row norms
    (``row_sq``), column norms (``col_sq``) and, for bora, ``w0_sq`` (``W0**2``)."""
    if kind in ("lora", "lora-xs"):
        return None, None
    T = (lambda a: a.swapaxes(-1, -2))  # noqa: E731
    w0 = w0.astype(mx.float32)
    if kind.startswith("dora-cols"):
        sq = constants["col_sq"] + 2 * s * mx.sum(left * (T(right) @ w0), axis=-2) \
            + s * s * mx.sum(left * ((T(right) @ right) @ left), axis=-2)
        return None, p["magnitude"] / (mx.sqrt(mx.maximum(sq, 0)) + EPS)
    sq = constants["row_sq"] + 2 * s * mx.sum(right * (w0 @ T(left)), axis=-1) \
        + s * s * mx.sum((right @ (left @ T(left))) * right, axis=-1)
    norm = mx.sqrt(mx.maximum(sq, 0))
    if kind.startswith("dora-rows"):
        return p["magnitude"] / (norm + EPS), None
    rows = p["magnitude_r"] / (norm + EPS)
    r2 = rows * rows
    weighted = right * mx.expand_dims(r2, -1)
    sq_c = (mx.expand_dims(r2, -2) @ constants["w0_sq"]).squeeze(-2) + 2 * s * mx.sum(left * (T(weighted) @ w0), axis=-2) \
        + s * s * mx.sum(left * ((T(weighted) @ right) @ left), axis=-2)
    return rows, p["magnitude_c"] / (mx.sqrt(mx.maximum(sq_c, 0)) + EPS)


def given_product(x: mx.array, given: Mapping[str, mx.array], w0t: mx.array, bias: mx.array | None) -> mx.array:
    """``x`` through an adapted layer whose factors and scales a :class:`StackedAdapters` made (``given``, in the
    activations' dtype): column scales, then the adapted weight (``wt``, when the stack merged it) or the base
    and the low-rank product, then row scales and the bias. One layer (``w0t`` [in, out]) or a stack of them
    (``[n, in, out]``, ``x`` [n, rows, in])."""
    dtype = x.dtype
    cast = (lambda a: a if a.dtype == dtype else a.astype(dtype))  # noqa: E731
    if "cols" in given:
        x = x * cast(given["cols"])
    if "wt" in given:
        y = x @ cast(given["wt"])
    else:
        y = x @ w0t + (x @ cast(given["lt"])) @ cast(given["rt"])
    if "rows" in given:
        y = y * cast(given["rows"])
    return y if bias is None else y + bias


@mx.custom_function
def unstack(a: mx.array) -> list[mx.array]:
    """``a``'s parts along its first axis, each keeping that axis (length 1): views of ``a``. Its gradient is
    one concatenation of the parts' gradients, where slicing's own is a full-size zero array, a slice update and
    an addition per part (on a GPU a training step is bound by its number of operations)."""
    return [a[i : i + 1] for i in range(a.shape[0])]


@unstack.vjp
def _unstack_vjp(primal, cotangents, outputs):
    return mx.concatenate(list(cotangents), axis=0)


class StackedAdapters:
    """Several adapted modules of one type and shape (the same module of every DiT block), their per-step
    work done as batched operations: the DoRA / BoRA scales (a few products instead of a few dozen
    operations per module) and the factors in the activations' dtype, transposed and scaled, which each
    module then takes as they are. A GPU step is bound by the number of operations (docs/performance.md).
    The modules' frozen bases become views of one stacked array (no second copy). :meth:`assign` runs on
    each step, with the step's adapter tensors stacked (``TrainStep.pack``)."""

    def __init__(self, layers: list["AdaptedLinear"], merged: bool = False):
        self.layers = layers
        # merged: the layers' adapted weights formed once per step, as one batched product over the stack
        # (``W0^T + L^T (s R^T)``), so that each layer takes one product forward and two backward instead of
        # three and five; the price is the adapted weights and their gradients in memory (TrainStep).
        self.merged = bool(merged)
        first = layers[0]
        self.kind, self.scale = first.kind, first._scale
        self.w0 = mx.stack([layer._w0 for layer in layers])
        self.constants = {k: mx.stack([layer._constants()[k] for layer in layers]) for k in first._constants()}
        self.bases = None
        if first._bases is not None:
            self.bases = (mx.stack([layer._bases[0] for layer in layers]), mx.stack([layer._bases[1] for layer in layers]))
        mx.eval(self.w0, self.constants, self.bases)
        # Views of the stack: split + squeeze share its buffer (an integer index copies).
        view = (lambda a: [x.squeeze(0) for x in mx.split(a, len(layers), axis=0)])  # noqa: E731
        self.w0t = self.w0.swapaxes(-1, -2)  # a view, made once (a transpose per step otherwise)
        for layer, w0, w0t in zip(layers, view(self.w0), view(self.w0t)):
            layer._w0, layer._w0t = w0, w0t
        if self.bases is not None:
            for layer, u, v in zip(layers, view(self.bases[0]), view(self.bases[1])):
                layer._bases = (u, v)
        mx.eval([(layer._w0, layer._w0t) for layer in layers])
        biases = [layer._bias for layer in layers]
        self.bias = mx.stack(biases)[:, None, :] if biases[0] is not None else None
        self.given: dict[str, mx.array] = {}  # this step's factors and scales, [n, ...] (assign)

    def __call__(self, x: mx.array) -> mx.array:
        """Every layer's output at once, as one batched product per factor: ``x`` [B, T, in] shared by the
        layers (the cross-attention context, the local conditioning: the same for every block), or [n, B, T,
        in] one per layer -> [n, B, T, out]. The same arithmetic as each layer's own call."""
        B, T, d = x.shape[-3:]
        y = given_product(x.reshape(-1, B * T, d), self.given, self.w0t, self.bias)
        return y.reshape(len(self.layers), B, T, -1)

    def assign(self, p: Mapping[str, mx.array]) -> None:
        """This step's factors and scales for every layer, from ``p``: each adapter tensor name's ``[n, ...]``
        array of the layers' tensors (``TrainStep.pack``'s layout)."""
        dtype = self.w0.dtype  # the DiT computes in its weights' dtype
        if self.bases is not None:  # -xs: L = V^T, R = U M
            u, v = self.bases
            left, right = v.swapaxes(-1, -2), u @ p["M_xs"]
        else:
            left, right = p["lora_A"], p["lora_B"]
        given = {"lt": left.swapaxes(-1, -2).astype(dtype), "rt": (self.scale * right).swapaxes(-1, -2).astype(dtype)}
        rows, cols = factored_scales(self.kind, self.scale, p, left, right, self.w0, self.constants)
        if self.merged:  # [n, in, out], rounded once to the activations' dtype (upstream rounds W' as well)
            given = {"wt": mx.addmm(self.w0t, given["lt"], given["rt"])}
        if rows is not None:
            # [n, 1, out]: a part has the rank of the block's [B, T, out] activations, so its gradient is one
            # reduction (a [1, out] part's is a reduction and a squeeze)
            given["rows"] = rows.astype(dtype)[:, None, :]
        if cols is not None:
            given["cols"] = cols.astype(dtype)[:, None, :]
        self.given = given
        # Each module's part keeps the leading axis of 1, which its products and scalings broadcast over.
        parts = {k: unstack(v) for k, v in given.items()}
        for i, layer in enumerate(self.layers):
            layer.given = {k: v[i] for k, v in parts.items()}


class AdaptedLinear(nn.Module):
    """A Linear (or 1x1 Conv1d over ``[B, T, C]``) with a LoRA parametrization, in factored form.

    Every adapter type's weight is ``diag(r) (W0 + s R L) diag(c)`` with low-rank factors
    ``L [r, in]``, ``R [out, r]`` (``A``, ``B``; for ``-xs`` ``V^T`` and ``U M``) and optional
    row / column scales ``r = m / ||V||_row`` (dora-rows, bora) and ``c`` (dora-cols, bora),
    so ``y = ((x c) W0^T + s ((x c) L^T) R^T) r + bias`` equals ``x W'^T + bias`` without
    forming the weight for the product, and the backward pass needs no full-size weight
    gradient, and the norms of ``V`` come from ``[out, r]`` / ``[r, in]`` products (see
    :meth:`_scales`; bora keeps ``W0**2`` for its column norms). The frozen base and the
    bias are private (not parameters); the adapter tensors are set per step (``adapter``). A stack with
    ``merged`` set hands the layer its adapted weight instead (``given["wt"]``, formed once per step for all of
    the stack's layers), and the layer runs one product.
    """

    def __init__(self, w0: mx.array, bias: mx.array | None, kind: str, scale: float, shape: tuple[int, ...],
                 bases: tuple[mx.array, mx.array] | None = None):
        super().__init__()
        self._w0, self._bias, self._kind, self._scale = w0, bias, kind, float(scale)
        self._w0t = w0.T  # a view, made once (a transpose per step otherwise)
        mx.eval(self._w0t)
        self._shape, self._bases = tuple(shape), bases
        self._sq = self._rows = self._cols = None  # squared base norms (constants, made on first use)
        self.adapter: dict[str, mx.array] = {}
        # This step's factors and scales when a StackedAdapters makes them ("lt" = L^T, "rt" = s R^T, "rows",
        # "cols", in the activations' dtype); a parameter (not private), so that gradient checkpointing
        # passes them to the block as inputs.
        self.given: dict[str, mx.array] = {}

    def _factors(self) -> tuple[mx.array, mx.array]:
        p = self.adapter
        if self._kind.endswith("-xs"):
            u, v = self._bases
            return v.T, u @ p["M_xs"]
        return p["lora_A"], p["lora_B"]

    def _scales(self, left: mx.array, right: mx.array) -> tuple[mx.array | None, mx.array | None]:
        """Row / column scales from the norms of ``V = W0 + s R L`` (see :func:`factored_scales`)."""
        return factored_scales(self._kind, self._scale, self.adapter, left, right, self._w0, self._constants())

    def _constants(self) -> dict:
        kind = self._kind
        if kind in ("lora", "lora-xs"):
            return {}
        if kind.startswith("dora-cols"):
            return {"col_sq": self._col_sq()}
        if kind.startswith("dora-rows"):
            return {"row_sq": self._row_sq()}
        return {"row_sq": self._row_sq(), "w0_sq": self._w0_sq()}

    @property
    def kind(self) -> str:
        return self._kind

    def prepare(self) -> None:
        """Make the base-norm constants this adapter type reads now (they are made on first use otherwise)."""
        mx.eval(list(self._constants().values()))

    def _w0_sq(self) -> mx.array:
        if self._sq is None:
            w0 = self._w0.astype(mx.float32)
            self._sq = w0 * w0
        return self._sq

    def _row_sq(self) -> mx.array:
        if self._rows is None:
            self._rows = mx.sum(mx.square(self._w0.astype(mx.float32)), axis=1)
        return self._rows

    def _col_sq(self) -> mx.array:
        if self._cols is None:
            self._cols = mx.sum(mx.square(self._w0.astype(mx.float32)), axis=0)
        return self._cols

    def __call__(self, x: mx.array) -> mx.array:
        if self.given:  # made by the layer's stack
            return given_product(x, self.given, self._w0t, self._bias)
        dtype = x.dtype
        left, right = self._factors()
        rows, cols = self._scales(left, right)
        if cols is not None:
            x = x * (cols if cols.dtype == dtype else cols.astype(dtype))
        y = x @ self._w0t + self._scale * ((x @ left.astype(dtype).T) @ right.astype(dtype).T)
        if rows is not None:
            y = y * (rows if rows.dtype == dtype else rows.astype(dtype))
        return y if self._bias is None else y + self._bias

    @property
    def weight(self) -> mx.array:
        """The adapted weight in the base layout (for code that reads a module's weight)."""
        params = dict(self.adapter)
        return adapted_weight(self._kind, self._scale, params, self._w0, self._bases).astype(
            self._w0.dtype).reshape(self._shape)
