"""The kernel seam: the ops the models call, behind one backend object chosen once.

Model code calls ``kernels.active().<op>(...)`` and never asks which device it runs
on. :class:`Kernels` is the reference: each method is the plain MLX form of its op,
which is what GPUs run (``mx.compile``-friendly; the GPU compiler fuses it).
:class:`~sa3_mlx.kernels.cpu.CPUKernels` subclasses it for the CPU device, with numpy
fast paths where they pay, falling back to the reference everywhere else.

Which backend runs:

* :func:`for_device` ``(device=None)``: the backend for a device (the default device
  when None): the CPU backend for the CPU, :class:`~sa3_mlx.kernels.cuda.CUDAKernels` for an
  NVIDIA GPU, the reference for anything else (Metal). ``SA3_KERNELS=mlx|cpu|cuda`` overrides
  that (debugging, benchmarks).
* :func:`use` ``(backend)``: a context manager that sets the backend for the current
  context (a :class:`contextvars.ContextVar`: each thread, e.g. a studio worker and
  the main thread, has its own).
* :func:`active`: the backend set by :func:`use`, else ``for_device()`` of the default
  device, decided once per process.

The same split as mlx-lm's single attention entry point: one object routes the op,
instead of a device check at every call site.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ENV_VAR = "SA3_KERNELS"
NAMES = ("mlx", "cpu", "cuda")
GLU_ACTIVATIONS = ("silu", "sin_pi")


@dataclass(frozen=True)
class RMSNormParams:
    """A per-head RMS norm, ``x / sqrt(mean(x^2) + eps) * weight`` (``nn.RMSNorm``; the DiT's q/k norm)."""

    weight: mx.array  # [D]
    eps: float


@dataclass(frozen=True)
class DyTParams:
    """A dynamic tanh norm, ``gamma * tanh(alpha * x) + beta`` (SAME's q/k norm)."""

    alpha: mx.array  # [1]
    gamma: mx.array  # [D]
    beta: mx.array  # [D]


NormParams = RMSNormParams | DyTParams


def split_heads(x: mx.array, num_heads: int) -> mx.array:
    """``[B, L, H * D] -> [B, H, L, D]``."""
    B, L, _ = x.shape
    return x.reshape(B, L, num_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """``[B, H, L, D] -> [B, L, H * D]``."""
    B, H, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * D)


class Kernels:
    """The reference backend: every op in plain MLX ops (what GPUs run).

    Subclasses override ops with device-specific forms and call ``super()`` where
    those do not apply; the reference's composite ops call ``self.<op>`` for their
    parts, so an override reaches them too.
    """

    name = "mlx"
    # SAME-S chunks per group, in tokens (see chunks_per_group); None: all at once.
    chunk_group_tokens: int | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # ------------------------------------------------------------ policies

    def prepare(self, module: nn.Module, precision: mx.Dtype | None = None) -> None:
        """Lay out ``module``'s weights for this backend, in place (values and shapes unchanged).
        ``precision``: the dtype the module was asked to run in, when :meth:`compute_dtype` loaded it
        in another one. The reference keeps the weights as loaded."""

    def compute_dtype(self, dtype: mx.Dtype) -> mx.Dtype:
        """The dtype a model asked to run in ``dtype`` is loaded and computed in; then
        ``prepare(module, dtype)`` gives its weights what that precision needs. The reference: ``dtype``."""
        return dtype

    def linear_weight_layout(self, dtype: mx.Dtype):
        """What a loader should do to each ``nn.Linear`` weight it reads as ``dtype`` (a numpy array ->
        the array to store, transposed), so that :meth:`prepare` has nothing left to do and no second
        full-size copy is made; None (the reference) stores weights as they are."""
        return None

    def chunks_per_group(self, chunks: int, chunk_tokens: int) -> int:
        """How many independent SAME-S chunks (of ``chunk_tokens`` tokens) go through the
        blocks together: all of them, or ``chunk_group_tokens`` worth when set."""
        if self.chunk_group_tokens is None:
            return chunks
        return max(1, self.chunk_group_tokens // chunk_tokens)

    # ------------------------------------------------------------ to the host

    def to_numpy(self, x: mx.array) -> np.ndarray:
        """``x`` evaluated and copied into a new numpy array of its shape and dtype (writable, owning
        its data): how results (audio, latents) leave the device. The reference: ``np.array(x)``."""
        return np.array(x)

    # ------------------------------------------------------------ element-wise

    def softmax(self, x: mx.array, axis: int = -1) -> mx.array:
        """``softmax(x)`` along ``axis``, computed in float32 (MLX's ``precise=True``)."""
        return mx.softmax(x, axis=axis, precise=True)

    def tanh(self, x: mx.array) -> mx.array:
        return mx.tanh(x)

    def sigmoid(self, x: mx.array) -> mx.array:
        return mx.sigmoid(x)

    def silu(self, x: mx.array) -> mx.array:
        """``x * sigmoid(x)``."""
        return nn.silu(x)

    def sin(self, x: mx.array) -> mx.array:
        return mx.sin(x)

    def gelu_tanh(self, x: mx.array) -> mx.array:
        """GELU with the tanh approximation (``gelu_pytorch_tanh``)."""
        return nn.gelu_approx(x)

    # ------------------------------------------------------------ feed-forward

    def glu(self, x: mx.array, activation: str = "silu", bias: mx.array | None = None) -> mx.array:
        """``value * act(gate)`` with ``value, gate = split(x + bias, 2, axis=-1)`` (value first).

        ``activation``: ``"silu"`` or ``"sin_pi"`` (``sin(pi * gate)``).
        """
        _check_activation(activation)
        if bias is not None:
            x = x + bias
        value, gate = mx.split(x, 2, axis=-1)
        return value * (nn.silu(gate) if activation == "silu" else mx.sin(math.pi * gate))

    def linear_glu(self, x: mx.array, proj: nn.Linear, activation: str = "silu") -> mx.array:
        """``glu(proj(x), activation)``."""
        return self.glu(proj(x), activation)

    # ------------------------------------------------------------ quantized weights

    def quantized_linear(self, x: mx.array, layer: nn.QuantizedLinear) -> mx.array:
        """``x @ W^T + bias`` for an affine-quantized ``layer`` (``nn.QuantizedLinear``'s tensors):
        MLX's fused ``quantized_matmul``, which reads the packed weight directly (GPUs)."""
        y = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                                group_size=layer.group_size, bits=layer.bits)
        return y + layer.bias if "bias" in layer else y

    # ------------------------------------------------------------ attention

    def attention(
        self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None
    ) -> mx.array:
        """``softmax(q k^T * scale + mask) v`` for ``[B, H, L, D]`` heads (MLX's fused SDPA).

        ``mask``: additive (broadcastable to the scores) or boolean (True = visible);
        ``k``, ``v`` may broadcast over the heads (one head, or a divisor of H for both).
        """
        if k.shape[1] != v.shape[1]:  # SDPA takes grouped heads only when keys and values agree
            heads = max(k.shape[1], v.shape[1])
            k, v = (mx.broadcast_to(t, (t.shape[0], heads, *t.shape[2:])) for t in (k, v))
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def attention_weights(
        self, q: mx.array, k: mx.array, scale: float, bias: mx.array | None = None
    ) -> mx.array:
        """``softmax(q k^T * scale + bias)`` [B, H, L, S] (additive ``bias``), softmax in fp32."""
        scores = (q * scale) @ k.swapaxes(-1, -2)
        if bias is not None:
            scores = scores + bias
        return self.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)

    def qk_norm(self, x: mx.array, params: NormParams) -> mx.array:
        """The per-head q/k norm ``params`` over the last axis of ``x``."""
        if isinstance(params, RMSNormParams):
            return mx.fast.rms_norm(x, params.weight, params.eps)
        if isinstance(params, DyTParams):
            return params.gamma * self.tanh(params.alpha * x) + params.beta
        raise TypeError(f"unknown q/k norm {type(params).__name__}")

    def rope(self, x: mx.array, dims: int, base: float) -> mx.array:
        """Half-split RoPE (non-traditional) on the first ``dims`` features, positions ``0..L-1``."""
        if not dims:
            return x
        return mx.fast.rope(x, dims, traditional=False, base=base, scale=1.0, offset=0)

    def heads(
        self,
        x: mx.array,
        num_heads: int,
        kinds: str,
        q_norm: NormParams | None = None,
        k_norm: NormParams | None = None,
        rope_dims: int = 0,
        rope_base: float = 10000.0,
        value_mask: mx.array | None = None,
    ) -> list[mx.array]:
        """The attention heads ``[B, H, N, D]`` of a projection ``x`` [B, N, len(kinds) H D].

        ``kinds`` names the equal parts of ``x``'s last axis in order: ``"q"`` (normed by ``q_norm``,
        then RoPE on the first ``rope_dims`` features, positions ``0..N-1``), ``"k"`` (the same with
        ``k_norm``) or ``"v"`` (times ``value_mask``, B N elements as [B, N] or [B, 1, N, 1], when given):
        ``"qkv"``, ``"qkvqk"`` (differential self-attention), ``"q"`` (cross-attention queries).
        """
        parts = mx.split(x, len(kinds), axis=-1) if len(kinds) > 1 else [x]
        out = []
        for kind, part in zip(kinds, parts):
            heads = split_heads(part, num_heads)
            if kind == "v":
                if value_mask is not None:
                    heads = heads * value_mask.reshape(x.shape[0], 1, x.shape[1], 1)
            else:
                heads = self.rope(self.qk_norm(heads, q_norm if kind == "q" else k_norm), rope_dims, rope_base)
            out.append(heads)
        return out

    def self_attention(
        self,
        qkv: mx.array,
        num_heads: int,
        scale: float,
        q_norm: NormParams,
        k_norm: NormParams,
        rope_dims: int = 0,
        rope_base: float = 10000.0,
        differential: bool = False,
        value_mask: mx.array | None = None,
    ) -> mx.array:
        """Self-attention from a projected ``qkv`` [B, N, (3|5) H D] to merged heads [B, N, H D].

        ``qkv`` holds ``[q, k, v]``, or ``[q, k, v, q_diff, k_diff]`` when
        ``differential``. Every query head is normed by ``q_norm`` and every key head
        by ``k_norm`` (the diff heads share them), then the first ``rope_dims``
        features are rotated (:meth:`rope`). Differential attention is two maps over
        the same values, subtracted with weight 1. ``value_mask`` (B N elements, as
        [B, N] or [B, 1, N, 1]; 1 = valid) multiplies the values: padded positions
        keep their softmax weight but contribute nothing.
        """
        q, k, values, *diff = self.heads(qkv, num_heads, "qkvqk" if differential else "qkv", q_norm, k_norm,
                                         rope_dims, rope_base, value_mask)
        return self.local_attention([q, *diff[:1]], [k, *diff[1:]], values, scale, merged=True)

    def local_attention(
        self,
        queries: list[mx.array],
        keys: list[mx.array],
        values: mx.array,
        scale: float,
        window: tuple[int, int] | None = None,
        group: int = 1,
        merged: bool = False,
    ) -> mx.array:
        """Attention of ``[B, H, N, D]`` heads where query ``i`` sees the keys ``j`` with
        ``i - left * group <= j <= i + right * group`` (``window = (left, right)``), or every key (None).

        ``queries`` and ``keys`` hold one set, or two for differential attention: the second set's map
        is subtracted, ``softmax(q0 k0^T) v - softmax(q1 k1^T) v``. A window is computed by
        :func:`banded_attention` (memory O(N), not O(N^2)), both sets as one attention over 2H heads.
        ``merged``: the heads merged, ``[B, N, H D]`` (what an output projection reads), instead of
        ``[B, H, N, D]``.
        """
        out = self._local_attention(queries, keys, values, scale, window, group)
        return merge_heads(out) if merged else out

    def _local_attention(self, queries, keys, values, scale, window, group) -> mx.array:
        if len(queries) != len(keys) or len(queries) not in (1, 2):
            raise ValueError(f"one or two query/key sets, got {len(queries)} and {len(keys)}")
        if window is None:
            out = self.attention(queries[0], keys[0], values, scale)
            if len(queries) == 2:
                out = out - self.attention(queries[1], keys[1], values, scale)
            return out
        if len(queries) == 1:
            return banded_attention(queries[0], keys[0], values, group, window, scale, self.softmax)
        out = banded_attention(mx.concatenate(queries, axis=1), mx.concatenate(keys, axis=1),
                               mx.tile(values, (1, 2, 1, 1)), group, window, scale, self.softmax)
        main, diff = mx.split(out, 2, axis=1)
        return main - diff

    # ------------------------------------------------------------ host computations

    def merge_repeated_tokens(self, tokens: mx.array) -> tuple[mx.array, mx.array] | None:
        """Cross-attention context ``[B, S, C]`` with repeated tokens kept once: ``(tokens, key_bias)``.

        Attention has no notion of key order outside RoPE, and equal context tokens give
        equal keys and values, so ``n`` copies of a token act exactly as one copy whose
        logit is raised by ``log n``: ``n e^s = e^(s + log n)``. A prompt padded to 256
        tokens is mostly copies of the padding embedding, so the cross-attention shrinks
        from 257 keys to a few dozen. Rows are padded to a common length with bias
        ``-inf`` (no weight). ``key_bias`` is ``[B, 1, 1, S']``. None when nothing repeats.
        Computed on the host (once per generation) on every backend.
        """
        host = np.asarray(tokens)
        B, S, C = host.shape
        rows = []
        for row in host:
            unique, first, counts = np.unique(row, axis=0, return_index=True, return_counts=True)
            order = np.argsort(first)  # keep first-occurrence order: deterministic and readable
            rows.append((unique[order], counts[order]))
        length = max(len(u) for u, _ in rows)
        if length == S:
            return None
        merged = np.zeros((B, length, C), dtype=host.dtype)
        bias = np.full((B, 1, 1, length), -np.inf, dtype=np.float32)
        for b, (unique, counts) in enumerate(rows):
            merged[b, : len(unique)] = unique
            bias[b, 0, 0, : len(unique)] = np.log(counts.astype(np.float64))
        return mx.array(merged), mx.array(bias)


