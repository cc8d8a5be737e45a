"""Building blocks shared by the Stable Audio 3 models (DiT, and usable by the codec).

Everything here follows upstream ``stable_audio_3/models/transformer.py`` and
``blocks.py``; module attribute names equal the upstream parameter names so the
official weight files load without renaming:

* :func:`silu_mlp` / :func:`run_layers`: the ``Linear -> SiLU -> Linear`` stacks that
  upstream builds with ``nn.Sequential`` (keys ``name.0.*`` and ``name.2.*``).
* :class:`GLU`, :class:`FeedForward`: SwiGLU feed-forward (``ff.ff.0.proj``, ``ff.ff.2``).
* :func:`split_heads`, :func:`merge_heads`, :func:`differential_attention`: the
  attention core as plain functions, for models whose attention modules are named
  or normalised differently.
* :class:`Attention`: multi-head self- or cross-attention with per-head RMS q/k norm,
  partial RoPE and optional differential heads (``to_qkv`` or ``to_q``/``to_kv``,
  ``to_out``, ``q_norm``, ``k_norm``).
* :func:`expo_fourier_frequencies`, :func:`fourier_features`: the exponentially spaced
  Fourier features of upstream ``ExpoFourierFeatures`` (DiT timestep, seconds embedder).

The ops themselves (attention, the GLU) come from the active kernels backend
(:func:`sa3_mlx.kernels.active`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels
from ..kernels import RMSNormParams, merge_heads, split_heads  # noqa: F401 (the heads helpers, re-exported)


def silu_mlp(in_dims: int, hidden_dims: int, out_dims: int, bias: bool) -> list[nn.Module]:
    """``[Linear, SiLU, Linear]`` as a list, so parameters are named ``0.*`` and ``2.*``.

    MLX's ``nn.Sequential`` would name them ``layers.0.*``; a plain list keeps the
    upstream ``nn.Sequential`` indices. Apply it with :func:`run_layers`.
    """
    return [nn.Linear(in_dims, hidden_dims, bias=bias), nn.SiLU(), nn.Linear(hidden_dims, out_dims, bias=bias)]


class QuantizedLinear(nn.QuantizedLinear):
    """An ``nn.Linear`` with MLX's affine-quantized weight (``mx.quantize``: ``weight`` uint32-packed,
    ``scales`` and ``biases`` per group of ``group_size`` inputs), its product through the kernel seam
    (:meth:`~sa3_mlx.kernels.Kernels.quantized_linear`). Built with zero tensors of the right shapes; the
    loader fills them (:func:`sa3_mlx.weights.load_strict`)."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        nn.Module.__init__(self)
        if mode != "affine":
            raise ValueError(f"only affine quantization is supported (got {mode!r})")
        if input_dims % group_size or 32 % bits:
            raise ValueError(f"{input_dims} inputs do not split into groups of {group_size} at {bits} bits")
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))

    @classmethod
    def like(cls, linear: nn.Linear, group_size: int, bits: int) -> "QuantizedLinear":
        """An empty quantized layer of ``linear``'s shape (and bias)."""
        out_dims, in_dims = linear.weight.shape
        return cls(in_dims, out_dims, "bias" in linear, group_size, bits)

    @property
    def input_dims(self) -> int:
        return self.weight.shape[1] * 32 // self.bits

    def dense_weight(self) -> mx.array:
        """The dequantized ``[out, in]`` weight, in the scales' dtype."""
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.active().quantized_linear(x, self)


def dense_weight(layer: nn.Module) -> mx.array:
    """A linear layer's ``[out, in]`` weight (dequantized when it is a :class:`QuantizedLinear`)."""
    return layer.dense_weight() if isinstance(layer, QuantizedLinear) else layer.weight


def run_layers(layers: Sequence[Callable[[mx.array], mx.array]], x: mx.array) -> mx.array:
    """Apply ``layers`` in order (the forward pass of a list built like :func:`silu_mlp`)."""
    for layer in layers:
        x = layer(x)
    return x


class GLU(nn.Module):
    """Gated linear unit: ``value * silu(gate)`` with ``value, gate = proj(x).split(2)``.

    The value half comes first, as in upstream ``GLU`` (``x, gate = x.chunk(2)``).
    """

    def __init__(self, in_dims: int, out_dims: int):
        super().__init__()
        self.proj = nn.Linear(in_dims, 2 * out_dims)

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.active().linear_glu(x, self.proj, "silu")


