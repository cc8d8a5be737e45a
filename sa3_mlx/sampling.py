"""Noise schedules, the pingpong sampler and classifier-free guidance (CFG / APG).

The distilled Stable Audio 3 models are ``rf_denoiser`` rectified-flow models: the
DiT predicts a velocity ``v`` with ``x_t = (1 - t) * x_0 + t * noise``, so
``denoised = x_t - t * v``. Pingpong sampling alternates "denoise fully" and
"re-noise to the next level" with fresh noise, which is what the models were
distilled for (8 steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import math

import mlx.core as mx
import numpy as np

from .settings import SAMPLERS as SAMPLER_NAMES

# The default LogSNR shift (rate 0, so independent of sequence length), as used
# upstream when a model config has no `sampling_distribution_shift_options`.
LOGSNR_ANCHOR = -6.2
LOGSNR_END = 2.0


def logsnr_shift(t: mx.array, anchor: float = LOGSNR_ANCHOR, end: float = LOGSNR_END) -> mx.array:
    """Warp a normalised grid ``t`` in [0, 1] through log-SNR space; 0 and 1 stay fixed."""
    t = t.astype(mx.float32)
    logsnr = end - t * (end - anchor)
    shifted = mx.sigmoid(-logsnr)
    shifted = mx.where(t <= 0, 0.0, shifted)
    return mx.where(t >= 1, 1.0, shifted)


def pingpong_schedule(steps: int, sigma_max: float = 1.0) -> mx.array:
    """``steps + 1`` noise levels from ``sigma_max`` down to 0 (float32).

    A linear 1 -> 0 grid is warped by the LogSNR shift, then scaled by
    ``sigma_max``; the first value is pinned to ``sigma_max`` exactly so it matches
    the audio-to-audio mix ``init * (1 - s) + noise * s``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    grid = mx.linspace(1.0, 0.0, steps + 1, dtype=mx.float32)
    sigmas = logsnr_shift(grid) * sigma_max
    return mx.concatenate([mx.array([sigma_max], dtype=mx.float32), sigmas[1:]])


# Upstream's distribution shifts (``sampling_distribution_shift_options``): type -> keyword defaults.
SHIFT_DEFAULTS = {
    "none": {},
    "logsnr": {"anchor_length": 2000, "anchor_logsnr": LOGSNR_ANCHOR, "rate": 1.0, "logsnr_end": LOGSNR_END},
    "flux": {"min_length": 256, "max_length": 4096, "alpha_min": 1.0, "alpha_max": 1.0},
    "full": {"base_shift": 0.5, "max_shift": 1.15, "max_length": 4096, "min_length": 256, "use_sine": False},
}


def shift_grid(t: np.ndarray, shift: dict, seq_len: int) -> np.ndarray:
    """Upstream ``LogSNRShift`` / ``FluxDistributionShift`` / ``DistributionShift`` of a grid
    ``t`` in [0, 1] for a sequence of ``seq_len`` latents (float64)."""
    kind = shift.get("type", "full")
    if kind not in SHIFT_DEFAULTS:
        raise ValueError(f"unsupported distribution shift type {kind!r} (expected one of {', '.join(SHIFT_DEFAULTS)})")
    o = {**SHIFT_DEFAULTS[kind], **{k: v for k, v in shift.items() if k != "type"}}
    seq_len = max(int(seq_len), 1)
    if kind == "none":
        return t
    if kind == "logsnr":
        start = o["anchor_logsnr"] - o["rate"] * math.log2(seq_len / o["anchor_length"])
        out = 1.0 / (1.0 + np.exp(o["logsnr_end"] - t * (o["logsnr_end"] - start)))  # sigmoid(-logsnr)
        return np.where(t <= 0, 0.0, np.where(t >= 1, 1.0, out))
    if kind == "flux":
        length = min(max(seq_len, o["min_length"]), o["max_length"])
        log_min, log_max = math.log(o["min_length"]), math.log(o["max_length"])
        frac = (math.log(length) - log_min) / ((log_max - log_min) or 1e-8)
        log_a_min, log_a_max = math.log(max(o["alpha_min"], 1e-8)), math.log(max(o["alpha_max"], 1e-8))
        alpha = math.exp(log_a_min + frac * (log_a_max - log_a_min))
        return alpha * t / (1 + (alpha - 1.0) * t)
    length = min(max(seq_len, o["min_length"]), o["max_length"])
    mu = -(o["base_shift"] + (o["max_shift"] - o["base_shift"]) * (length - o["min_length"])
           / (o["max_length"] - o["min_length"]))
    with np.errstate(divide="ignore"):
        odds = np.where(t >= 1, np.inf, 1.0 / (1.0 - np.minimum(t, 1.0)) - 1.0)
    out = 1.0 - math.exp(mu) / (math.exp(mu) + odds)
    return np.sin(out * math.pi / 2) if o["use_sine"] else out