def banded_attention(
    q: mx.array, k: mx.array, v: mx.array, group: int, window: tuple[int, int], scale: float, softmax,
) -> mx.array:
    """Attention where token i sees tokens ``i - left*group .. i + right*group`` (``[B, H, N, D]``, N a
    multiple of ``group``).

    Queries are taken ``group`` at a time; each group gathers the keys of the
    ``left + right + 1`` groups around it, so memory is O(N), not O(N^2). ``softmax``: the
    backend's (:meth:`Kernels.softmax`).
    """
    B, H, N, D = q.shape
    groups = N // group
    left, right = window
    span = (left + right + 1) * group

    def neighbourhoods(t: mx.array) -> mx.array:  # [B, H, N, D] -> [B, H, groups, span, D]
        padded = mx.pad(t, [(0, 0), (0, 0), (left * group, right * group), (0, 0)])
        shifted = [padded[:, :, j * group : j * group + N] for j in range(left + right + 1)]
        return mx.concatenate([s.reshape(B, H, groups, group, D) for s in shifted], axis=3)

    scores = (q.reshape(B, H, groups, group, D) * scale) @ neighbourhoods(k).swapaxes(-1, -2)
    query_pos = mx.arange(N).reshape(groups, group, 1)
    key_pos = (mx.arange(groups) * group - left * group).reshape(groups, 1, 1) + mx.arange(span)
    visible = (
        (key_pos >= query_pos - left * group)
        & (key_pos <= query_pos + right * group)
        & (key_pos >= 0)
        & (key_pos < N)
    )
    scores = mx.where(visible, scores, -mx.inf)
    weights = softmax(scores, axis=-1)
    return (weights @ neighbourhoods(v)).reshape(B, H, N, D)