class FeedForward(nn.Module):
    """Upstream ``FeedForward(glu=True)``: ``Linear(GLU(x))`` with biases.

    ``ff`` mirrors upstream's ``nn.Sequential(GLU, Identity, Linear, Identity)`` so the
    keys are ``ff.0.proj.*`` and ``ff.2.*``; index 1 is the (parameter-free)
    rearrange slot upstream uses only for its convolutional variant.
    """

    def __init__(self, dims: int, inner_dims: int):
        super().__init__()
        self.ff = [GLU(dims, inner_dims), nn.Identity(), nn.Linear(inner_dims, dims)]

    def __call__(self, x: mx.array) -> mx.array:
        return run_layers(self.ff, x)


def differential_attention(
    q: mx.array, k: mx.array, v: mx.array, q_diff: mx.array, k_diff: mx.array, scale: float,
    mask: mx.array | None = None,
) -> mx.array:
    """``softmax(q k^T) v - softmax(q_diff k_diff^T) v`` (heads layout ``[B, H, L, D]``).

    This is upstream's form of differential attention: two attention maps over the
    same values, subtracted with weight 1. There is no learned lambda and no
    per-head norm after the subtraction (the Differential Transformer paper has
    both; the Stable Audio 3 checkpoints have neither).
    """
    ops = kernels.active()
    main = ops.attention(q, k, v, scale, mask)
    diff = ops.attention(q_diff, k_diff, v, scale, mask)
    return main - diff


