"""Softmax and transcendental activations that are fast on every MLX backend.

MLX's CPU backend evaluates exp, tanh, sigmoid and sin one element at a time
(12-17 ns per float32 element on the x86 dev box, measured), which made them about
half of a DiT step and of a SAME decode on the CPU. numpy's SIMD loops take 0.6 ns.
So on the CPU device, for arrays large enough to matter, these functions evaluate
their input, compute with numpy and hand back a new MLX array; everywhere else
(GPUs, small arrays, half precision) they are the plain MLX ops, which the GPU
compiler fuses. Results agree to float32 rounding.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Below this many elements the round trip through numpy costs more than it saves.
NUMPY_MIN_ELEMENTS = 1 << 14
_GELU_C = math.sqrt(2.0 / math.pi)


def _use_numpy(x: mx.array) -> bool:
    return x.dtype == mx.float32 and x.size >= NUMPY_MIN_ELEMENTS and mx.default_device() == mx.cpu


def _host(x: mx.array) -> np.ndarray | None:
    """``x`` as a numpy array, or None inside ``mx.compile`` tracing (where nothing can be evaluated)."""
    try:
        return np.asarray(x)
    except ValueError:
        return None


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """``softmax(x)`` along ``axis``, computed in float32 (MLX's ``precise=True``)."""
    if not _use_numpy(x) or (a := _host(x)) is None:
        return mx.softmax(x, axis=axis, precise=True)
    y = a - a.max(axis=axis, keepdims=True)
    np.exp(y, out=y)
    y /= y.sum(axis=axis, keepdims=True)
    return mx.array(y)


def _one_plus_exp_neg(a: np.ndarray) -> np.ndarray:
    """``1 + exp(-a)``, the denominator of the logistic function, in a new array."""
    y = np.negative(a)
    np.exp(y, out=y)
    y += 1.0
    return y


def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)``."""
    if not _use_numpy(x) or (a := _host(x)) is None:
        return nn.silu(x)
    y = _one_plus_exp_neg(a)
    return mx.array(np.divide(a, y, out=y))


def sigmoid(x: mx.array) -> mx.array:
    if not _use_numpy(x) or (a := _host(x)) is None:
        return mx.sigmoid(x)
    y = _one_plus_exp_neg(a)
    return mx.array(np.reciprocal(y, out=y))


def tanh(x: mx.array) -> mx.array:
    if not _use_numpy(x) or (a := _host(x)) is None:
        return mx.tanh(x)
    return mx.array(np.tanh(a))


def sin(x: mx.array) -> mx.array:
    if not _use_numpy(x) or (a := _host(x)) is None:
        return mx.sin(x)
    return mx.array(np.sin(a))


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (``gelu_pytorch_tanh``)."""
    if not _use_numpy(x) or (a := _host(x)) is None:
        return nn.gelu_approx(x)
    y = a * a
    y *= 0.044715
    y += 1.0
    y *= a
    y *= _GELU_C
    np.tanh(y, out=y)
    y += 1.0
    y *= a
    y *= 0.5
    return mx.array(y)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` for ``[B, H, L, D]`` heads.

    On GPUs this is MLX's fused SDPA kernel; on the CPU (where that kernel is the
    same three steps) the softmax goes through :func:`softmax`.
    """
    if mx.default_device() != mx.cpu or q.dtype != mx.float32:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask if mask.dtype != mx.bool_ else mx.where(mask, scores, -math.inf)
    return softmax(scores, axis=-1) @ v
