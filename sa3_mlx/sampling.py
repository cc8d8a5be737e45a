"""Noise schedules, the samplers and classifier-free guidance (CFG / APG, rescale, norm threshold).

Both kinds of Stable Audio 3 models are rectified-flow models: the DiT predicts a
velocity ``v`` with ``x_t = (1 - t) * x_0 + t * noise``, so ``denoised = x_t - t * v``.
The distilled ``rf_denoiser`` models are sampled with pingpong, which alternates
"denoise fully" and "re-noise to the next level" with fresh noise (what they were
distilled for, 8 steps); the undistilled ``rectified_flow`` (-base) models integrate
the flow ODE: Euler, classic 4th-order Runge-Kutta, or the second-order multistep
DPM-Solver++ written for flows (upstream ``inference/sampling.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import math

import mlx.core as mx
import numpy as np

from .settings import SAMPLERS as SAMPLER_NAMES
from .settings import SHIFT_DEFAULTS

# The default LogSNR shift (rate 0, so independent of sequence length), as used
# upstream when a model config has no `sampling_distribution_shift_options`.
LOGSNR_ANCHOR = SHIFT_DEFAULTS["logsnr"]["anchor_logsnr"]
LOGSNR_END = SHIFT_DEFAULTS["logsnr"]["logsnr_end"]


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
    """Classifier-free guidance settings (upstream ``DiTWrapper.forward``'s).

    ``scale`` 1.0 means off (one forward, no unconditional branch). ``apg`` blends
    vanilla CFG (0) with adaptive projected guidance (1), which drops the part of
    the guidance direction parallel to the conditional prediction and so avoids
    over-saturation at high scales. ``norm_threshold`` > 0 first caps the L2 norm of
    each item's guidance direction at that value; ``rescale`` (upstream ``scale_phi``)
    then pulls the guided velocity's per-position spread over the channels back
    towards the conditional one's. ``interval`` restricts guidance to noise levels
    inside it, as upstream does (inclusive; the default covers every level up to 1).
    """

    scale: float = 1.0
    apg: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    rescale: float = 0.0
    norm_threshold: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def active_at(self, sigma: float) -> bool:
        lo, hi = self.interval
        return self.enabled and lo <= sigma <= hi


def _l2(a: mx.array) -> mx.array:
    """The L2 norm of each item over channels and time, [B, 1, 1]."""
    return mx.sqrt(mx.sum(a * a, axis=(1, 2), keepdims=True))


def apply_guidance(
    x: mx.array, sigma: mx.array, cond_v: mx.array, uncond_v: mx.array, guidance: Guidance,
    padding_mask: mx.array | None = None,
) -> mx.array:
    """Combine conditional and unconditional velocities into the guided velocity.

    Upstream's order: the guidance direction ``cond_denoised - uncond_denoised`` is
    capped at ``norm_threshold`` (its norm over the valid positions), projected (APG),
    added ``scale - 1`` times to the conditional denoised estimate, turned back into a
    velocity, and then rescaled. Done in float32: the APG projection subtracts nearly
    equal quantities, which cancels badly in half precision. With a ``padding_mask``
    [B|1, T] (1 = valid latent, upstream ``generate()`` with headroom) the norms and the
    projection use the valid positions only and the projected guidance is zero on the
    padded ones, as upstream's ``apg_project``.
    """
    dtype = cond_v.dtype
    x = x.astype(mx.float32)
    s = sigma.astype(mx.float32).reshape(-1, 1, 1)
    cond_v = cond_v.astype(mx.float32)
    cond_d = x - cond_v * s
    uncond_d = x - uncond_v.astype(mx.float32) * s
    diff = cond_d - uncond_d
    mask = None if padding_mask is None else padding_mask.astype(mx.float32)[:, None, :]
    if guidance.norm_threshold > 0.0:
        norm = _l2(diff if mask is None else diff * mask)
        diff = diff * mx.minimum(1.0, guidance.norm_threshold / norm)  # a zero norm gives inf -> 1
    if guidance.apg > 0.0:
        if mask is None:
            reference, eps = cond_d, 1e-12  # F.normalize
        else:
            reference, eps = cond_d * mask, 1e-8  # upstream's masked branch clamps at 1e-8
        unit = reference / mx.maximum(_l2(reference), eps)
        orthogonal = diff - mx.sum(diff * unit, axis=(1, 2), keepdims=True) * unit
        if mask is not None:
            orthogonal = orthogonal * mask
        diff = guidance.apg * orthogonal + (1.0 - guidance.apg) * diff
    guided = cond_d + (guidance.scale - 1.0) * diff
    v = (x - guided) / s
    if guidance.rescale != 0.0:
        # torch.std: unbiased, over the channels at each (item, time). A guided velocity with no
        # spread at some position (never seen in practice) keeps its value there instead of 0/0.
        ratio = mx.std(cond_v, axis=1, keepdims=True, ddof=1) / mx.std(v, axis=1, keepdims=True, ddof=1)
        ratio = mx.where(mx.isfinite(ratio), ratio, 1.0)
        v = guidance.rescale * (v * ratio) + (1.0 - guidance.rescale) * v
    return v.astype(dtype)


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

StepNoise = Callable[[int, tuple[int, ...], mx.Dtype], mx.array]
"""``step_noise(i, shape, dtype)``: the fresh noise of step ``i`` (pingpong's re-noising)."""


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
    step_noise: StepNoise,
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


def _scalar(value: float, like: mx.array) -> mx.array:
    return mx.array(value, dtype=like.dtype)


def _levels(x: mx.array, level: float) -> mx.array:
    """Noise level ``level`` for every item, [B] float32 (the DiT keeps t in float32)."""
    return mx.full((x.shape[0],), level, dtype=mx.float32)


def sample_euler(
    velocity: Velocity, x: mx.array, sigmas: mx.array, step_noise: StepNoise | None = None
) -> Iterator[mx.array]:
    """Euler steps of the flow ODE, ``x += (t_next - t) * v``, yielding ``x`` after each step.

    The default sampler of the undistilled ``rectified_flow`` (base) models; deterministic,
    so ``step_noise`` is accepted for a uniform signature and never called.
    """
    levels = [float(s) for s in sigmas.tolist()]

    def states() -> Iterator[mx.array]:
        nonlocal x
        for t_curr, t_next in zip(levels[:-1], levels[1:]):
            x = x + _scalar(t_next - t_curr, x) * velocity(x, _levels(x, t_curr), t_curr)
            yield x

    return _one_step_ahead(states())


RK4_MIN_LEVEL = 1e-5  # upstream evaluates the last stage at max(t_next, 1e-5): the model is not trained at t = 0


def sample_rk4(
    velocity: Velocity, x: mx.array, sigmas: mx.array, step_noise: StepNoise | None = None
) -> Iterator[mx.array]:
    """Classic 4th-order Runge-Kutta steps of the flow ODE (four model evaluations a step).

    With ``h = t_next - t``: ``k1 = v(x, t)``, ``k2 = v(x + h/2 k1, t + h/2)``,
    ``k3 = v(x + h/2 k2, t + h/2)``, ``k4 = v(x + h k3, max(t_next, 1e-5))`` and
    ``x += h/6 (k1 + 2 k2 + 2 k3 + k4)``. Yields ``x`` after each step; deterministic.
    """
    levels = [float(s) for s in sigmas.tolist()]

    def states() -> Iterator[mx.array]:
        nonlocal x
        for t_curr, t_next in zip(levels[:-1], levels[1:]):
            # The levels as upstream forms them in float32 (t + h/2 from the float32 t and h).
            h = float(np.float32(t_next) - np.float32(t_curr))
            mid = float(np.float32(t_curr) + np.float32(h) / np.float32(2))
            last = max(t_next, RK4_MIN_LEVEL)
            half = _scalar(h / 2, x)
            k1 = velocity(x, _levels(x, t_curr), t_curr)
            k2 = velocity(x + half * k1, _levels(x, mid), mid)
            k3 = velocity(x + half * k2, _levels(x, mid), mid)
            k4 = velocity(x + _scalar(h, x) * k3, _levels(x, last), last)
            x = x + _scalar(h / 6, x) * (k1 + 2 * k2 + 2 * k3 + k4)
            yield x

    return _one_step_ahead(states())


def _log_snr(t: float) -> float:
    """``ln((1 - t) / t)`` with both clamped at 1e-10, as upstream (so t = 1 gives ln 1e-10)."""
    return math.log(max(1.0 - t, 1e-10) / max(t, 1e-10))


def sample_dpmpp(
    velocity: Velocity, x: mx.array, sigmas: mx.array, step_noise: StepNoise | None = None
) -> Iterator[mx.array]:
    """DPM-Solver++ (2M) for rectified flows, in data prediction (``denoised = x - t v``).

    Each step: ``x <- (t_next / t) x - (1 - t_next) c D`` with
    ``c = (t_next - t) / ((1 - t_next) t)``; ``D`` is the denoised estimate on the first
    step and the last (``t_next = 0``), and otherwise the second-order extrapolation
    ``(1 + 1/(2r)) D - D_prev / (2r)`` with ``r`` the ratio of the last two steps in
    log-SNR ``ln((1 - t)/t)``. One model evaluation a step; yields ``x`` after each.
    """
    levels = [float(s) for s in sigmas.tolist()]

    def states() -> Iterator[mx.array]:
        nonlocal x
        previous = None  # the last step's denoised estimate
        for i in range(len(levels) - 1):
            t_prev, t_curr, t_next = (levels[i - 1] if i else None), levels[i], levels[i + 1]
            denoised = x - _scalar(t_curr, x) * velocity(x, _levels(x, t_curr), t_curr)
            coeff = (t_next - t_curr) / (max(1.0 - t_next, 1e-10) * max(t_curr, 1e-10))
            d = denoised
            if previous is not None and t_next != 0.0:
                r = (_log_snr(t_curr) - _log_snr(t_prev)) / (_log_snr(t_next) - _log_snr(t_curr))
                d = _scalar(1 + 1 / (2 * r), x) * denoised - _scalar(1 / (2 * r), x) * previous
            x = _scalar(t_next / max(t_curr, 1e-10), x) * x - _scalar((1.0 - t_next) * coeff, x) * d
            previous = denoised
            yield x

    return _one_step_ahead(states())


# Keyed by the names the settings table offers (sa3_mlx.settings.SAMPLERS, which must not import MLX).
SAMPLERS = dict(zip(SAMPLER_NAMES, (sample_pingpong, sample_euler, sample_rk4, sample_dpmpp), strict=True))


def paste_back(latents: mx.array, init_latents: mx.array, keep_mask: mx.array) -> mx.array:
    """Put the kept latents back exactly (``keep_mask`` 1 = keep, broadcast over channels).

    ``mx.where`` rather than a blend, so kept positions are bit-identical to the init; the result is in
    the wider of the two dtypes, so a half-precision DiT (GPUs) does not round the kept fp32 latents.
    """
    dtype = max(latents.dtype, init_latents.dtype, key=lambda d: d.size)
    return mx.where(keep_mask.astype(mx.bool_), init_latents.astype(dtype), latents.astype(dtype))
