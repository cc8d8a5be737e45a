"""The training objective of upstream ``DiffusionCondTrainingWrapper`` (rectified flow).

Everything random is drawn by the caller (:mod:`sa3_mlx.training.batches`) and passed in,
so a step is a pure function of its draws (the golden data replaces each upstream draw
by a stored array the same way):

* timestep samplers applied to uniform / normal draws (:func:`sample_timesteps`) and the
  model's training distribution shift per item (:func:`training_shift`), from the
  item's effective length ``ceil(int(seconds * sample_rate) / downsampling)``;
* silence extension of the valid length, inpaint masks (1 = provided/keep), OT coupling;
* ``noised = x0 (1 - t) + noise t``, ``target = noise - x0``;
* the masked MSE: per item over ``loss_mask = valid and not inpaint``, averaged over the
  batch, plus ``mask_loss_weight`` times the same over the context (``inpaint and valid``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from ..settings import SHIFT_DEFAULTS

TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "trunc_logit_normal", "log_snr", "log_snr_uniform")
TRUNC_LOGIT_LOW = 0.075
# Inpaint mask types of train_lora.py, with its probabilities.
RANDOM_SEGMENTS, FULL_MASK, CAUSAL = 0, 1, 2
INPAINT_PROBS = (0.1, 0.8, 0.1)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _phi(x):
    from math import erf
    return 0.5 * (1.0 + np.vectorize(erf)(np.asarray(x, np.float64) / math.sqrt(2.0)))


def _phi_inv(p):
    from statistics import NormalDist
    nd = NormalDist()
    return np.vectorize(nd.inv_cdf)(np.asarray(p, np.float64))


def trunc_logit_normal_raw(z: np.ndarray, low: float = TRUNC_LOGIT_LOW) -> np.ndarray:
    """``R(z) = (sigmoid(Phi^-1(l + (1 - l) Phi(z))) - low) / (1 - low)``, ``l = Phi(logit low)``."""
    ell = _phi(math.log(low / (1 - low)))
    return (_sigmoid(_phi_inv(ell + (1 - ell) * _phi(z))) - low) / (1 - low)


def sample_timesteps(kind: str, uniform: np.ndarray | None = None, normal: np.ndarray | None = None) -> np.ndarray:
    """Upstream's training timestep samplers on given draws (before the distribution shift)."""
    if kind == "uniform":
        return np.asarray(uniform, np.float64)
    if kind == "logit_normal":
        return _sigmoid(np.asarray(normal, np.float64))
    if kind == "trunc_logit_normal":
        return 1.0 - trunc_logit_normal_raw(normal)  # the wrapper flips the value
    if kind == "log_snr":
        return np.clip(_sigmoid(-(2.0 * np.asarray(normal, np.float64) - 1.2)), 1e-4, 1 - 1e-4)
    if kind == "log_snr_uniform":
        return np.clip(_sigmoid(-(11.0 * np.asarray(uniform, np.float64) - 6.0)), 1e-4, 1 - 1e-4)
    raise ValueError(f"unknown timestep sampler {kind!r} (expected one of {', '.join(TIMESTEP_SAMPLERS)})")


def needs_normal(kind: str) -> bool:
    return kind in ("logit_normal", "trunc_logit_normal", "log_snr")