class Attention(nn.Module):
    """Multi-head attention as upstream ``Attention(qk_norm="rms")``, bias-free projections.

    Self-attention projects ``to_qkv`` (``[q, k, v]``, or ``[q, k, v, q_diff, k_diff]``
    when ``differential``); cross-attention projects ``to_q`` (``[q]`` or
    ``[q, q_diff]``) from ``x`` and ``to_kv`` (``[k, v]`` or ``[k, k_diff, v]``) from
    the context. Every query and key head is RMS-normalised over ``head_dim`` (the
    diff heads share ``q_norm``/``k_norm``), then, for self-attention with
    ``rope_dims > 0``, the first ``rope_dims`` features of each head are rotated
    (half-split pairing, positions ``0..L-1``) and the rest pass through.
    """

    def __init__(
        self,
        dims: int,
        head_dim: int,
        cross: bool = False,
        differential: bool = False,
        rope_dims: int = 0,
        rope_base: float = 10000.0,
        qk_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if dims % head_dim:
            raise ValueError(f"dims ({dims}) must be a multiple of head_dim ({head_dim})")
        if cross and rope_dims:
            raise ValueError("rotary embeddings are applied in self-attention only")
        self.num_heads = dims // head_dim
        self.cross = cross
        self.scale = head_dim**-0.5
        self.differential = differential
        self.rope_dims = rope_dims
        self.rope_base = rope_base

        sets = 2 if differential else 1  # query/key sets: main, and diff when differential
        if cross:
            self.to_q = nn.Linear(dims, sets * dims, bias=False)
            self.to_kv = nn.Linear(dims, (sets + 1) * dims, bias=False)
        else:
            self.to_qkv = nn.Linear(dims, (2 * sets + 1) * dims, bias=False)
        self.to_out = nn.Linear(dims, dims, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)

    def context_keys_values(self, context: mx.array, key_bias: mx.array | None = None,
                            projected: mx.array | None = None) -> dict:
        """Cross-attention keys and values of ``context`` [B, S, dims], once per generation.

        ``{"keys": [B, H, S, D] per query set (normalised), "values": [B, H, S, D]}``, plus
        ``"key_bias"`` [B, 1, 1, S] when given (added to the logits, see
        :meth:`~sa3_mlx.kernels.Kernels.merge_repeated_tokens`), and ``"value_out"`` [B, H S, dims] when the context
        has fewer tokens than a head has features: each head's values times its slice of
        ``to_out``. Then ``to_out(concat_h(P_h V_h)) = concat_h(P_h) @ value_out``, a
        product over H S inputs instead of dims (a merged 17-token prompt: 272, not 1024).
        ``projected``: ``to_kv(context)`` when the caller has it (a training step projects the context of
        every block at once).
        """
        projected = self.to_kv(context) if projected is None else projected
        *keys, values = kernels.active().heads(projected, self.num_heads, "kkv" if self.differential else "kv",
                                               k_norm=RMSNormParams(self.k_norm.weight, self.k_norm.eps))
        kv = {"keys": keys, "values": values}
        if key_bias is not None:
            kv["key_bias"] = key_bias
        B, S, _ = context.shape
        head_dim = kv["values"].shape[-1]
        if S < head_dim:
            to_out = dense_weight(self.to_out)
            out_dims = to_out.shape[0]
            per_head = to_out.reshape(out_dims, self.num_heads, head_dim).transpose(1, 2, 0)
            kv["value_out"] = (kv["values"] @ per_head).reshape(B, self.num_heads * S, out_dims)
        return kv

    def __call__(
        self,
        x: mx.array,
        context: mx.array | None = None,
        context_kv: dict | None = None,
        value_mask: mx.array | None = None,
    ) -> mx.array:
        """``x`` [B, L, dims] -> [B, L, dims].

        Cross-attention attends to ``context`` [B, S, dims], or to its precomputed
        :meth:`context_keys_values`. ``value_mask`` (self-attention; [B, 1, L, 1], 1 =
        valid) zeroes the values of padded positions: upstream's padding mask in its
        PyTorch SDPA path ("V-zeroing"; the padded keys keep their softmax weight).
        """
        if not self.cross:
            out = kernels.active().self_attention(
                self.to_qkv(x), self.num_heads, self.scale,
                RMSNormParams(self.q_norm.weight, self.q_norm.eps), RMSNormParams(self.k_norm.weight, self.k_norm.eps),
                self.rope_dims, self.rope_base, self.differential, value_mask,
            )
            return self.to_out(out)
        if context_kv is None:
            if context is None:
                raise ValueError("cross-attention needs a context")
            context_kv = self.context_keys_values(context)
        keys, values, key_bias = context_kv["keys"], context_kv["values"], context_kv.get("key_bias")
        queries = kernels.active().heads(self.to_q(x), self.num_heads, "qq" if self.differential else "q",
                                         q_norm=RMSNormParams(self.q_norm.weight, self.q_norm.eps))
        if "value_out" in context_kv:
            ops = kernels.active()
            weights = ops.attention_weights(queries[0], keys[0], self.scale, key_bias)
            if self.differential:
                weights = weights - ops.attention_weights(queries[1], keys[1], self.scale, key_bias)
            B, H, L, S = weights.shape
            return weights.transpose(0, 2, 1, 3).reshape(B, L, H * S) @ context_kv["value_out"]
        if self.differential:
            out = differential_attention(queries[0], keys[0], values, queries[1], keys[1], self.scale, key_bias)
        else:
            out = kernels.active().attention(queries[0], keys[0], values, self.scale, key_bias)
        return self.to_out(merge_heads(out))


def expo_fourier_frequencies(dim: int, min_freq: float = 0.5, max_freq: float = 10000.0) -> mx.array:
    """The ``dim // 2`` fp32 frequencies of upstream ``ExpoFourierFeatures``, log-spaced.

    Upstream computes ``exp(linspace(0, 1) * (log max - log min) + log min)`` in fp32.
    The ramp and exponent are formed the same way in fp32 here (the ramp as
    ``i / (n - 1)``, which is what torch's and MLX's ``linspace`` give for ``[0, 1]``);
    the ``exp`` is taken in float64 and rounded once, i.e. a correctly rounded fp32
    ``exp``. That fixes these constants on the host, independent of the backend's
    ``exp`` (a 1-ulp change of a 1e4 frequency moves its feature by ~6e-3), and
    measured closest to the PyTorch reference (see tests/test_dit.py).
    """
    if dim % 2:
        raise ValueError(f"Fourier feature dim must be even, got {dim}")
    half = dim // 2
    ramp = np.arange(half, dtype=np.float32) / np.float32(max(half - 1, 1))
    log_min, log_max = math.log(min_freq), math.log(max_freq)
    exponent = ramp * np.float32(log_max - log_min) + np.float32(log_min)
    return mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))


def fourier_features(t: mx.array, freqs: mx.array) -> mx.array:
    """``[cos(2 pi t f), sin(2 pi t f)]`` for ``t`` [B] -> [B, 2 * len(freqs)], in fp32.

    The argument is rounded in the upstream order ``((t * f) * 2) * pi``. With
    frequencies up to 1e4 the argument reaches ~6e4 rad, where the fp32 rounding of a
    different order (e.g. ``t * (f * 2 pi)``, the official MLX port's) moves cos/sin by
    up to ~1.6e-2.
    """
    args = t.astype(mx.float32).reshape(-1, 1) * freqs * 2 * math.pi
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
