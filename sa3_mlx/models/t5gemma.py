"""T5Gemma text encoder (the encoder half of google/t5gemma-b-b-ul2) and its tokenizer.

The math follows Hugging Face's ``T5GemmaEncoder`` (Gemma 2 blocks, bidirectional):

* token embedding scaled by ``sqrt(hidden_size)``
* per layer: ``h += post_norm(attn(pre_norm(h)))`` then ``h += post_norm(mlp(pre_norm(h)))``
* Gemma RMSNorm ``x / rms(x) * (1 + w)`` computed in fp32
* attention: RoPE (half-split), query scale ``query_pre_attn_scalar ** -0.5``, logit
  softcapping ``tanh(s / cap) * cap``, padded keys masked after the softcap,
  grouped-query K/V shared by ``num_attention_heads // num_key_value_heads`` heads
* GeGLU MLP with the tanh approximation of GELU, then a final norm

Unlike the official MLX port, the embedding output stays in fp32 (the port casts it to
fp16, a ~1e-3 relative change), GQA is supported, and tokenization prepends ``<bos>``
by default like the PyTorch reference (``add_bos=False`` gives the port's raw ids).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import sentencepiece as spm

from .. import kernels
from ..weights import NpzWeights, WeightError, WeightView, count_indexed, load_strict, require, shape_of

# Byte blobs and buffers in the weight file that are not module parameters.
META_KEY = "META"
TOKENIZER_KEY = "TOKENIZER_MODEL"
ROPE_INV_FREQ_KEY = "rope_inv_freq"

# Added to the softcapped logits of padded keys. Finite (not -inf) so a row with
# every key masked cannot produce NaN; capped logits lie in [-cap, cap], far above it.
MASK_VALUE = -1e9


@dataclass
class T5GemmaConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    # Defaults are those of transformers' T5GemmaModuleConfig, except the query
    # scalar, which defaults to head_dim (plain 1/sqrt(d) attention) when absent.
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attn_logit_softcapping: float | None = 50.0
    query_pre_attn_scalar: float | None = None
    pad_token_id: int = 0

    def __post_init__(self):
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_weights(cls, weights: Mapping, file: str) -> "T5GemmaConfig":
        """Config from the file's ``META`` JSON; sizes it lacks come from tensor shapes."""
        meta = read_meta(weights, file)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in meta.items() if k in known}

        # Only sizes META lacks are read from tensor shapes (headers only).
        def dim(key: str, axis: int = 0) -> int:
            return require(weights, key, file)[axis]

        if "vocab_size" not in values:
            values["vocab_size"] = dim("embed_tokens.weight")
        if "hidden_size" not in values:
            values["hidden_size"] = dim("embed_tokens.weight", axis=1)
        if "num_hidden_layers" not in values:
            values["num_hidden_layers"] = count_indexed(weights, "layers.")
            if values["num_hidden_layers"] == 0:
                raise WeightError(f"{file}: no 'layers.N.*' tensors found")
        if "intermediate_size" not in values:
            values["intermediate_size"] = dim("layers.0.mlp.gate_proj.weight")
        # q_proj is [heads * head_dim, hidden]: either of the two gives the other.
        if "num_attention_heads" not in values or "head_dim" not in values:
            q_key = "layers.0.self_attn.q_proj.weight"
            if "num_attention_heads" in values:
                values["head_dim"] = dim(q_key) // values["num_attention_heads"]
            elif "head_dim" in values:
                values["num_attention_heads"] = dim(q_key) // values["head_dim"]
            else:
                raise WeightError(
                    f"{file}: META must give 'head_dim' or 'num_attention_heads' "
                    "(the q_proj width cannot be split without one of them)"
                )
        if "num_key_value_heads" not in values:
            k_width = dim("layers.0.self_attn.k_proj.weight")
            values["num_key_value_heads"] = k_width // values["head_dim"]
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise WeightError(f"{file}: inconsistent T5Gemma config ({e})") from None


