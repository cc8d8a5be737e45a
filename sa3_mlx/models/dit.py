"""The Stable Audio 3 diffusion transformer (DiT): one class for the small and medium models.

Math of upstream ``DiffusionTransformer`` + ``ContinuousTransformer`` as configured for
Stable Audio 3 (adaLN global conditioning, timestep as global conditioning, expo
timestep features, RMS norms, q/k RMS norm, memory tokens, local additive conditioning):

* context = ``to_cond_embed(cross_attn_cond)``; global = ``to_global_embed(global_cond)
  + to_timestep_embed(fourier_features(t))``; adaLN vector = ``global_cond_embedder(global)``
* ``x -> preprocess_conv(x) + x -> project_in``, then ``num_memory_tokens`` learned
  tokens are prepended (RoPE positions count them)
* per block, with ``scale, shift, gate (x2) = split(to_scale_shift_gate + adaLN, 6)``:
  ``x += sigmoid(1 - gate) * self_attn(norm(x) * (1 + scale) + shift)``,
  ``x += cross_attn(norm(x), context)``, ``x += to_local_embed(local_add_cond)`` (latent
  positions only), ``x += sigmoid(1 - gate) * ff(norm(x) * (1 + scale) + shift)``
* drop the memory tokens, ``project_out``, ``postprocess_conv(h) + h``.

The medium model uses differential attention (see :mod:`.layers`); which one a file
holds is read from its tensor shapes, as are all sizes (:meth:`DiTConfig.from_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels
from ..weights import NpzWeights, WeightError, WeightView, count_indexed, load_strict, require
from .layers import (
    Attention, FeedForward, expo_fourier_frequencies, fourier_features, run_layers, silu_mlp,
)

COND_PREFIX = "cond."
# Upstream's RotaryEmbedding buffer, saved in the PyTorch state dict and possibly
# carried into the MLX file by the converter. It is 1 / base^(2i / rope_dims), which
# mx.fast.rope recomputes, so it carries no information beyond its length.
ROPE_INV_FREQ_KEY = "transformer.rotary_pos_emb.inv_freq"


@dataclass
class DiTConfig:
    io_channels: int
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    cond_token_dim: int
    global_cond_dim: int
    local_add_cond_dim: int
    num_memory_tokens: int
    ff_inner: int
    timestep_features_dim: int
    differential: bool
    # None = upstream ContinuousTransformer's rule, RotaryEmbedding(max(head_dim // 2, 32)).
    rope_dims: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5  # upstream RMSNorm default (pre_norm, cross_attend_norm, ff_norm)
    qk_norm_eps: float = 1e-6  # upstream Attention default
    timestep_min_freq: float = 0.5
    timestep_max_freq: float = 10000.0

    def __post_init__(self):
        if self.rope_dims is None:
            self.rope_dims = max(self.head_dim // 2, 32)
        if self.num_heads * self.head_dim != self.embed_dim:
            raise ValueError(
                f"num_heads ({self.num_heads}) x head_dim ({self.head_dim}) != embed_dim ({self.embed_dim})"
            )
        if self.rope_dims % 2 or not 0 < self.rope_dims <= self.head_dim:
            raise ValueError(f"rope_dims ({self.rope_dims}) must be even and in 1..head_dim ({self.head_dim})")

    @classmethod
    def from_weights(cls, weights: Mapping, file: str | None = None) -> "DiTConfig":
        """Every size from tensor shapes (headers only; nothing is read or allocated).

        The head width is the q/k-norm width (the projections alone cannot split
        ``embed_dim`` into heads); differential attention shows as a ``5 E`` wide
        ``to_qkv`` (``3 E`` otherwise).
        """
        file = file or getattr(weights, "name", "<memory>")

        def dim(key: str, axis: int = 0) -> int:
            return int(require(weights, key, file)[axis])

        block = "transformer.layers.0."
        depth = count_indexed(weights, "transformer.layers.")
        if depth == 0:
            raise WeightError(f"{file}: no 'transformer.layers.N.*' tensors found")
        embed_dim = dim("transformer.project_in.weight")
        head_dim = dim(block + "self_attn.q_norm.weight")
        if embed_dim % head_dim:
            raise WeightError(
                f"{file}: embed_dim {embed_dim} is not a multiple of the q_norm width {head_dim}"
            )

        qkv_sets = {3 * embed_dim: False, 5 * embed_dim: True}
        qkv_rows = dim(block + "self_attn.to_qkv.weight")
        if qkv_rows not in qkv_sets:
            raise WeightError(
                f"{file}: key '{block}self_attn.to_qkv.weight' has {qkv_rows} rows, "
                f"expected {3 * embed_dim} (standard) or {5 * embed_dim} (differential attention)"
            )
        differential = qkv_sets[qkv_rows]
        q_rows = dim(block + "cross_attn.to_q.weight")
        if q_rows != (2 if differential else 1) * embed_dim:
            raise WeightError(
                f"{file}: key '{block}cross_attn.to_q.weight' has {q_rows} rows, which does not match "
                f"the {'differential' if differential else 'standard'} self-attention"
            )

        rope_dims = None
        if ROPE_INV_FREQ_KEY in weights:
            rope_dims = 2 * dim(ROPE_INV_FREQ_KEY)
        try:
            return cls(
                io_channels=dim("preprocess_conv.weight"),
                embed_dim=embed_dim,
                depth=depth,
                num_heads=embed_dim // head_dim,
                head_dim=head_dim,
                cond_token_dim=dim("to_cond_embed.0.weight", axis=1),
                global_cond_dim=dim("to_global_embed.0.weight", axis=1),
                local_add_cond_dim=dim(block + "to_local_embed.seq.0.weight", axis=1),
                num_memory_tokens=dim("transformer.memory_tokens"),
                ff_inner=dim(block + "ff.ff.2.weight", axis=1),
                timestep_features_dim=dim("to_timestep_embed.0.weight", axis=1),
                differential=differential,
                rope_dims=rope_dims,
            )
        except ValueError as e:
            raise WeightError(f"{file}: inconsistent DiT config ({e})") from None


@dataclass
class DiTConditioning:
    """The DiT inputs that stay fixed across sampler steps, already projected.

    Built once per generation by :meth:`DiT.condition`; each step adds only the
    timestep embedding (:meth:`DiT.predict`).
    """

    context: mx.array  # [B, S, E] cross-attention tokens after to_cond_embed
    # Per block: the cross-attention keys and values of the context (fixed across steps),
    # see Attention.context_keys_values.
    context_kv: list[dict]
    global_embed: mx.array  # [B, E] to_global_embed(global_cond), without the timestep
    # Per block: to_local_embed(local_add_cond), [B, T, E], or [1, 1, E] when there is no
    # local conditioning (the embedding of a zero vector, broadcast over batch and time).
    local_embeds: list[mx.array]
    # Self-attention value mask [B, 1, M + T, 1] (1 = valid; memory tokens always), or None
    # when every latent is valid: upstream generate()'s padding mask for the padded tail.
    value_mask: mx.array | None = None


class LocalEmbed(nn.Module):
    """``Linear -> SiLU -> Linear`` named ``seq.{0,2}`` as in the official MLX files."""

    def __init__(self, in_dims: int, dims: int):
        super().__init__()
        self.seq = silu_mlp(in_dims, dims, dims, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return run_layers(self.seq, x)


class DiTBlock(nn.Module):
    """One transformer block: adaLN self-attention, cross-attention, local add, adaLN FF."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        E = config.embed_dim
        self.num_memory_tokens = config.num_memory_tokens
        self.pre_norm = nn.RMSNorm(E, eps=config.norm_eps)
        self.self_attn = Attention(
            E, config.head_dim, differential=config.differential,
            rope_dims=config.rope_dims, rope_base=config.rope_base, qk_norm_eps=config.qk_norm_eps,
        )
        self.cross_attend_norm = nn.RMSNorm(E, eps=config.norm_eps)
        self.cross_attn = Attention(
            E, config.head_dim, cross=True, differential=config.differential, qk_norm_eps=config.qk_norm_eps
        )
        self.ff_norm = nn.RMSNorm(E, eps=config.norm_eps)
        self.ff = FeedForward(E, config.ff_inner)
        # Learned per-block offset of the shared adaLN vector [scale, shift, gate] x 2.
        self.to_scale_shift_gate = mx.zeros((6 * E,))
        self.to_local_embed = LocalEmbed(config.local_add_cond_dim, E)

    def __call__(
        self, x: mx.array, context_kv, adaln: mx.array, local_embed: mx.array, value_mask: mx.array | None = None
    ) -> mx.array:
        """``x`` [B, M + T, E] (memory tokens first), ``context_kv`` this block's cross-attention
        keys/values, ``adaln`` [B, 6E], ``local_embed`` [B|1, T|1, E], ``value_mask`` see DiTConditioning."""
        modulation = (self.to_scale_shift_gate + adaln)[:, None, :]
        scale_self, shift_self, gate_self, scale_ff, shift_ff, gate_ff = mx.split(modulation, 6, axis=-1)

        h = self.pre_norm(x) * (1 + scale_self) + shift_self
        x = x + self.self_attn(h, value_mask=value_mask) * mx.sigmoid(1 - gate_self)

        x = x + self.cross_attn(self.cross_attend_norm(x), context_kv=context_kv)

        # The local conditioning is aligned with the latents; memory tokens get none.
        M = self.num_memory_tokens
        x = mx.concatenate([x[:, :M], x[:, M:] + local_embed], axis=1)

        h = self.ff_norm(x) * (1 + scale_ff) + shift_ff
        return x + self.ff(h) * mx.sigmoid(1 - gate_ff)


