"""The SAME audio codec (SAME-S and SAME-L): encoder and decoder, one implementation.

Math of upstream ``SAMEEncoder`` / ``SAMEDecoder`` with one ``TransformerResamplingBlock``
(stride 16) and the ``SoftNormBottleneck``, as Stable Audio 3 configures them:

* Every latent owns a group of ``stride + 1`` tokens. Decoder: ``[latent, new_tokens x 16]``,
  the 16 new-token outputs become 16 patches. Encoder: ``[patch x 16, new_token]``, the
  new-token output becomes the latent.
* Blocks: ``x += attn(DyT(x))``, ``x += ff(DyT(x))``. Differential attention (two softmax
  maps over shared values, subtracted), per-head DyT q/k norms, RoPE on the first
  ``head_dim // 2`` features. GLU feed-forward, SiLU gate, or ``sin(pi x)`` in the last
  decoder blocks of SAME-L.
* Which tokens see each other is the one difference between the families:
  SAME-S cuts the sequence into chunks of ``chunk_size / stride`` latents; the first half
  of the blocks attends within chunks, the second half within chunks shifted by half a
  chunk (the sequence is padded with copies of its first and last half chunk).
  SAME-L attends within a sliding window of +-``sliding_window`` latents' worth of tokens.
* Output mapping: a weight-normed Conv1d (fused in the files; kernel 3 in the SAME-S
  decoder, 1 elsewhere). Bottleneck: the decoder scales latents by ``running_std``, the
  encoder returns ``(z * scaling_factor + bias) / running_std``.

Neither structure is visible in the tensor shapes (the tiny S and L files have equal
widths), so the family is an argument, derived from the file name by :func:`load_same`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels
from ..kernels import DyTParams
from ..weights import NpzWeights, WeightError, count_indexed, load_strict, require, shape_of

FAMILIES = ("s", "l")
ROLES = ("encoder", "decoder")
MAPPING_KEY = "mapping.weight"


@dataclass
class SAMEConfig:
    family: str  # "s": chunked attention with a midpoint shift; "l": sliding-window attention
    role: str  # "encoder" or "decoder"
    dim: int
    num_heads: int
    head_dim: int
    num_blocks: int
    ff_inner: int
    latent_dim: int
    io_channels: int  # patch channels: audio channels x patch size
    mapping_kernel: int  # output mapping Conv1d kernel ("same" padding)
    stride: int = 16  # patches per latent
    rope_dims: int | None = None  # None = upstream TransformerBlock's rule, head_dim // 2
    rope_base: float = 10000.0
    # SAME-S: attention chunk in patch positions (upstream units); chunk_size / stride latents.
    chunk_size: int = 32
    # SAME-L: attention reach in latents (left, right); in tokens, times stride + 1.
    sliding_window: tuple[int, int] = (1, 1)
    # Upstream's decoder setting: block i uses the sin(pi x) gate iff num_blocks - i < sinusoidal_blocks.
    sinusoidal_blocks: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.rope_dims is None:
            self.rope_dims = self.head_dim // 2
        if self.num_heads * self.head_dim != self.dim:
            raise ValueError(f"num_heads ({self.num_heads}) x head_dim ({self.head_dim}) != dim ({self.dim})")
        if self.rope_dims % 2 or not 0 < self.rope_dims <= self.head_dim:
            raise ValueError(f"rope_dims ({self.rope_dims}) must be even and in 1..head_dim ({self.head_dim})")
        if self.mapping_kernel % 2 == 0:
            raise ValueError(f"mapping kernel must be odd for 'same' padding, got {self.mapping_kernel}")
        if self.family == "s" and (self.chunk_size % self.stride or self.chunk_latents % 2):
            # The midpoint shift moves chunks by half of them; it must be whole latents.
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must be an even number of strides ({self.stride})"
            )
        if self.family == "l" and min(self.sliding_window) < 0:
            raise ValueError(f"sliding_window must be non-negative, got {self.sliding_window}")
        self.sliding_window = tuple(self.sliding_window)

    @property
    def tokens_per_latent(self) -> int:
        return self.stride + 1

    @property
    def chunk_latents(self) -> int:
        return self.chunk_size // self.stride

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_latents * self.tokens_per_latent

    @property
    def shift_tokens(self) -> int:
        """The midpoint shift of the second half of the SAME-S blocks: half a chunk."""
        return self.chunk_tokens // 2

    def uses_sin_gate(self, block: int) -> bool:
        return self.num_blocks - block < self.sinusoidal_blocks

    @property
    def window_grid(self) -> int:
        """Latent positions where a decode window may start and still see the same chunks."""
        return self.chunk_latents if self.family == "s" else 1

    @property
    def context_latents(self) -> tuple[int, int]:
        """Latents (left, right) at each cut edge of a decode window whose output is not exact.

        SAME-S (windows starting on the chunk grid): the first-half chunks are the
        global ones; the shifted chunk at each edge is padded with copies instead of
        the neighbours, which spoils half a chunk. SAME-L: each block moves
        information ``sliding_window`` latents, so ``num_blocks`` of them spoil
        ``num_blocks x sliding_window``. Both: the mapping kernel reaches
        ``kernel // 2`` patches into the neighbouring latent.
        """
        spill = math.ceil((self.mapping_kernel // 2) / self.stride)
        if self.family == "s":
            edge = self.chunk_latents // 2 + spill
            return edge, edge
        left, right = self.sliding_window
        return self.num_blocks * left + spill, self.num_blocks * right + spill

    def activation_bytes_per_latent(self, itemsize: int = 4) -> int:
        """Estimated peak activation memory of a decode, per latent (for decode budgets).

        Feed-forward and projections scale with ``ff_inner``, attention with the heads
        and the keys each query sees. The factors are calibrated on the full-size
        decoders (MLX CPU, fp32: 2.1 MB per latent for SAME-S, 5.2 MB for SAME-L).
        """
        if self.family == "s":
            keys = self.chunk_tokens
        else:
            keys = (sum(self.sliding_window) + 1) * self.tokens_per_latent
        per_token = 8 * self.ff_inner + 36 * self.num_heads * keys
        return per_token * self.tokens_per_latent * itemsize

    @classmethod
    def from_weights(cls, weights: Mapping, family: str, role: str, **overrides: Any) -> "SAMEConfig":
        """Every size from tensor shapes (headers only; nothing is read or allocated).

        The structure that shapes cannot show comes from the family (and
        ``overrides``, e.g. ``sinusoidal_blocks`` for a non-standard SAME-L decoder).
        The head width is the q/k DyT width; the attention must be differential
        (``to_qkv`` 5 x dim rows).
        """
        file = getattr(weights, "name", "<memory>")
        if family not in FAMILIES or role not in ROLES:
            raise ValueError(f"family must be one of {FAMILIES} and role one of {ROLES}")

        def shape(key: str) -> tuple[int, ...]:
            return tuple(int(s) for s in require(weights, key, file))

        num_blocks = count_indexed(weights, "blocks.")
        if num_blocks == 0:
            raise WeightError(f"{file}: no 'blocks.N.*' tensors found")
        if role == "decoder":
            dim, latent_dim = shape("project_in.weight")
        else:
            latent_dim, dim = shape("project_out.weight")
        head_dim = shape("blocks.0.attn.q_norm.gamma")[0]
        if dim % head_dim:
            raise WeightError(f"{file}: dim {dim} is not a multiple of the q_norm width {head_dim}")
        qkv_rows = shape("blocks.0.attn.to_qkv.weight")[0]
        if qkv_rows != 5 * dim:
            raise WeightError(
                f"{file}: key 'blocks.0.attn.to_qkv.weight' has {qkv_rows} rows, expected {5 * dim} "
                "(SAME uses differential attention: q, k, v, q_diff, k_diff)"
            )
        io_channels, kernel = _mapping_geometry(shape(MAPPING_KEY), role, dim, file)
        fields: dict[str, Any] = dict(
            family=family,
            role=role,
            dim=dim,
            num_heads=dim // head_dim,
            head_dim=head_dim,
            num_blocks=num_blocks,
            ff_inner=shape("blocks.0.ff.proj_out.weight")[1],
            latent_dim=latent_dim,
            io_channels=io_channels,
            mapping_kernel=kernel,
        )
        if family == "l" and role == "decoder":
            # sa3-medium's SAME-L decoder config (sinusoidal_blocks [8]: blocks 5..11 of 12).
            fields["sinusoidal_blocks"] = 8
        fields.update(overrides)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise WeightError(f"{file}: inconsistent SAME config ({e})") from None


    @classmethod
    def tiny(cls, family: str, role: str) -> "SAMEConfig":
        """The reference data's tiny codecs (dim 64, 2 heads): S 6 blocks, L 4 with sin gates on 2."""
        return cls(
            family=family,
            role=role,
            dim=64,
            num_heads=2,
            head_dim=32,
            num_blocks=6 if family == "s" else 4,
            ff_inner=192,
            latent_dim=256,
            io_channels=512,
            mapping_kernel=3 if (family, role) == ("s", "decoder") else 1,
            sinusoidal_blocks=3 if (family, role) == ("l", "decoder") else 0,
        )


