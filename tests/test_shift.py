"""Upstream's sampling distribution shifts (model_config `sampling_distribution_shift_options`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sa3_mlx.sampling import build_schedule, pingpong_schedule, shift_grid

GRID = np.linspace(1.0, 0.0, 9)


def test_no_options_is_the_default_logsnr_schedule():
    np.testing.assert_array_equal(np.array(build_schedule(8, 0.9)), np.array(pingpong_schedule(8, 0.9)))


def test_logsnr_with_rate_zero_equals_the_default():
    shifted = build_schedule(8, 1.0, {"type": "logsnr", "rate": 0}, seq_len=123)
    np.testing.assert_allclose(np.array(shifted), np.array(pingpong_schedule(8, 1.0)), atol=1e-7)


def test_logsnr_start_drops_by_rate_per_doubling():
    """At t = 1 - eps the log-SNR approaches logsnr_start = anchor - rate * log2(L / 2000)."""
    t = np.array([0.5])
    for length, start in ((2000, -6.2), (4000, -7.2), (1000, -5.2)):
        expected = 1 / (1 + math.exp(2.0 - 0.5 * (2.0 - start)))
        np.testing.assert_allclose(shift_grid(t, {"type": "logsnr"}, length), [expected], rtol=1e-12)


def test_flux_shift():
    constant = {"type": "flux", "alpha_min": 3.0, "alpha_max": 3.0}
    np.testing.assert_allclose(shift_grid(GRID, constant, 10), 3 * GRID / (1 + 2 * GRID), rtol=1e-12)
    ramp = {"type": "flux", "alpha_min": 1.0, "alpha_max": 4.0, "min_length": 256, "max_length": 4096}
    np.testing.assert_allclose(shift_grid(GRID, ramp, 100), GRID, rtol=1e-12)  # clamped to min: alpha 1
    alpha = math.exp(0.5 * math.log(4.0))  # log-linear in log length: halfway -> sqrt(4)
    np.testing.assert_allclose(shift_grid(GRID, ramp, 1024), alpha * GRID / (1 + (alpha - 1) * GRID), rtol=1e-9)


def test_full_shift():
    """DistributionShift: t' = 1 - e^mu / (e^mu + t / (1 - t)), mu = -base_shift at min_length."""
    out = shift_grid(np.array([0.0, 0.5, 1.0]), {"type": "full"}, 256)
    np.testing.assert_allclose(out, [0.0, 1 / (1 + math.exp(-0.5)), 1.0], rtol=1e-12)
    longest = shift_grid(np.array([0.5]), {"type": "full"}, 10**6)  # clamped to max_length: mu = -1.15
    np.testing.assert_allclose(longest, [1 / (1 + math.exp(-1.15))], rtol=1e-12)
    schedule = np.array(build_schedule(8, 0.8, {"type": "full"}, seq_len=512))
    assert schedule[0] == np.float32(0.8) and schedule[-1] == 0 and np.all(np.diff(schedule) < 0)


def test_length_dependent_shift_needs_the_length():
    with pytest.raises(ValueError, match="sequence length"):
        build_schedule(8, 1.0, {"type": "full"})


def test_masked_apg_ignores_and_leaves_the_padded_latents():
    """Upstream apg_project with a padding mask: projection over valid positions, zero guidance on padding."""
    import mlx.core as mx

    from sa3_mlx.sampling import Guidance, apply_guidance

    rng = np.random.default_rng(0)
    x, cond_v, uncond_v = (mx.array(rng.standard_normal((1, 4, 6)).astype(np.float32)) for _ in range(3))
    sigma = mx.array([0.7])
    mask = mx.array([[1, 1, 1, 1, 0, 0]])
    guided = np.array(apply_guidance(x, sigma, cond_v, uncond_v, Guidance(scale=3.0, apg=1.0), mask))
    np.testing.assert_allclose(guided[..., 4:], np.array(cond_v)[..., 4:], rtol=1e-5, atol=1e-6)
    # On the valid part it equals unmasked APG computed on the valid part alone.
    valid = np.array(apply_guidance(x[..., :4], sigma, cond_v[..., :4], uncond_v[..., :4], Guidance(3.0, 1.0)))
    np.testing.assert_allclose(guided[..., :4], valid, rtol=1e-5, atol=1e-5)