def build_schedule(
    steps: int, sigma_max: float = 1.0, shift: dict | None = None, seq_len: int | None = None
) -> mx.array:
    """Upstream ``build_schedule`` for a model config's ``sampling_distribution_shift_options``.

    None: the default LogSNR shift, rate 0 (:func:`pingpong_schedule`, independent of the
    length). Otherwise ``{"type": "none" | "logsnr" | "flux" | "full", **kwargs}`` with
    upstream's keyword names; the length-dependent ones use ``seq_len``, the effective
    latent length ``ceil(int(seconds * sr) / 4096)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if shift is None:
        return pingpong_schedule(steps, sigma_max)
    if seq_len is None:
        raise ValueError("a distribution shift needs the sequence length")
    grid = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32).astype(np.float64)
    sigmas = (shift_grid(grid, shift, seq_len) * sigma_max).astype(np.float32)
    sigmas[0] = sigma_max
    return mx.array(sigmas)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings.

    ``scale`` 1.0 means off (one forward, no unconditional branch). ``apg`` blends
    vanilla CFG (0) with adaptive projected guidance (1), which drops the part of
    the guidance direction parallel to the conditional prediction and so avoids
    over-saturation at high scales. ``interval`` restricts guidance to noise levels
    inside it, as upstream does (inclusive; the default covers every level up to 1).
    """

    scale: float = 1.0
    apg: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def active_at(self, sigma: float) -> bool:
        lo, hi = self.interval
        return self.enabled and lo <= sigma <= hi


def apply_guidance(
    x: mx.array, sigma: mx.array, cond_v: mx.array, uncond_v: mx.array, guidance: Guidance,
    padding_mask: mx.array | None = None,
) -> mx.array:
    """Combine conditional and unconditional velocities into the guided velocity.

    Done in denoised space and in float32: the APG projection subtracts nearly
    equal quantities, which cancels badly in half precision. With a
    ``padding_mask`` [B|1, T] (1 = valid latent, upstream ``generate()`` with headroom)
    the projection uses the valid positions only and the projected guidance is zero
    on the padded ones, as upstream's ``apg_project``.
    """
    dtype = cond_v.dtype
    x = x.astype(mx.float32)
    s = sigma.astype(mx.float32).reshape(-1, 1, 1)
    cond_d = x - cond_v.astype(mx.float32) * s
    uncond_d = x - uncond_v.astype(mx.float32) * s
    diff = cond_d - uncond_d
    if guidance.apg > 0.0:
        if padding_mask is None:
            reference, eps = cond_d, 1e-12  # F.normalize
        else:
            mask = padding_mask.astype(mx.float32)[:, None, :]
            reference, eps = cond_d * mask, 1e-8  # upstream's masked branch clamps at 1e-8
        norm = mx.sqrt(mx.sum(reference * reference, axis=(1, 2), keepdims=True))
        unit = reference / mx.maximum(norm, eps)
        orthogonal = diff - mx.sum(diff * unit, axis=(1, 2), keepdims=True) * unit
        if padding_mask is not None:
            orthogonal = orthogonal * mask
        diff = guidance.apg * orthogonal + (1.0 - guidance.apg) * diff
    guided = cond_d + (guidance.scale - 1.0) * diff
    return ((x - guided) / s).astype(dtype)