class ContinuousTransformer(nn.Module):
    """Projection to the model width, memory tokens, the blocks, projection back."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        E = config.embed_dim
        self.project_in = nn.Linear(config.io_channels, E, bias=False)
        self.project_out = nn.Linear(E, config.io_channels, bias=False)
        self.memory_tokens = mx.zeros((config.num_memory_tokens, E))
        self.global_cond_embedder = silu_mlp(E, E, 6 * E, bias=True)
        self.layers = [DiTBlock(config) for _ in range(config.depth)]

    def __call__(
        self, x: mx.array, context_kv: list, global_embed: mx.array, local_embeds: list[mx.array],
        value_mask: mx.array | None = None, blocks: list | None = None, queue: bool = True,
    ) -> mx.array:
        """``x`` [B, T, C_io] -> [B, T, C_io]; ``global_embed`` [B, E] includes the timestep.

        ``blocks``: callables to run instead of the layers (e.g. each compiled); each
        block's evaluation is then queued as soon as it is built (not under mx.compile),
        unless ``queue`` is False (e.g. gradient-checkpointed blocks inside a gradient).
        """
        h, adaln = self.enter(x, global_embed)
        extras = () if value_mask is None else (value_mask,)
        previous = None
        for i, (kv, local_embed) in enumerate(zip(context_kv, local_embeds)):
            if blocks is None:
                h = self.layers[i](h, kv, adaln, local_embed, *extras)
                continue
            h = blocks[i](h, kv, adaln, local_embed, *extras)
            if not queue:
                continue
            # Queue this block, then wait for the one before: the device stays busy, and
            # buffers (allocated when work is queued) exist for at most two blocks.
            mx.async_eval(h)
            if previous is not None:
                mx.eval(previous)
            previous = h
        return self.leave(h)

    def enter(self, x: mx.array, global_embed: mx.array) -> tuple[mx.array, mx.array]:
        """What the blocks take: ``h`` [B, M + T, E] (memory tokens first) and the adaLN input [B, 6E]."""
        h = self.project_in(x)
        memory = mx.broadcast_to(self.memory_tokens, (h.shape[0], *self.memory_tokens.shape))
        return mx.concatenate([memory, h], axis=1), run_layers(self.global_cond_embedder, global_embed)

    def leave(self, h: mx.array) -> mx.array:
        """The last block's ``h`` without the memory tokens, projected back to [B, T, C_io]."""
        return self.project_out(h[:, self.memory_tokens.shape[0]:])