def read_meta(weights: Mapping, file: str) -> dict:
    if META_KEY not in weights:
        raise WeightError(f"{file}: missing key '{META_KEY}' (the T5Gemma config JSON)")
    try:
        meta = json.loads(np.asarray(weights[META_KEY]).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{file}: '{META_KEY}' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise WeightError(f"{file}: '{META_KEY}' must be a JSON object")
    return meta


def default_rope_inv_freq(config: T5GemmaConfig) -> mx.array:
    exponents = mx.arange(0, config.head_dim, 2, dtype=mx.float32) / config.head_dim
    return 1.0 / (config.rope_theta**exponents)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: the weight is stored as an offset from 1, computed in fp32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps)


class Attention(nn.Module):
    def __init__(self, config: T5GemmaConfig, rope_periods: mx.array):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        # Leading underscore: a buffer, not a parameter (mx.fast.rope takes periods = 1/inv_freq).
        self._rope_periods = rope_periods

        hidden, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        kv_inner = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.v_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)

    def __call__(self, x: mx.array, key_bias: mx.array) -> mx.array:
        """``x`` [B, S, hidden]; ``key_bias`` [B, S]: 0 for real keys, MASK_VALUE for padding."""
        B, S, _ = x.shape
        groups = self.num_heads // self.num_kv_heads

        def heads(t: mx.array, n: int) -> mx.array:
            t = t.reshape(B, S, n, self.head_dim).transpose(0, 2, 1, 3)
            return mx.fast.rope(
                t, self.head_dim, traditional=False, base=None, scale=1.0, offset=0,
                freqs=self._rope_periods,
            )

        # Query heads are grouped as [kv_head, group]: head h uses kv head h // groups,
        # the same pairing as transformers' repeat_kv, with K/V broadcast instead of copied.
        q = heads(self.q_proj(x), self.num_heads).reshape(B, self.num_kv_heads, groups, S, -1)
        k = heads(self.k_proj(x), self.num_kv_heads)[:, :, None]
        v = self.v_proj(x).reshape(B, S, self.num_kv_heads, self.head_dim)
        v = v.transpose(0, 2, 1, 3)[:, :, None]

        # Softcapping acts on the logits before the mask and softmax, which SDPA cannot do.
        scores = (q @ k.swapaxes(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = kernels.active().tanh(scores / self.softcap) * self.softcap
        scores = scores + key_bias[:, None, None, None, :]
        weights = kernels.active().softmax(scores.astype(mx.float32), axis=-1)
        out = (weights.astype(v.dtype) @ v).reshape(B, self.num_heads, S, self.head_dim)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, S, -1))


class MLP(nn.Module):
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(kernels.active().gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: T5GemmaConfig, rope_periods: mx.array):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, rope_periods)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.pre_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def __call__(self, h: mx.array, key_bias: mx.array) -> mx.array:
        attn = self.self_attn(self.pre_self_attn_layernorm(h), key_bias)
        h = h + self.post_self_attn_layernorm(attn)
        ff = self.mlp(self.pre_feedforward_layernorm(h))
        return h + self.post_feedforward_layernorm(ff)