def _mapping_geometry(shape: tuple[int, ...], role: str, dim: int, file: str) -> tuple[int, int]:
    """(io channels, kernel) from ``mapping.weight``: [O, I] or [O, I, k] (PyTorch) or [O, k, I] (MLX).

    The decoder maps dim -> io, so its ``dim`` axis is the input axis. The encoder
    maps io -> dim and its input width is unknown; a kernel is far narrower than the
    512 patch channels, so the smaller trailing axis is taken as the kernel.
    """
    if len(shape) == 2:
        out_ch, in_ch, kernel = shape[0], shape[1], 1
    elif len(shape) == 3:
        out_ch, a, b = shape
        if role == "decoder":
            in_ch, kernel = (a, b) if a == dim else (b, a)
        else:
            in_ch, kernel = max(a, b), min(a, b)
    else:
        raise WeightError(f"{file}: key '{MAPPING_KEY}' has shape {list(shape)}, expected 2-D or 3-D")
    io_channels, model_width = (out_ch, in_ch) if role == "decoder" else (in_ch, out_ch)
    if model_width != dim:
        raise WeightError(f"{file}: key '{MAPPING_KEY}' has shape {list(shape)}, which does not fit dim {dim}")
    return io_channels, kernel


class _SanitizedWeights(Mapping):
    """The file's tensors, read lazily, with ``mapping.weight`` in the module's layout."""

    def __init__(self, weights: Mapping, config: SAMEConfig):
        self._weights = weights
        self._keys = set(weights)  # membership without reading tensors
        self.name = getattr(weights, "name", "<memory>")
        self._config = config

    def _target_shape(self) -> tuple[int, ...]:
        c = self._config
        out_ch, in_ch = (c.io_channels, c.dim) if c.role == "decoder" else (c.dim, c.io_channels)
        return (out_ch, in_ch) if c.mapping_kernel == 1 else (out_ch, c.mapping_kernel, in_ch)

    def _fix_mapping(self, weight: np.ndarray) -> np.ndarray:
        target = self._target_shape()
        if len(target) == 2:  # a k=1 conv is a Linear: [O, I, 1] / [O, 1, I] / [O, I]
            return weight.reshape(target)
        if tuple(weight.shape) == target:  # already MLX Conv1d [O, k, I]
            return weight
        return np.swapaxes(weight, 1, 2)  # PyTorch Conv1d [O, I, k]

    def __getitem__(self, key: str) -> np.ndarray:
        weight = self._weights[key]
        return self._fix_mapping(np.asarray(weight)) if key == MAPPING_KEY else weight

    def shape(self, key: str) -> tuple[int, ...]:
        found = tuple(shape_of(self._weights, key))
        if key != MAPPING_KEY:
            return found
        target = self._target_shape()
        fixable = math.prod(found) == math.prod(target) and (
            len(target) == 2 or found == target or found == (target[0], target[2], target[1])
        )
        return target if fixable else found

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