class DiT(nn.Module):
    """Stable Audio 3 DiT. Parameter names equal the official MLX weight-file keys."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        E, C = config.embed_dim, config.io_channels
        # 1x1 convolutions over [B, T, C]; weights in MLX layout [out, 1, in].
        self.preprocess_conv = nn.Conv1d(C, C, kernel_size=1, bias=False)
        self.postprocess_conv = nn.Conv1d(C, C, kernel_size=1, bias=False)
        self.to_cond_embed = silu_mlp(config.cond_token_dim, E, E, bias=False)
        self.to_global_embed = silu_mlp(config.global_cond_dim, E, E, bias=False)
        self.to_timestep_embed = silu_mlp(config.timestep_features_dim, E, E, bias=True)
        self.transformer = ContinuousTransformer(config)
        # Derived, not stored: the leading underscore keeps it out of parameters(), so
        # strict loading does not expect it and dtype casts leave it fp32.
        self._timestep_freqs = expo_fourier_frequencies(
            config.timestep_features_dim, config.timestep_min_freq, config.timestep_max_freq
        )

    @property
    def dtype(self) -> mx.Dtype:
        return self.preprocess_conv.weight.dtype

    def condition(
        self,
        cross_attn_cond: mx.array,
        global_cond: mx.array,
        local_add_cond: mx.array | None = None,
        padding_mask: mx.array | None = None,
        merge_repeats: bool = True,
        local_embeds: Callable[[mx.array], list[mx.array]] | None = None,
        context_projections: Callable[[mx.array], list[mx.array]] | None = None,
    ) -> DiTConditioning:
        """Project the step-independent inputs once.

        ``cross_attn_cond`` [B, S, C_cond], ``global_cond`` [B, C_global],
        ``local_add_cond`` [B, T, C_local] channels-last (inpainting: mask, masked latents)
        or None, which equals an all-zero local conditioning (upstream ``generate()``
        passes zeros when not inpainting). ``padding_mask`` [B, T] (1 = valid latent) or
        None (all valid): the self-attention values of padded latents are zeroed, which is
        what upstream's ``padding_mask`` does in its PyTorch SDPA path (the reference run;
        its flash-attention varlen path drops those keys instead). In fp32, repeated
        context tokens (the prompt's padding) are merged into one weighted key
        (:meth:`~sa3_mlx.kernels.Kernels.merge_repeated_tokens`) unless ``merge_repeats`` is False.
        ``local_embeds`` / ``context_projections``: what gives every block's ``to_local_embed(local_add_cond)`` /
        ``cross_attn.to_kv(context)`` at once, instead of each block's own call (a training step batches them
        over the blocks).
        """
        dtype = self.dtype
        key_bias = None
        # Exact in fp32; in half precision the log-count bias would round (log 236 by ~4e-3 in fp16).
        if merge_repeats and dtype == mx.float32:
            if (merged := kernels.active().merge_repeated_tokens(cross_attn_cond)) is not None:
                cross_attn_cond, key_bias = merged
        context = run_layers(self.to_cond_embed, cross_attn_cond.astype(dtype))
        global_embed = run_layers(self.to_global_embed, global_cond.astype(dtype))
        if local_add_cond is None:
            local_add_cond = mx.zeros((1, 1, self.config.local_add_cond_dim), dtype=dtype)
        local_add_cond = local_add_cond.astype(dtype)
        layers = self.transformer.layers
        embeds = local_embeds(local_add_cond) if local_embeds else \
            [layer.to_local_embed(local_add_cond) for layer in layers]
        projected = context_projections(context) if context_projections else [None] * len(layers)
        context_kv = [layer.cross_attn.context_keys_values(context, key_bias, p) for layer, p in zip(layers, projected)]
        return DiTConditioning(context, context_kv, global_embed, embeds, self.value_mask(padding_mask))

    def value_mask(self, padding_mask: mx.array | None) -> mx.array | None:
        """The self-attention value mask [B, 1, M + T, 1] of ``padding_mask`` [B, T] (see DiTConditioning)."""
        if padding_mask is None:
            return None
        valid = mx.array(padding_mask).astype(self.dtype)
        memory = mx.ones((valid.shape[0], self.config.num_memory_tokens), dtype=self.dtype)
        return mx.concatenate([memory, valid], axis=1)[:, None, :, None]

    def step_activation_bytes(self, latents: int, batch: int = 1) -> int:
        """Estimated activations of one step evaluated as a single graph (all blocks' alive at once).

        Calibrated on an H100 in fp16: 68-91 kB per token and block for the medium model
        (width 1536) at 120-380 s, 22 kB for the small one (width 1024); 24 bytes per
        unit of width and itemsize covers both.
        """
        c = self.config
        tokens = batch * (latents + c.num_memory_tokens)
        return tokens * c.depth * 24 * c.embed_dim * self.dtype.size

    def timestep_features(self, t: mx.array) -> mx.array:
        """Expo Fourier features of the timesteps ``t`` [B] -> [B, F], fp32."""
        return fourier_features(t, self._timestep_freqs)

    def embed_timestep(self, features: mx.array) -> mx.array:
        """``to_timestep_embed`` of :meth:`timestep_features` -> [B, E]."""
        return run_layers(self.to_timestep_embed, features.astype(self.dtype))

    def predict(
        self, x: mx.array, timestep_embed: mx.array, cond: DiTConditioning, blocks: list | None = None,
        queue: bool = True,
    ) -> mx.array:
        """One step's velocity: ``x`` [B, C_io, T] channels-first -> ``v`` [B, C_io, T].

        ``blocks`` (e.g. the layers, each compiled) run one after another, each queued
        for evaluation as soon as it is built: a GPU then releases a block's activations
        once the next has run instead of holding the whole step's (for long clips; see
        :meth:`step_activation_bytes`). Not under mx.compile.
        """
        h = self.transformer(self.preprocess(x), cond.context_kv, cond.global_embed + timestep_embed,
                             cond.local_embeds, cond.value_mask, blocks, queue)
        return self.postprocess(h)

    def preprocess(self, x: mx.array) -> mx.array:
        """``x`` [B, C_io, T] -> the transformer's input [B, T, C_io]."""
        x = x.astype(self.dtype).swapaxes(1, 2)
        return self.preprocess_conv(x) + x

    def postprocess(self, h: mx.array) -> mx.array:
        """The transformer's output [B, T, C_io] -> ``v`` [B, C_io, T]."""
        return (self.postprocess_conv(h) + h).swapaxes(1, 2)

    def __call__(
        self,
        x: mx.array,
        t: mx.array,
        cross_attn_cond: mx.array,
        global_cond: mx.array,
        local_add_cond: mx.array | None = None,
        padding_mask: mx.array | None = None,
    ) -> mx.array:
        """``v`` [B, C_io, T] for ``x`` [B, C_io, T] at timesteps ``t`` [B] (see :meth:`condition`)."""
        cond = self.condition(cross_attn_cond, global_cond, local_add_cond, padding_mask)
        return self.predict(x, self.embed_timestep(self.timestep_features(t)), cond)