def _check_activation(activation: str) -> None:
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"unknown GLU activation {activation!r}")


# ---------------------------------------------------------------- selection

_REFERENCE = Kernels()
_backends: dict[str, Kernels] = {"mlx": _REFERENCE}
_backends_lock = threading.Lock()
_current: contextvars.ContextVar[Kernels | None] = contextvars.ContextVar("sa3_kernels", default=None)
_default: Kernels | None = None


def reference() -> Kernels:
    """The reference backend (plain MLX ops)."""
    return _REFERENCE


def by_name(name: str) -> Kernels:
    """The backend called ``name``: ``"mlx"`` (the reference), ``"cpu"`` or ``"cuda"`` (one instance each)."""
    key = name.strip().lower()
    if key not in NAMES:
        raise ValueError(f"unknown kernels backend {name!r}: expected one of {', '.join(NAMES)}")
    with _backends_lock:
        if key not in _backends:
            if key == "cpu":
                from .cpu import CPUKernels

                _backends[key] = CPUKernels()
            else:
                from .cuda import CUDAKernels

                _backends[key] = CUDAKernels()
        return _backends[key]


def for_device(device: mx.Device | mx.DeviceType | None = None) -> Kernels:
    """The backend for ``device`` (a device or a device type such as ``mx.cpu``; default:
    MLX's default device): the CPU backend for the CPU, the CUDA one for an NVIDIA GPU, the
    reference for anything else. ``SA3_KERNELS=mlx|cpu|cuda`` overrides the choice."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        try:
            return by_name(forced)
        except ValueError:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(NAMES)}") from None
    device = mx.default_device() if device is None else device
    kind = device.type if isinstance(device, mx.Device) else device
    if kind == mx.DeviceType.cpu:
        return by_name("cpu")
    return by_name("cuda" if mx.cuda.is_available() else "mlx")


def active() -> Kernels:
    """The backend in use: the one set by :func:`use` in this context, else ``for_device()``
    of the default device (decided on the first call, then kept for the process)."""
    backend = _current.get()
    if backend is not None:
        return backend
    global _default
    if _default is None:
        _default = for_device()
    return _default


@contextlib.contextmanager
def use(backend: Kernels | str) -> Iterator[Kernels]:
    """Run the block with ``backend`` (a :class:`Kernels` or a name, see :func:`by_name`) as
    :func:`active`, in this context only (other threads keep their own)."""
    if isinstance(backend, str):
        backend = by_name(backend)
    if not isinstance(backend, Kernels):
        raise TypeError(f"expected a Kernels backend or a name, got {type(backend).__name__}")
    token = _current.set(backend)
    try:
        yield backend
    finally:
        _current.reset(token)