def effective_lengths(seconds: np.ndarray, sample_rate: int = 44100, downsampling: int = 4096) -> np.ndarray:
    """``ceil(int(seconds * rate) / downsampling)`` per item (upstream ``use_effective_length_for_schedule``)."""
    samples = np.array([int(s * sample_rate) for s in np.asarray(seconds, np.float64)], np.int64)
    return -(-samples // downsampling)


def training_shift(t: np.ndarray, lengths: np.ndarray, shift: Mapping | None) -> np.ndarray:
    """The model's training ``DistributionShift`` per item: ``t / (t + e^mu (1 - t))`` ("full"),
    ``mu = -(base + (max - base) (clamp(L) - min) / (max_len - min))``; None or "none": unchanged."""
    t = np.asarray(t, np.float64)
    if not shift or shift.get("type", "full") == "none":
        return t
    kind = shift.get("type", "full")
    if kind != "full":
        from ..sampling import shift_grid
        return np.array([shift_grid(np.array([ti]), dict(shift), int(n))[0] for ti, n in zip(t, lengths)])
    o = {**SHIFT_DEFAULTS["full"], **{k: v for k, v in shift.items() if k != "type"}}
    length = np.clip(np.asarray(lengths, np.float64), o["min_length"], o["max_length"])
    mu = -(o["base_shift"] + (o["max_shift"] - o["base_shift"]) * (length - o["min_length"])
           / (o["max_length"] - o["min_length"]))
    out = t / (t + np.exp(mu) * (1.0 - t))
    return np.sin(out * math.pi / 2) if o.get("use_sine") else out


def silence_extension(valid: np.ndarray, draws: np.ndarray, length: int) -> np.ndarray:
    """Valid lengths after the silence extension: ``min(valid + floor(draw), T)``."""
    return np.minimum(np.asarray(valid, np.int64) + np.floor(np.asarray(draws)).astype(np.int64), length)


def inpaint_mask(kind: int, length: int, valid: int, prefix: int = 0,
                 segments: list[tuple[int, int]] | None = None) -> np.ndarray:
    """One item's inpaint mask [T] (1 = provided): FULL_MASK all 0; CAUSAL keeps ``[0, prefix)``;
    RANDOM_SEGMENTS all 1 except the given ``(start, end)`` segments. Non-full masks are 0 at or
    beyond the valid length (upstream ``mask_padding``)."""
    mask = np.zeros(length, np.float32)
    if kind == FULL_MASK:
        return mask
    if kind == CAUSAL:
        mask[:prefix] = 1
    else:
        mask[:] = 1
        for a, b in segments or ():
            mask[a:b] = 0
    mask[valid:] = 0
    return mask


def draw_inpaint_mask(rng: np.random.Generator, length: int, valid: int,
                      probs: tuple[float, float, float] = INPAINT_PROBS) -> np.ndarray:
    """A random inpaint mask as train_lora.py draws them (type by ``probs``)."""
    kind = int(rng.choice(3, p=np.asarray(probs) / np.sum(probs)))
    if kind == CAUSAL:
        return inpaint_mask(kind, length, valid, prefix=int(rng.integers(0, valid + 1)))
    if kind == RANDOM_SEGMENTS:
        segments = []
        for _ in range(int(rng.integers(1, 11))):
            a = int(rng.integers(0, max(valid, 1)))
            segments.append((a, a + int(rng.integers(1, max(valid // 4, 1) + 1))))
        return inpaint_mask(kind, length, valid, segments=segments)
    return inpaint_mask(kind, length, valid)


def ot_coupling(x0: np.ndarray, noise: np.ndarray, rounds: int = 20) -> np.ndarray:
    """Minibatch OT pairing: Sinkhorn on ``-C / mean(C)`` then a greedy assignment; the permutation of the noise."""
    b = x0.shape[0]
    if b < 2:
        return np.arange(b)
    x = x0.reshape(b, -1).astype(np.float64)
    n = noise.reshape(b, -1).astype(np.float64)
    cost = (x * x).sum(1)[:, None] + (n * n).sum(1)[None, :] - 2 * x @ n.T
    logp = -cost / cost.mean()
    for _ in range(rounds):
        logp = logp - _logsumexp(logp, 1)
        logp = logp - _logsumexp(logp, 0)
    p = np.exp(logp)
    perm, used = np.zeros(b, np.int64), set()
    for i in range(b):
        order = np.argsort(-p[i], kind="stable")
        j = next(int(j) for j in order if int(j) not in used)
        perm[i] = j
        used.add(j)
    return perm


def _logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))


def noised_and_target(x0: mx.array, noise: mx.array, t: mx.array) -> tuple[mx.array, mx.array]:
    tt = t.astype(mx.float32)[:, None, None]
    return x0 * (1 - tt) + noise * tt, noise - x0


def masked_mse(v: mx.array, target: mx.array, mask: mx.array) -> mx.array:
    """``mean_b[ sum_{c,t} mask (v - target)^2 / (C sum_t mask + 1e-8) ]`` (``mask`` [B, T])."""
    channels = v.shape[1]
    err = mx.sum(mx.square(v - target) * mask[:, None, :], axis=(1, 2))
    return mx.mean(err / (channels * mx.sum(mask, axis=1) + 1e-8))


def loss_masks(attn_padding_mask: mx.array, inpaint: mx.array) -> tuple[mx.array, mx.array]:
    """``(signal, context)`` masks [B, T] from the padding mask and the inpaint mask [B, T]."""
    return attn_padding_mask * (1 - inpaint), attn_padding_mask * inpaint