def sanitize(weights: Mapping) -> tuple[Mapping, dict[str, np.ndarray]]:
    """Split an official DiT file into ``(dit_weights, cond_weights)``.

    ``dit_weights`` is a lazy view with the module's parameter names (the file's names
    already are), without ``transformer.rotary_pos_emb.inv_freq`` (derived, see
    ``ROPE_INV_FREQ_KEY``) and a quantized file's ``QUANTIZATION`` record. ``cond_weights`` are the
    conditioner's ``cond.*`` tensors, read as they are, keyed without the ``cond.`` prefix (as
    :func:`sa3_mlx.conditioning.load_conditioner` takes them).
    """
    from ..quantize import RECORD_KEY

    dit_keys, cond_weights = [], {}
    for key in weights:
        if key.startswith(COND_PREFIX):
            cond_weights[key[len(COND_PREFIX):]] = weights[key]
        elif key not in (ROPE_INV_FREQ_KEY, RECORD_KEY):
            dit_keys.append(key)
    return WeightView(weights, dit_keys), cond_weights


def load_dit(
    weights: Mapping | str | Path, dtype: mx.Dtype = mx.float32, quantize=None,
) -> tuple[DiT, DiTConfig, dict[str, np.ndarray]]:
    """DiT, its config and the ``cond.*`` tensors (prefix removed) from an official DiT file.

    Strict: every parameter must be in the file with its shape and every other key
    must be a ``cond.*`` tensor or the RoPE ``inv_freq`` buffer; otherwise a
    :class:`~sa3_mlx.weights.WeightError` names the file and the key. Weights are
    cast to ``dtype``, one tensor at a time.

    ``quantize`` (a :class:`sa3_mlx.quantize.Quantization`): the transformer blocks' linear layers
    are quantized as they are read (:func:`sa3_mlx.quantize.dit_targets`). A quantized file (one with a
    ``QUANTIZATION`` record) loads quantized as its record says; asking for another quantization of it
    is an error.
    """
    from .. import quantize as quant

    if isinstance(weights, (str, Path)):
        weights = NpzWeights(weights)
    file = getattr(weights, "name", "<memory>")
    stored = quant.read_record(weights, file)
    if stored is not None:
        q, targets = stored
        if quantize is not None and quantize != q:
            raise WeightError(f"{file} is quantized {q}; it loads only as it is (leave out the quantization "
                              f"or ask for {q.bits} bits, group {q.group_size}), not as {quantize}")
        config = DiTConfig.from_weights(quant.LogicalShapes(weights, q, targets), file)
    else:
        q = quantize
        config = DiTConfig.from_weights(weights, file)
    dit_weights, cond_weights = sanitize(weights)
    model = DiT(config)
    if q is not None:
        quant.swap(model, targets if stored is not None else quant.dit_targets(model, q), q)
        model.quantization = q
    # The active backend's layout is applied while reading (CPU fp32: transposed for plain BLAS products).
    load_strict(model, dit_weights, file, dtype=dtype, linear_layout=kernels.active().linear_weight_layout(dtype))
    model.eval()
    return model, config, cond_weights
