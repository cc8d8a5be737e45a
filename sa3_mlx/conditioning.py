"""From prompt embeddings and a duration to the DiT's conditioning inputs.

Stable Audio 3 conditions the DiT on two things (upstream `cross_attention_cond_ids`
= ["prompt", "seconds_total"], `global_cond_ids` = ["seconds_total"]):

* cross-attention tokens: the T5Gemma prompt embeddings (pad positions replaced by
  a learned padding embedding), followed by one "seconds_total" token;
* a global vector: the same seconds embedding.

The learned padding embedding and the seconds embedder are stored in each DiT file
under ``cond.*``; they are loaded here, strictly, into :class:`Conditioner`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

import numpy as np

from . import prompt_weights
from .models.dit import COND_PREFIX
from .models.layers import expo_fourier_frequencies, fourier_features
from .settings import MAX_SECONDS
from .weights import WeightDict, WeightError, load_strict, shape_of


@dataclass(frozen=True)
class ConditionerConfig:
    cond_dim: int
    seconds_features: int
    # NumberConditioner range of the released models (upstream model_config: 0..384 s).
    seconds_min: float = 0.0
    seconds_max: float = MAX_SECONDS

    @classmethod
    def from_weights(
        cls, weights: Mapping, file: str, seconds_range: tuple[float, float] = (0.0, MAX_SECONDS)
    ) -> "ConditionerConfig":
        key = "seconds_total_weight"
        if key not in weights:
            raise WeightError(f"{file}: missing key '{COND_PREFIX}{key}'")
        cond_dim, features = (int(s) for s in shape_of(weights, key))
        return cls(cond_dim=cond_dim, seconds_features=features,
                   seconds_min=float(seconds_range[0]), seconds_max=float(seconds_range[1]))


class Conditioner(nn.Module):
    """The ``cond.*`` tensors of a DiT file: padding embedding and seconds embedder."""

    def __init__(self, config: ConditionerConfig):
        super().__init__()
        self.config = config
        self.padding_embedding = mx.zeros((config.cond_dim,))
        self.seconds_total_weight = mx.zeros((config.cond_dim, config.seconds_features))
        self.seconds_total_bias = mx.zeros((config.cond_dim,))
        self._freqs = expo_fourier_frequencies(config.seconds_features)

    def seconds_embedding(self, seconds: Sequence[float]) -> mx.array:
        """``[B] seconds -> [B, 1, cond_dim]``: clamp to the trained range, normalise, embed."""
        c = self.config
        s = mx.clip(mx.array(list(seconds), dtype=mx.float32), c.seconds_min, c.seconds_max)
        features = fourier_features((s - c.seconds_min) / (c.seconds_max - c.seconds_min), self._freqs)
        out = features @ self.seconds_total_weight.T + self.seconds_total_bias
        return out[:, None, :]

    def pad_prompt(self, embeds: mx.array, mask: mx.array, mode: str = "learned") -> mx.array:
        """Replace padded positions (mask 0) by the learned embedding, or by zeros.

        Upstream pads the positive prompt with the learned embedding and zeroes the
        negative prompt's pad positions (its `negative_cross_attn_mask`).
        """
        keep = mask.astype(mx.bool_)[..., None]
        if mode == "learned":
            fill = self.padding_embedding.astype(embeds.dtype)
        elif mode == "zeros":
            fill = mx.zeros((embeds.shape[-1],), dtype=embeds.dtype)
        else:
            raise ValueError(f"unknown padding mode {mode!r} (expected 'learned' or 'zeros')")
        return mx.where(keep, embeds, fill)

    def weigh(self, embeds: mx.array, weights: mx.array | None) -> mx.array:
        """Prompt weighting (:mod:`sa3_mlx.prompt_weights`): each token of weight ``w != 1`` becomes
        ``p + w * (e - p)``, ``p`` the learned padding ("empty") embedding; the others keep their bits."""
        if weights is None:
            return embeds
        p = self.padding_embedding.astype(embeds.dtype)
        w = weights.astype(embeds.dtype)[..., None]
        return mx.where(weights[..., None] != 1, p + w * (embeds - p), embeds)

    def build(
        self, embeds: mx.array, mask: mx.array, seconds: Sequence[float], padding: str = "learned",
        weights: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """``(cross_attn_cond [B, S+1, C], global_cond [B, C])`` for prompt embeddings and durations
        (``weights [B, S]``: prompt weighting's per-token weights, None = none)."""
        embeds = self.weigh(embeds, weights)
        seconds_token = self.seconds_embedding(seconds).astype(embeds.dtype)
        cross = mx.concatenate([self.pad_prompt(embeds, mask, padding), seconds_token], axis=1)
        return cross, seconds_token[:, 0, :]


def load_conditioner(
    cond_weights: Mapping, file: str, seconds_range: tuple[float, float] = (0.0, MAX_SECONDS)
) -> Conditioner:
    """Strictly load the ``cond.*`` tensors (keys given without the prefix), in float32.

    ``seconds_range`` is the NumberConditioner's ``(min_val, max_val)`` (the official
    files do not store it; the released models use 0..384 s).
    """
    weights = WeightDict(cond_weights, name=file)
    conditioner = Conditioner(ConditionerConfig.from_weights(weights, file, seconds_range))
    # Report keys with their full file name so errors point at the real key.
    try:
        load_strict(conditioner, weights, file, dtype=mx.float32)
    except WeightError as e:
        raise WeightError(str(e).replace("key '", f"key '{COND_PREFIX}")) from None
    return conditioner


class PromptEncoder:
    """T5Gemma and its tokenizer at a fixed sequence length: prompts -> embeddings and mask."""

    def __init__(self, encoder, tokenizer, max_length: int):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def width(self) -> int:
        return self.encoder.config.hidden_size

    def encode(self, prompts: Sequence[str]) -> tuple[mx.array, mx.array]:
        """Embeddings ``[B, S, C]`` (zero past the longest prompt) and their mask ``[B, S]`` (S = max_length).
        Weighted prompts are encoded without their ``(phrase:W)`` syntax; :meth:`encode_weighted` also
        gives the weights."""
        embeds, mask, _ = self.encode_weighted(prompts)
        return embeds, mask

    def encode_weighted(self, prompts: Sequence[str]) -> tuple[mx.array, mx.array, mx.array | None]:
        """:meth:`encode` and the per-token weights ``[B, S]`` of the prompts' ``(phrase:W)`` groups
        (None when no prompt has a weight other than 1: the embeddings are then those of the plain text)."""
        parsed = [prompt_weights.parse(p) for p in prompts]
        embeds, mask = self._encode([p.text for p in parsed])
        if not any(p.weighted for p in parsed):
            return embeds, mask, None
        return embeds, mask, mx.array(self._token_weights(parsed, np.asarray(mask)))

    def _token_weights(self, parsed, mask: np.ndarray) -> np.ndarray:
        """Per position weights: a prompt's k-th own token is its (head + k)-th real token (after the
        special tokens the tokenizer puts first), wherever the padding puts the real tokens."""
        weights = np.ones(mask.shape, dtype=np.float32)
        head, tail = self.tokenizer.special_tokens()
        for row, p in enumerate(parsed):
            real = np.nonzero(mask[row])[0]
            kept = max(0, len(real) - head - tail)  # the prompt's own tokens left after truncation
            for start, end, weight in prompt_weights.token_spans(p.text, p.spans, self.tokenizer.count):
                start, end = min(start, kept), min(end, kept)
                weights[row, real[head + start:head + end]] = weight
        return weights

    def _encode(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        ids, mask = (np.asarray(a) for a in self.tokenizer.encode(list(prompts), max_length=self.max_length))
        # Padding is on the right and masked out of every real token's attention, and
        # the conditioner replaces the pad positions' outputs; so encoding only up to
        # the longest prompt gives the same embeddings (a short prompt: ~10x faster).
        used = max(1, int(mask.sum(axis=1).max()))
        embeds = self.encoder(mx.array(ids[:, :used]), mx.array(mask[:, :used]))
        if used < ids.shape[1]:
            embeds = mx.pad(embeds, [(0, 0), (0, ids.shape[1] - used), (0, 0)])
        return embeds, mx.array(mask)