def seeded_step_noise(seed: int) -> Callable[[int, tuple[int, ...], mx.Dtype], mx.array]:
    """Re-noise draws for the pingpong steps: step i uses the i-th split of key(seed).

    This is the official MLX runner's scheme (initial noise from ``key(seed)``,
    step noise from ``key(seed + 1)`` split once per step), so a seed gives the
    same noise as there.
    """
    state = {"key": mx.random.key(seed), "next": 0}

    def draw(step: int, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
        if step != state["next"]:
            raise ValueError(f"step noise must be drawn in order (expected step {state['next']}, got {step})")
        state["key"], sub = mx.random.split(state["key"])
        state["next"] += 1
        return mx.random.normal(shape, dtype=dtype, key=sub)

    return draw


Velocity = Callable[[mx.array, mx.array, float], mx.array]
"""``velocity(x, t, level)``: the (guided) model velocity at noise levels ``t`` [B]; ``level`` is
the same noise level as a Python float, for decisions that must not wait for the device."""


def _one_step_ahead(states: Iterator[mx.array]) -> Iterator[mx.array]:
    """Evaluate each state, yielding it only once the next one is queued (``mx.async_eval``).

    The device then starts the next step while the caller reports progress, instead of
    idling between steps; every yielded array is fully evaluated.
    """
    pending = None
    for x in states:
        mx.async_eval(x)
        if pending is not None:
            mx.eval(pending)
            yield pending
        pending = x
    if pending is not None:
        mx.eval(pending)
        yield pending


def sample_pingpong(
    velocity: Velocity,
    x: mx.array,
    sigmas: mx.array,
    step_noise: Callable[[int, tuple[int, ...], mx.Dtype], mx.array],
) -> Iterator[mx.array]:
    """Run the pingpong sampler, yielding ``x`` after every step (the last is the result).

    ``step_noise(i, shape, dtype)`` supplies the re-noise after step ``i``; it is not
    called after the final step, whose next level is 0.
    """
    levels = [float(s) for s in sigmas.tolist()]
    steps = len(levels) - 1

    def states() -> Iterator[mx.array]:
        nonlocal x
        for i in range(steps):
            t_curr, t_next = levels[i], levels[i + 1]
            t = mx.full((x.shape[0],), t_curr, dtype=mx.float32)
            denoised = x - mx.array(t_curr, dtype=x.dtype) * velocity(x, t, t_curr)
            if i < steps - 1 and t_next > 0.0:
                noise = step_noise(i, x.shape, x.dtype)
                x = mx.array(1.0 - t_next, dtype=x.dtype) * denoised + mx.array(t_next, dtype=x.dtype) * noise
            else:
                x = denoised
            yield x

    return _one_step_ahead(states())


def sample_euler(
    velocity: Velocity,
    x: mx.array,
    sigmas: mx.array,
    step_noise: Callable[[int, tuple[int, ...], mx.Dtype], mx.array] | None = None,
) -> Iterator[mx.array]:
    """Euler steps of the flow ODE, ``x += (t_next - t) * v``, yielding ``x`` after each step.

    The sampler of the undistilled ``rectified_flow`` (base) models; deterministic, so
    ``step_noise`` is accepted for a uniform signature and never called.
    """
    levels = [float(s) for s in sigmas.tolist()]

    def states() -> Iterator[mx.array]:
        nonlocal x
        for t_curr, t_next in zip(levels[:-1], levels[1:]):
            t = mx.full((x.shape[0],), t_curr, dtype=mx.float32)
            x = x + mx.array(t_next - t_curr, dtype=x.dtype) * velocity(x, t, t_curr)
            yield x

    return _one_step_ahead(states())


# Keyed by the names the settings table offers (sa3_mlx.settings.SAMPLERS, which must not import MLX).
SAMPLERS = dict(zip(SAMPLER_NAMES, (sample_pingpong, sample_euler), strict=True))


def paste_back(latents: mx.array, init_latents: mx.array, keep_mask: mx.array) -> mx.array:
    """Put the kept latents back exactly (``keep_mask`` 1 = keep, broadcast over channels).

    ``mx.where`` rather than a blend, so kept positions are bit-identical to the init.
    """
    return mx.where(keep_mask.astype(mx.bool_), init_latents.astype(latents.dtype), latents)