def sanitize(weights: Mapping, config: SAMEConfig) -> Mapping:
    """A lazy view of ``weights`` named and shaped as the module's parameters.

    Only ``mapping.weight`` changes: a kernel-1 mapping becomes a Linear ``[O, I]``
    (from any 3-D layout), a wider one an MLX Conv1d ``[O, k, I]`` (from PyTorch
    ``[O, I, k]``, or as is).
    """
    return _SanitizedWeights(weights, config)


class DyT(nn.Module):
    """Dynamic tanh norm: ``gamma * tanh(alpha * x) + beta`` (alpha a learned scalar)."""

    def __init__(self, dims: int):
        super().__init__()
        self.alpha = mx.ones((1,))
        self.gamma = mx.ones((dims,))
        self.beta = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return self.gamma * kernels.active().tanh(self.alpha * x) + self.beta

    @property
    def params(self) -> DyTParams:
        return DyTParams(self.alpha, self.gamma, self.beta)


class SAMEAttention(nn.Module):
    """Differential self-attention with DyT q/k norms and RoPE (upstream ``Attention``).

    Full attention (SAME-S chunks) is the kernels backend's fused
    :meth:`~sa3_mlx.kernels.Kernels.self_attention`; SAME-L's sliding window is its
    :meth:`~sa3_mlx.kernels.Kernels.local_attention` with a window.
    """

    def __init__(self, config: SAMEConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.group = config.tokens_per_latent
        self.scale = config.head_dim**-0.5
        self.rope_dims = config.rope_dims
        self.rope_base = config.rope_base
        self.to_qkv = nn.Linear(config.dim, 5 * config.dim, bias=False)
        self.to_out = nn.Linear(config.dim, config.dim, bias=False)
        self.q_norm = DyT(config.head_dim)
        self.k_norm = DyT(config.head_dim)

    def __call__(
        self, x: mx.array | None, window: tuple[int, int] | None = None, qkv: mx.array | None = None
    ) -> mx.array:
        """``x`` [B, N, dim]; ``window`` (left, right) in latents, or None for full attention.
        ``qkv``: ``to_qkv(x)`` when the caller has it (then ``x`` is not used)."""
        qkv = self.to_qkv(x) if qkv is None else qkv
        if window is None:
            out = kernels.active().self_attention(
                qkv, self.num_heads, self.scale, self.q_norm.params, self.k_norm.params,
                self.rope_dims, self.rope_base, differential=True,
            )
            return self.to_out(out)
        ops = kernels.active()
        q, k, v, q_diff, k_diff = ops.heads(qkv, self.num_heads, "qkvqk", self.q_norm.params, self.k_norm.params,
                                            self.rope_dims, self.rope_base)
        return self.to_out(ops.local_attention([q, q_diff], [k, k_diff], v, self.scale, window, self.group, merged=True))


class SAMEFeedForward(nn.Module):
    """``proj_out(value * gate_fn(gate))`` with ``value, gate = glu_proj(x)``; SiLU or sin(pi x)."""

    def __init__(self, dims: int, inner_dims: int, sin_gate: bool):
        super().__init__()
        self.sin_gate = sin_gate
        self.glu_proj = nn.Linear(dims, 2 * inner_dims)
        self.proj_out = nn.Linear(inner_dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj_out(kernels.active().linear_glu(x, self.glu_proj, "sin_pi" if self.sin_gate else "silu"))


class SAMEBlock(nn.Module):
    def __init__(self, config: SAMEConfig, sin_gate: bool):
        super().__init__()
        self.pre_norm = DyT(config.dim)
        self.attn = SAMEAttention(config)
        self.ff_norm = DyT(config.dim)
        self.ff = SAMEFeedForward(config.dim, config.ff_inner, sin_gate)

    def __call__(self, x: mx.array, window: tuple[int, int] | None = None, qkv: mx.array | None = None) -> mx.array:
        """``qkv``: the attention's ``to_qkv(pre_norm(x))``, when the caller has it."""
        x = x + self.attn(self.pre_norm(x) if qkv is None else None, window, qkv)
        return x + self.ff(self.ff_norm(x))


def _mapping_layer(in_dims: int, out_dims: int, kernel: int) -> nn.Module:
    if kernel == 1:
        return nn.Linear(in_dims, out_dims)
    return nn.Conv1d(in_dims, out_dims, kernel, padding=kernel // 2)


class _SAMECodec(nn.Module):
    """What encoder and decoder share: the blocks, ``new_tokens`` and the token mixing pattern."""

    def __init__(self, config: SAMEConfig):
        super().__init__()
        self.config = config
        self.running_std = mx.ones((1,))
        self.new_tokens = mx.zeros((1, 1, config.dim))
        self.blocks = [SAMEBlock(config, config.uses_sin_gate(i)) for i in range(config.num_blocks)]

    def to_official_layout(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This module's parameters as the official files store them (inverse of :func:`sanitize`).

        ``mapping.weight`` goes back to a PyTorch Conv1d ``[O, I, k]`` (k = 1 included).
        """
        arrays = dict(arrays)
        weight = np.asarray(arrays[MAPPING_KEY])
        if weight.ndim == 2:
            arrays[MAPPING_KEY] = weight[:, :, None]
        else:
            arrays[MAPPING_KEY] = np.swapaxes(weight, 1, 2)
        return arrays

    def _new_tokens(self, batch: int, latents: int, count: int) -> mx.array:
        """``new_tokens`` broadcast to ``[batch, latents, count, dim]``."""
        return mx.broadcast_to(self.new_tokens[:, :, None], (batch, latents, count, self.config.dim))

    def run_blocks(self, x: mx.array, first_qkv: mx.array | None = None, blocks: list | None = None) -> mx.array:
        """The blocks over ``x`` [B, latents x (stride + 1), dim] (latents on the window grid).
        ``first_qkv``: the first block's ``to_qkv(pre_norm(x))`` [B, N, 5 dim], if known. ``blocks``:
        callables to run in place of the blocks, with their arguments (e.g. each compiled)."""
        c = self.config
        blocks = self.blocks if blocks is None else blocks
        if c.family == "l":
            for i, block in enumerate(blocks):
                x = _evaluated(block(x, c.sliding_window, first_qkv if i == 0 else None))
            return x

        B, N, D = x.shape
        chunk, shift, split = c.chunk_tokens, c.shift_tokens, c.num_blocks // 2
        # First half: chunks on the grid, each one a separate sequence (RoPE restarts).
        x = x.reshape(-1, chunk, D)
        if first_qkv is not None:
            first_qkv = first_qkv.reshape(x.shape[0], chunk, -1)
        x = self._chunks_through(blocks[:split], x, first_qkv)
        # Second half: chunks shifted by half a chunk; the edges repeat their own half chunk.
        x = x.reshape(B, N, D)
        x = mx.concatenate([x[:, :shift], x, x[:, -shift:]], axis=1).reshape(-1, chunk, D)
        x = self._chunks_through(blocks[split:], x)
        return x.reshape(B, N + 2 * shift, D)[:, shift:-shift]

    def _chunks_through(self, blocks: list, x: mx.array, first_qkv: mx.array | None = None) -> mx.array:
        """Independent chunks ``x`` [chunks, chunk tokens, dim] through ``blocks``.

        As many chunks at a time as the kernels backend asks
        (:meth:`~sa3_mlx.kernels.Kernels.chunks_per_group`): SAME-S chunks do not see
        each other, so grouping changes nothing but the working set, which on the CPU
        then stays in the caches and is reused from group to group (0.6 s of a 30 s
        decode on the dev box, measured). A GPU takes them all at once.
        """
        per_group = kernels.active().chunks_per_group(x.shape[0], x.shape[1])
        out = []
        for start in range(0, x.shape[0], per_group):
            h = x[start : start + per_group]
            for i, block in enumerate(blocks):
                qkv = first_qkv[start : start + per_group] if (i == 0 and first_qkv is not None) else None
                h = _evaluated(block(h, None, qkv))
            out.append(h)
        return out[0] if len(out) == 1 else mx.concatenate(out)


def _evaluated(x: mx.array) -> mx.array:
    """``x``, evaluated now (outside ``mx.compile`` tracing).

    A codec call is large: evaluated as one graph, a GPU keeps every block's
    intermediate buffers until the whole graph has run (6-9 GB above the weights for a
    120 s SAME-L decode on an H100, measured). Block by block, one block's are alive.
    """
    try:
        mx.eval(x)
    except ValueError:  # tracing: the caller evaluates
        pass
    return x


class SAMEDecoder(_SAMECodec):
    """Latents ``[B, latent_dim, T]`` -> patches ``[B, io_channels, stride x T]``.

    Upstream also returns the patches of the grid padding (SAME-S, odd T); they are dropped.
    """

    def __init__(self, config: SAMEConfig):
        super().__init__(config)
        self.project_in = nn.Linear(config.latent_dim, config.dim)
        self.mapping = _mapping_layer(config.dim, config.io_channels, config.mapping_kernel)

    def embed(self, latents: mx.array) -> mx.array:
        """Latents -> ``[B, T', dim]`` model-space tokens, zero-padded to the window grid.

        Per latent and position independent, so a chunked decode embeds once and
        cuts windows out of the result (the padding is zeros here, not zero latents).
        """
        h = self.project_in((latents * self.running_std).transpose(0, 2, 1))
        pad = -h.shape[1] % self.config.window_grid
        return mx.pad(h, [(0, 0), (0, pad), (0, 0)]) if pad else h

    def decode_embedded(self, hidden: mx.array, blocks: list | None = None) -> mx.array:
        """``[B, T', dim]`` from :meth:`embed` (T' on the grid) -> patches ``[B, io, stride x T']``.
        ``blocks``: see :meth:`run_blocks`."""
        c = self.config
        B, T, D = hidden.shape
        tokens = mx.concatenate([hidden[:, :, None], self._new_tokens(B, T, c.stride)], axis=2)
        tokens = self.run_blocks(tokens.reshape(B, T * c.tokens_per_latent, D), self._first_qkv(hidden), blocks)
        # Each latent's first token (its input) is dropped; the new tokens become patches.
        out = tokens.reshape(B, T, c.tokens_per_latent, D)[:, :, 1:].reshape(B, T * c.stride, D)
        return self.mapping(out).transpose(0, 2, 1)

    def _first_qkv(self, hidden: mx.array) -> mx.array:
        """The first block's ``to_qkv(pre_norm(tokens))`` for the tokens of ``hidden`` [B, T, dim].

        16 of every 17 tokens are the same ``new_tokens`` vector there, so its projection
        is computed once and repeated: the latents' rows alone are multiplied (a 16/17
        cut of that block's largest product).
        """
        B, T, _ = hidden.shape
        first = self.blocks[0]
        latent_rows = first.attn.to_qkv(first.pre_norm(hidden))[:, :, None]
        new_row = first.attn.to_qkv(first.pre_norm(self.new_tokens))[:, :, None]
        new_rows = mx.broadcast_to(new_row, (B, T, self.config.stride, new_row.shape[-1]))
        return mx.concatenate([latent_rows, new_rows], axis=2).reshape(B, T * self.config.tokens_per_latent, -1)

    def __call__(self, latents: mx.array, blocks: list | None = None) -> mx.array:
        patches = self.decode_embedded(self.embed(latents), blocks)
        return patches[..., : latents.shape[-1] * self.config.stride]


class SAMEEncoder(_SAMECodec):
    """Patches ``[B, io_channels, P]`` -> latents ``[B, latent_dim, ceil(P / stride)]``.

    Upstream also returns the latents of the grid padding (SAME-S); they are dropped.
    """

    def __init__(self, config: SAMEConfig):
        super().__init__(config)
        self.mapping = _mapping_layer(config.io_channels, config.dim, config.mapping_kernel)
        self.project_out = nn.Linear(config.dim, config.latent_dim)
        self.scaling_factor = mx.ones((1, config.latent_dim, 1))
        self.bias = mx.zeros((1, config.latent_dim, 1))

    def __call__(self, patches: mx.array) -> mx.array:
        c = self.config
        B, _, P = patches.shape
        n_latents = -(-P // c.stride)
        # Silence patches up to the grid, before the mapping (as upstream pads).
        pad = -P % (c.window_grid * c.stride)
        x = self.mapping(mx.pad(patches, [(0, 0), (0, 0), (0, pad)]).transpose(0, 2, 1))
        T = x.shape[1] // c.stride
        tokens = mx.concatenate([x.reshape(B, T, c.stride, c.dim), self._new_tokens(B, T, 1)], axis=2)
        tokens = self.run_blocks(tokens.reshape(B, T * c.tokens_per_latent, c.dim))
        z = tokens.reshape(B, T, c.tokens_per_latent, c.dim)[:, :n_latents, -1]
        z = self.project_out(z).transpose(0, 2, 1)
        return (z * self.scaling_factor + self.bias) / self.running_std


def build_same(config: SAMEConfig) -> SAMEEncoder | SAMEDecoder:
    """An encoder or decoder (by ``config.role``), randomly initialised."""
    return SAMEDecoder(config) if config.role == "decoder" else SAMEEncoder(config)


def family_from_name(name: str) -> str:
    """``same_s_*`` -> "s", ``same_l_*`` -> "l" (the official file names)."""
    for family in FAMILIES:
        if Path(name).name.lower().startswith(f"same_{family}_"):
            return family
    raise WeightError(f"{name}: cannot tell SAME-S from SAME-L by the file name; pass family='s' or 'l'")


def load_same(
    source: str | Path | Mapping,
    role: str,
    family: str | None = None,
    dtype: mx.Dtype = mx.float32,
    **config_overrides: Any,
) -> SAMEEncoder | SAMEDecoder:
    """A SAME encoder or decoder from an ``.npz`` path or a weight mapping, loaded strictly.

    Every module parameter must be in the file with its shape and every file key
    must be used; otherwise :class:`WeightError` names the file and the key.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    weights = source if isinstance(source, Mapping) else NpzWeights(source)
    try:
        name = getattr(weights, "name", "<memory>")
        config = SAMEConfig.from_weights(weights, family or family_from_name(name), role, **config_overrides)
        model = build_same(config)
        load_strict(model, sanitize(weights, config), name, dtype=dtype)
    finally:
        if weights is not source:
            weights.close()
    return model

