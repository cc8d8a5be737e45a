"""The CPU backend: numpy fast paths over the cores, the reference everywhere else.

MLX's CPU backend evaluates exp, tanh, sigmoid and sin one element at a time
(12-17 ns per float32 element on the x86 dev box, measured), and runs attention
as one BLAS call per head plus scalar softmax loops; that was about half of a DiT
step and of a SAME decode on the CPU. numpy's SIMD loops take 0.6 ns. So for arrays
large enough to matter, :class:`CPUKernels` evaluates the input, computes with numpy
(split over the cores by :class:`Workers` where it pays: the attention, the GLU) and
hands back a new MLX array. Small arrays, half precision and ``mx.compile`` tracing
(where nothing can be evaluated) take the reference's plain MLX ops. Results agree
to float32 rounding (``tests/test_kernels.py``).

This backend is chosen for the CPU device only (:func:`sa3_mlx.kernels.for_device`),
so nothing here asks which device runs.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import DyTParams, Kernels, NormParams, RMSNormParams, _check_activation, onednn

# Below this many elements the round trip through numpy costs more than it saves.
NUMPY_MIN_ELEMENTS = 1 << 14
# Tokens per group when SAME-S chunks go through the blocks a group at a time: the
# working set then stays in the caches (0.6 s of a 30 s decode on the dev box, measured).
CPU_GROUP_TOKENS = 1024
# Rows per block of the host GLU: a block's temporaries stay in the core's L2 cache.
_GLU_BLOCK_BYTES = 512 << 10
_GELU_C = math.sqrt(2.0 / math.pi)


def _host(x: mx.array) -> np.ndarray | None:
    """``x`` as a numpy array, or None inside ``mx.compile`` tracing (where nothing can be evaluated)."""
    try:
        return np.asarray(x)
    except ValueError:
        return None


def on_host(x: mx.array) -> np.ndarray | None:
    """``x`` as a numpy array when the work on it belongs on the host (fp32, large, not
    tracing), else None."""
    if x.dtype != mx.float32 or x.size < NUMPY_MIN_ELEMENTS:
        return None
    return _host(x)


def _one_plus_exp_neg(a: np.ndarray) -> np.ndarray:
    """``1 + exp(-a)``, the denominator of the logistic function, in a new array."""
    y = np.negative(a)
    np.exp(y, out=y)
    y += 1.0
    return y


class CPUKernels(Kernels):
    """numpy fast paths for the CPU device (see the module docstring)."""

    name = "cpu"
    chunk_group_tokens = CPU_GROUP_TOKENS

    def prepare(self, module: nn.Module, precision: mx.Dtype | None = None) -> None:
        """fp32 ``nn.Linear`` weights stored for plain BLAS products
        (:func:`store_linear_weights_transposed`); anything else as loaded. A module whose loader
        applied :meth:`linear_weight_layout` already is left as it is. ``precision`` bf16 (a module
        loaded in fp32 by :meth:`compute_dtype`): its linear layers get bf16 weights and oneDNN
        products (:func:`~sa3_mlx.kernels.onednn.use_bf16_products`)."""
        if precision is not None and precision == mx.bfloat16 and onednn.available():
            onednn.use_bf16_products(module)
        elif not getattr(module, "linear_weights_transposed", False):
            store_linear_weights_transposed(module)

    def compute_dtype(self, dtype: mx.Dtype) -> mx.Dtype:
        """bf16 where oneDNN has native bf16 products here (:func:`~sa3_mlx.kernels.onednn.status`):
        fp32 activations, bf16 weights and matmul inputs, fp32 sums; MLX's own bf16 CPU kernels run
        about 40x slower than fp32. Elsewhere ``dtype`` as asked."""
        return mx.float32 if dtype is not None and dtype == mx.bfloat16 and onednn.available() else dtype

    def linear_weight_layout(self, dtype: mx.Dtype):
        """fp32 targets: transpose the stored (half-precision) weight before it is cast, which moves
        half the bytes and needs no second fp32 copy (the layout :meth:`prepare` gives otherwise)."""
        return _transposed if dtype == mx.float32 else None

    # ------------------------------------------------------------ element-wise

    def softmax(self, x: mx.array, axis: int = -1) -> mx.array:
        if (a := on_host(x)) is None:
            return super().softmax(x, axis)
        y = a - a.max(axis=axis, keepdims=True)
        np.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)
        return mx.array(y)

    def silu(self, x: mx.array) -> mx.array:
        if (a := on_host(x)) is None:
            return super().silu(x)
        y = _one_plus_exp_neg(a)
        return mx.array(np.divide(a, y, out=y))

    def sigmoid(self, x: mx.array) -> mx.array:
        if (a := on_host(x)) is None:
            return super().sigmoid(x)
        y = _one_plus_exp_neg(a)
        return mx.array(np.reciprocal(y, out=y))

    def tanh(self, x: mx.array) -> mx.array:
        if (a := on_host(x)) is None:
            return super().tanh(x)
        return mx.array(np.tanh(a))

    def sin(self, x: mx.array) -> mx.array:
        if (a := on_host(x)) is None:
            return super().sin(x)
        return mx.array(np.sin(a))

    def gelu_tanh(self, x: mx.array) -> mx.array:
        if (a := on_host(x)) is None:
            return super().gelu_tanh(x)
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

    # ------------------------------------------------------------ feed-forward

    def glu(self, x: mx.array, activation: str = "silu", bias: mx.array | None = None) -> mx.array:
        """The whole unit, bias included, as a few numpy passes over cache-sized row
        blocks, spread over the cores, instead of a bias copy, a split copy, an
        activation and a product over arrays far larger than the caches."""
        _check_activation(activation)
        if (a := on_host(x)) is None:
            return super().glu(x, activation, bias)
        return _glu_on_host(a, activation, bias)

    def linear_glu(self, x: mx.array, proj: nn.Linear, activation: str = "silu") -> mx.array:
        """The bias is added inside the GLU pass, not by the product (MLX's CPU ``addmm``
        first copies the bias into the whole output: 33 ms of a SAME-S block's 245 ms
        product at 30 s, measured). A bf16 layer (oneDNN, bias in the product) hands its
        numpy result straight to the host GLU: no MLX copy of the product's output (the
        widest of a DiT block)."""
        if isinstance(proj, onednn.BF16Linear):
            a = proj.host_product(x)
            if a is None or a.size < NUMPY_MIN_ELEMENTS:  # where glu(proj(x)) would not run on the host
                return self.glu(proj(x) if a is None else mx.array(a), activation)
            _check_activation(activation)
            return _glu_on_host(a, activation)
        bias = getattr(proj, "bias", None) if "bias" in proj else None
        if bias is None or x.dtype != mx.float32:
            return self.glu(proj(x), activation)
        return self.glu(x @ _dense(proj).T, activation, bias)

    # ------------------------------------------------------------ quantized weights

    def quantized_linear(self, x: mx.array, layer: nn.QuantizedLinear) -> mx.array:
        """Dequantize the layer's weight into a transient fp32 matrix (numpy over the cores,
        :func:`dequantize_on_host`) and run a plain BLAS product: MLX's CPU ``quantized_matmul`` is
        scalar code, ~80x slower than OpenBLAS (1.48 s against 19 ms for 400 x 1024 x 4096 at 4 bits on
        the dev box). Only one layer's dense weight exists at a time, so the memory saving stays; the
        dequantization is the price (see docs/fidelity.md for the measured ms/step)."""
        host = None
        if x.dtype == mx.float32 and layer.scales.dtype == mx.float32 and layer.bits in (4, 8):
            host = [_host(t) for t in (layer.weight, layer.scales, layer.biases)]
        if host is None or any(h is None for h in host):  # half precision, or inside mx.compile tracing
            dense = _dense(layer).astype(x.dtype)
        else:  # into a reused scratch matrix (no fresh pages to fault in per layer), copied once into MLX
            shape = (host[0].shape[0], host[0].shape[1] * 32 // layer.bits)
            dense = mx.array(dequantize_on_host(*host, layer.group_size, layer.bits, out=_scratch(shape)))
            y = x @ dense.T
            y = y + layer.bias if "bias" in layer else y
            mx.eval(y)  # now, so that this layer's dense weight is gone before the next one exists
            return y
        y = x @ dense.T
        return y + layer.bias if "bias" in layer else y

    # ------------------------------------------------------------ attention

    def attention(
        self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None
    ) -> mx.array:
        """MLX runs CPU attention with one BLAS call per head and scalar softmax loops
        (17 ms per small-DiT layer at 30 s, measured); numpy with the heads spread over
        the cores takes 6 ms, so large fp32 attention goes there, and small fp32
        attention is the three steps with the host softmax."""
        if q.dtype != mx.float32:
            return super().attention(q, k, v, scale, mask)
        if q.size * k.shape[-2] >= NUMPY_MIN_ELEMENTS:
            arrays = [_host(t) for t in (q, k, v)] + ([_host(mask)] if mask is not None else [])
            if all(a is not None for a in arrays):  # else: inside mx.compile tracing
                return _attention_on_host(*arrays[:3], scale, arrays[3] if mask is not None else None)
        scores = (q * scale) @ k.swapaxes(-1, -2)
        if mask is not None:
            scores = scores + mask if mask.dtype != mx.bool_ else mx.where(mask, scores, -math.inf)
        return self.softmax(scores, axis=-1) @ v

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
        """The q/k norm, RoPE, attention and differential subtraction as numpy passes
        (:func:`self_attention_on_host`), for large fp32 ``qkv``."""
        host = on_host(qkv)
        normalize = None if host is None else _host_norm(q_norm, k_norm, differential)
        if normalize is None:
            return super().self_attention(
                qkv, num_heads, scale, q_norm, k_norm, rope_dims, rope_base, differential, value_mask
            )
        rope = rope_table(host.shape[1], rope_dims, rope_base) if rope_dims else None
        mask = None if value_mask is None else np.asarray(value_mask, dtype=np.float32).reshape(host.shape[0], -1)
        return self_attention_on_host(host, num_heads, differential, normalize, rope, scale, mask)


def _glu_on_host(a: np.ndarray, activation: str, bias: mx.array | None = None) -> mx.array:
    """:meth:`CPUKernels.glu` on the fp32 numpy array ``a`` (``[..., 2 * half]``: value, gate) -> a new
    MLX array ``[..., half]``."""
    rows = a.reshape(-1, a.shape[-1])
    half = rows.shape[1] // 2
    value_bias, gate_bias = (None, None) if bias is None else np.split(np.asarray(bias, dtype=np.float32), 2)
    out = np.empty((rows.shape[0], half), dtype=np.float32)
    block = max(1, _GLU_BLOCK_BYTES // (4 * half))

    def run(part: slice) -> None:
        scratch = np.empty((block, half), dtype=np.float32)
        for start in range(part.start, part.stop, block):
            stop = min(start + block, part.stop)
            value, gate = rows[start:stop, :half], rows[start:stop, half:]
            o, t = out[start:stop], scratch[: stop - start]
            if gate_bias is not None:
                np.add(gate, gate_bias, out=o)
                gate = o
            if activation == "silu":
                np.negative(gate, out=t)
                np.exp(t, out=t)
                t += 1.0
                np.divide(gate, t, out=o)
            else:
                np.multiply(gate, np.float32(math.pi), out=o)
                np.sin(o, out=o)
            if value_bias is not None:
                np.add(value, value_bias, out=t)
                value = t
            o *= value

    Workers.shared().split(rows.shape[0], run)
    return mx.array(out.reshape(*a.shape[:-1], half))


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, int]) -> np.ndarray:
    """A float32 matrix of ``shape`` over one buffer kept per thread, grown to the largest layer seen
    (the medium DiT's feed-forward input: 75 MB)."""
    size = shape[0] * shape[1]
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _SCRATCH.buffer = np.empty(size, dtype=np.float32)
    return buffer[:size].reshape(shape)


def dequantize_on_host(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int,
                       bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """MLX's affine dequantization (``mx.dequantize``: ``scale * q + bias`` per group, 4-bit values
    packed low nibble first) of a ``[out, in * bits / 32]`` uint32 weight -> fp32 ``[out, in]``, in
    numpy over the cores; equal to ``mx.dequantize`` bit for bit (``tests/test_quantize.py``)."""
    out_dims = packed.shape[0]
    in_dims = packed.shape[1] * 32 // bits
    codes = packed.view(np.uint8)  # little-endian: the first values in the lowest bits
    if out is None:
        out = np.empty((out_dims, in_dims), dtype=np.float32)
    groups = in_dims // group_size

    def run(part: slice) -> None:
        rows = out[part]
        if bits == 8:
            rows[...] = codes[part]
        else:
            np.bitwise_and(codes[part], 15, out=rows[:, 0::2], casting="unsafe")
            np.right_shift(codes[part], 4, out=rows[:, 1::2], casting="unsafe")
        grouped = rows.reshape(-1, groups, group_size)
        grouped *= scales[part, :, None]
        grouped += biases[part, :, None]

    Workers.shared().split(out_dims, run)
    return out


def _dense(layer: nn.Module) -> mx.array:
    """A linear layer's ``[out, in]`` weight, dequantized when it is quantized."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
    return layer.weight


# ---------------------------------------------------------------- weight layout


def store_linear_weights_transposed(module: nn.Module) -> None:
    """Keep each fp32 ``nn.Linear`` weight ``[out, in]`` as a view of a row-major ``[in, out]`` array.

    ``x @ W.T`` then reaches BLAS as a plain product instead of one with a transposed
    operand, which OpenBLAS runs 3-17% faster on the small DiT's shapes (measured on
    the x86 dev box; the SAME decoder's much taller products gain nothing). Shapes and
    values are unchanged, so nothing else notices; one weight is copied at a time.
    Half-precision weights are left as they are.
    """
    for _, layer in module.named_modules():
        if isinstance(layer, nn.Linear) and layer.weight.dtype == mx.float32:
            layer.weight = mx.array(_transposed(np.asarray(layer.weight))).T
    module.linear_weights_transposed = True


_TRANSPOSE_ROWS = 256  # rows per block: a block's source rows and destination columns stay in the caches


def _transposed(a: np.ndarray) -> np.ndarray:
    """``a.T`` as a new row-major array, copied in cache-sized blocks over the cores (MLX's strided copy
    of a large fp32 matrix runs about 2x slower: 122 against 69 ms for 12k x 1k on the dev box)."""
    out = np.empty((a.shape[1], a.shape[0]), a.dtype)

    def run(part: slice) -> None:
        for start in range(part.start, part.stop, _TRANSPOSE_ROWS):
            stop = min(start + _TRANSPOSE_ROWS, part.stop)
            out[:, start:stop] = a[start:stop].T

    Workers.shared().split(a.shape[0], run)
    return out


# ---------------------------------------------------------------- host attention


def _host_norm(q_norm: NormParams, k_norm: NormParams, differential: bool):
    """An in-place numpy q/k norm over ``[b, N, sets, h, D]`` (sets ordered q, k[, q_diff,
    k_diff]), or None when the two norms are not of one kind."""
    norms = [q_norm, k_norm] * (2 if differential else 1)
    if all(isinstance(n, RMSNormParams) for n in norms):
        weight = np.stack([np.asarray(n.weight, dtype=np.float32) for n in norms])[:, None]  # [sets, 1, D]
        if len({n.eps for n in norms}) == 1:
            eps = np.float32(norms[0].eps)
        else:
            eps = np.array([n.eps for n in norms], dtype=np.float32).reshape(-1, 1, 1)

        def rms_norm(qk: np.ndarray) -> None:
            mean_square = np.square(qk).mean(axis=-1, keepdims=True)
            mean_square += eps
            qk /= np.sqrt(mean_square, out=mean_square)
            qk *= weight

        return rms_norm
    if all(isinstance(n, DyTParams) for n in norms):
        alpha = np.stack([np.asarray(n.alpha, dtype=np.float32) for n in norms]).reshape(len(norms), 1, 1)
        gamma = np.stack([np.asarray(n.gamma, dtype=np.float32) for n in norms])[:, None]
        beta = np.stack([np.asarray(n.beta, dtype=np.float32) for n in norms])[:, None]

        def dyt(qk: np.ndarray) -> None:
            qk *= alpha
            np.tanh(qk, out=qk)
            qk *= gamma
            qk += beta

        return dyt
    return None


def self_attention_on_host(
    qkv: np.ndarray,
    num_heads: int,
    differential: bool,
    normalize,
    rope: tuple[np.ndarray, np.ndarray] | None,
    scale: float,
    value_mask: np.ndarray | None = None,
) -> mx.array:
    """Self-attention from a projected ``qkv`` [B, N, (3|5) H D] to merged heads [B, N, H D].

    The per-head q/k norm (``normalize(qk)``, in place on ``[b, N, sets, h, D]`` with
    sets ordered q, k[, q_diff, k_diff]), half-split RoPE on the first features
    (``rope`` = cos, sin tables ``[N, 1, 1, R/2]``, see :func:`rope_table`), the
    attention and the differential subtraction run in numpy, spread over the cores
    by batch or by head: a few passes per part instead of a dozen MLX ops and copies.
    ``value_mask`` [B, N] multiplies the values (1 = valid).
    """
    B, N, width = qkv.shape
    D = width // ((5 if differential else 3) * num_heads)
    x = qkv.reshape(B, N, -1, num_heads, D)
    sets = [0, 1, 3, 4] if differential else [0, 1]
    out = np.empty((B, N, num_heads, D), dtype=np.float32)

    def run(batch: slice, heads: slice) -> None:
        qk = x[batch, :, :, heads][:, :, sets]  # [b, N, sets, h, D]: a copy to work in
        normalize(qk)
        if rope is not None:
            cos, sin = rope
            half = cos.shape[-1]
            first, second = qk[..., :half], qk[..., half : 2 * half]  # (a, b) -> (a cos - b sin, b cos + a sin)
            first_sin = first * sin
            first *= cos
            first -= second * sin
            second *= cos
            second += first_sin
        heads_first = qk.transpose(0, 2, 3, 1, 4)  # [b, sets, h, N, D]
        values = x[batch, :, 2, heads]
        if value_mask is not None:
            values = values * value_mask[batch, :, None, None]
        values = values.transpose(0, 2, 1, 3)
        main = out[batch, :, heads].transpose(0, 2, 1, 3)
        attend(heads_first[:, 0], heads_first[:, 1], values, scale, main)
        if differential:
            diff = np.empty_like(main)
            attend(heads_first[:, 2], heads_first[:, 3], values, scale, diff)
            main -= diff

    if B >= num_heads:
        Workers.shared().split(B, lambda part: run(part, slice(None)))
    else:
        Workers.shared().split(num_heads, lambda part: run(slice(None), part))
    return mx.array(out.reshape(B, N, num_heads * D))


def rope_table(length: int, dims: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the RoPE angles of positions ``0..length-1`` for ``dims`` rotated
    features (``mx.fast.rope``'s non-traditional frequencies ``base^(-2i/dims)``),
    ``[length, 1, 1, dims // 2]`` fp32, for :func:`self_attention_on_host`."""
    inv_freq = base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq
    shape = (length, 1, 1, dims // 2)
    return np.cos(angles).astype(np.float32).reshape(shape), np.sin(angles).astype(np.float32).reshape(shape)


def _attention_on_host(q, k, v, scale: float, mask) -> mx.array:
    B, H, L, _ = q.shape
    out = np.empty((B, L, H, v.shape[-1]), dtype=np.float32)  # merged-heads order: merge_heads is then free
    out_heads = out.transpose(0, 2, 1, 3)
    k, v = (np.broadcast_to(t, (B, H, *t.shape[2:])) for t in (k, v))
    if mask is not None:
        if mask.dtype == np.bool_:
            mask = np.where(mask, np.float32(0), np.float32(-np.inf))
        mask = np.broadcast_to(mask, (B, H, L, k.shape[2]))

    def run(index: tuple) -> None:
        attend(q[index], k[index], v[index], scale, out_heads[index], None if mask is None else mask[index])

    # Spread the larger of batch and heads over the workers.
    if B >= H:
        Workers.shared().split(B, lambda part: run((part,)))
    else:
        Workers.shared().split(H, lambda part: run((slice(None), part)))
    return mx.array(out).transpose(0, 2, 1, 3)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray,
           bias: np.ndarray | None = None) -> None:
    """``out[...] = softmax(q k^T * scale + bias) v`` in numpy, ``[..., L, D]`` stacks."""
    scores = np.matmul(q, k.swapaxes(-1, -2))
    scores *= np.float32(scale)
    if bias is not None:
        scores += bias
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    np.matmul(scores, v, out=out)


# ---------------------------------------------------------------- threads


class Workers:
    """One thread per core for numpy work on the CPU path.

    numpy's ufuncs and matmul release the GIL, so the threads run in parallel on
    disjoint parts of an array. While they run, numpy's BLAS is kept single-threaded
    (two BLAS threads sharing one small product is what made MLX's per-head calls
    slow). That BLAS is numpy's own: MLX's is never touched, so nothing else running
    is disturbed. When numpy shares MLX's BLAS, or its thread count cannot be set,
    everything runs in the calling thread.
    """

    _instance: "Workers | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.count = 1
        self.blas = None
        self.any_thread_blas = None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cores > 1 and (blas := _numpy_only_blas()) is not None:
            self.blas, self.count = blas, cores
            # OpenBLAS's setter (threadpoolctl's) does nothing when called from a thread other than
            # the main one (OpenBLAS 0.3.31, measured), so a studio job or a batch worker in a thread
            # had each worker's products use two BLAS threads: sampling took 1.93 s instead of 1.47 s.
            # openblas_set_num_threads_local takes effect from any thread (and for every thread,
            # measured), so split sets and restores the count with it where it exists.
            self.any_thread_blas = _any_thread_blas_setter(blas)
            self.pool = ThreadPoolExecutor(cores, thread_name_prefix="sa3-numpy")

    @classmethod
    def shared(cls) -> "Workers":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def split(self, n: int, work) -> None:
        """``work(part)`` for contiguous slices ``part`` covering ``range(n)``, one per worker."""
        parts = min(self.count, n)
        bounds = [slice(n * i // parts, n * (i + 1) // parts) for i in range(parts)]
        if parts <= 1:
            work(slice(0, n))
            return
        previous = self._set_blas_threads(1)
        try:
            for job in [self.pool.submit(work, part) for part in bounds]:
                job.result()
        finally:
            self._set_blas_threads(previous)

    def _set_blas_threads(self, count: int) -> int:
        """Set numpy's BLAS thread count for the process; the count before."""
        if self.any_thread_blas is not None:
            return self.any_thread_blas(count)
        previous = self.blas.num_threads
        self.blas.set_num_threads(count)
        return previous


def _any_thread_blas_setter(blas):
    """OpenBLAS's ``openblas_set_num_threads_local`` (OpenBLAS >= 0.3.27; returns the previous count), or None."""
    if getattr(blas, "internal_api", "") != "openblas":
        return None
    try:
        setter = ctypes.CDLL(blas.filepath).openblas_set_num_threads_local
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


def _numpy_only_blas():
    """threadpoolctl's handle on numpy's BLAS, if it is not also the BLAS MLX uses."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    from .. import backend

    mlx_blas, _ = backend.blas_status()
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))  # site-packages: numpy/, numpy.libs/
    found = [
        lib for lib in threadpoolctl.ThreadpoolController().lib_controllers
        if lib.user_api == "blas" and lib.filepath.startswith(os.path.join(numpy_dir, "numpy"))
    ]
    if len(found) != 1 or (mlx_blas and os.path.realpath(found[0].filepath) == os.path.realpath(mlx_blas)):
        return None
    return found[0]