class T5GemmaEncoder(nn.Module):
    """Bidirectional T5Gemma encoder. Attribute names equal the weight-file keys."""

    def __init__(self, config: T5GemmaConfig, rope_inv_freq: mx.array | None = None):
        super().__init__()
        self.config = config
        if rope_inv_freq is None:
            rope_inv_freq = default_rope_inv_freq(config)
        rope_periods = 1.0 / rope_inv_freq.astype(mx.float32)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [EncoderLayer(config, rope_periods) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        """``input_ids``, ``attention_mask`` [B, S] (mask 1 = real token) -> [B, S, hidden] fp32.

        A row whose mask is all zero (an empty prompt tokenized without ``<bos>``) gets
        position 0 unmasked for the attention, as the official port does; otherwise
        every key would be masked and the softmax would be meaningless. Padded
        positions are still computed (they attend to the real tokens); callers decide
        what to do with them.
        """
        keep = mx.array(attention_mask) > 0
        empty_row = ~keep.any(axis=1, keepdims=True)
        first = mx.arange(keep.shape[1]) == 0
        keep = keep | (empty_row & first)
        key_bias = mx.where(keep, 0.0, MASK_VALUE).astype(mx.float32)

        # Gather in the table's dtype, then widen: the residual stream is always fp32.
        h = self.embed_tokens(mx.array(input_ids)).astype(mx.float32)
        h = h * mx.array(math.sqrt(self.config.hidden_size), dtype=mx.float32)
        for layer in self.layers:
            h = layer(h, key_bias)
        return self.norm(h)


class Tokenizer:
    """SentencePiece tokenizer with right padding to a fixed length."""

    def __init__(self, model_proto: bytes, pad_id: int):
        self.processor = spm.SentencePieceProcessor()
        self.processor.LoadFromSerializedProto(model_proto)
        self.pad_id = pad_id
        self.bos_id = self.processor.bos_id()

    def encode(
        self, prompts: list[str], max_length: int, add_bos: bool = True
    ) -> tuple[mx.array, mx.array]:
        """Token ids and mask (1 = real token), both int32 [len(prompts), max_length].

        ``add_bos=True`` prepends ``<bos>`` like the PyTorch reference (GemmaTokenizer);
        ``add_bos=False`` gives the official MLX port's raw ``Encode`` ids. Prompts
        longer than ``max_length`` are truncated at the end (``<bos>`` is kept).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of str, got {prompts!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if add_bos and self.bos_id < 0:
            raise ValueError("the SentencePiece model defines no <bos> token; use add_bos=False")

        ids = np.full((len(prompts), max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(prompts), max_length), dtype=np.int32)
        for row, prompt in enumerate(prompts):
            tokens = ([self.bos_id] if add_bos else []) + self.processor.Encode(prompt)
            tokens = tokens[:max_length]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return mx.array(ids), mx.array(mask)

    def count(self, text: str) -> int:
        """The number of content tokens (no ``<bos>``) of ``text``: prompt weighting's token offsets."""
        return len(self.processor.Encode(text))

    def special_tokens(self, add_bos: bool = True) -> tuple[int, int]:
        """The special tokens :meth:`encode` puts before and after a prompt's own tokens."""
        return (1 if add_bos else 0), 0

    def pieces(self, prompt: str) -> list[str]:
        """The SentencePiece pieces of one prompt (no ``<bos>``), for inspection."""
        return self.processor.EncodeAsPieces(prompt)


def sanitize(weights: Mapping) -> Mapping:
    """File keys -> module parameters: the names already match; drop the blobs and buffers."""
    blobs = {META_KEY, TOKENIZER_KEY, ROPE_INV_FREQ_KEY}
    return WeightView(weights, [k for k in weights if k not in blobs])


def load_t5gemma(
    weights: Mapping | str | Path, dtype: mx.Dtype = mx.float32
) -> tuple[T5GemmaEncoder, Tokenizer, T5GemmaConfig]:
    """Encoder, tokenizer and config from an official-format T5Gemma weight file.

    Every parameter must be present with its shape and every key must be used;
    ``META`` and ``TOKENIZER_MODEL`` are required, ``rope_inv_freq`` is optional.
    Weights are cast to ``dtype`` except the embedding table, which keeps its stored
    dtype (it is gathered, then widened to fp32, so no second full-size copy exists).
    """
    if isinstance(weights, (str, Path)):
        weights = NpzWeights(weights)
    file = getattr(weights, "name", "<memory>")

    config = T5GemmaConfig.from_weights(weights, file)
    if TOKENIZER_KEY not in weights:
        raise WeightError(f"{file}: missing key '{TOKENIZER_KEY}' (the SentencePiece model)")
    try:
        tokenizer = Tokenizer(np.asarray(weights[TOKENIZER_KEY]).tobytes(), config.pad_token_id)
    except RuntimeError as e:
        raise WeightError(f"{file}: '{TOKENIZER_KEY}' is not a SentencePiece model ({e})") from None

    rope_inv_freq = None
    if ROPE_INV_FREQ_KEY in weights:
        expected = (config.head_dim // 2,)
        found = tuple(shape_of(weights, ROPE_INV_FREQ_KEY))
        if found != expected:
            raise WeightError(
                f"{file}: key '{ROPE_INV_FREQ_KEY}' has shape {list(found)}, expected {list(expected)}"
            )
        rope_inv_freq = mx.array(np.asarray(weights[ROPE_INV_FREQ_KEY], dtype=np.float32))

    encoder = T5GemmaEncoder(config, rope_inv_freq)
    load_strict(encoder, sanitize(weights), file, dtype=dtype, keep_dtype=("embed_tokens.weight",))
    encoder.eval()
    return encoder, tokenizer, config
