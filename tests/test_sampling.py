"""Schedule, guidance, paste-back and the latent-length / inpaint-mask rules."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx.plan import inpaint_keep_mask, latent_length
from sa3_mlx.sampling import (
    Guidance,
    apply_guidance,
    logsnr_shift,
    paste_back,
    pingpong_schedule,
    sample_pingpong,
    seeded_step_noise,
)
from tests.util import load_case


@pytest.mark.parametrize("case", ["case_pipeline_t2a.npz", "case_pipeline_inpaint.npz", "case_pipeline_cfg_apg.npz"])
def test_schedule_matches_reference(golden, case):
    expected = load_case(golden, case)["sigmas"]
    np.testing.assert_allclose(np.array(pingpong_schedule(8, 1.0)), expected, rtol=0, atol=1e-7)


def test_schedule_shape_and_endpoints():
    for steps in (1, 2, 8, 50):
        for sigma_max in (0.3, 1.0, 1.5):
            s = np.array(pingpong_schedule(steps, sigma_max))
            assert s.shape == (steps + 1,)
            assert s[0] == np.float32(sigma_max) and s[-1] == 0.0
            assert np.all(np.diff(s) < 0), "schedule must decrease strictly"
    np.testing.assert_array_equal(np.array(logsnr_shift(mx.array([0.0, 1.0]))), [0.0, 1.0])
    with pytest.raises(ValueError):
        pingpong_schedule(0)


def _rand(shape, seed):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_guidance_vanilla_and_projected():
    x, cv, uv = _rand((2, 4, 6), 0), _rand((2, 4, 6), 1), _rand((2, 4, 6), 2)
    t = mx.array([0.7, 0.3])
    s = np.array(t).reshape(-1, 1, 1)
    # Vanilla CFG (apg 0) in velocity space is the textbook uncond + w (cond - uncond).
    v = apply_guidance(x, t, cv, uv, Guidance(scale=3.0, apg=0.0))
    np.testing.assert_allclose(np.array(v), np.array(uv) + 3.0 * (np.array(cv) - np.array(uv)), atol=1e-5)
    # Full APG: the guidance added to the conditional denoised estimate is orthogonal to it.
    v = apply_guidance(x, t, cv, uv, Guidance(scale=3.0, apg=1.0))
    cond_d = np.array(x) - np.array(cv) * s
    added = (np.array(x) - np.array(v) * s) - cond_d
    dots = (added * cond_d).sum(axis=(1, 2))
    np.testing.assert_allclose(dots, 0.0, atol=1e-3)
    # Scale 1 is "off": the conditional velocity unchanged.
    np.testing.assert_allclose(np.array(apply_guidance(x, t, cv, uv, Guidance(scale=1.0))), np.array(cv), atol=1e-6)
    assert not Guidance(1.0).enabled and Guidance(2.0).active_at(1.0) and not Guidance(2.0).active_at(1.2)


def test_paste_back_is_bit_exact():
    init, gen = _rand((1, 8, 10), 3), _rand((1, 8, 10), 4)
    keep = mx.array(np.array([1, 1, 0, 0, 1, 0, 1, 1, 1, 0], np.float32))[None, None]
    out = np.array(paste_back(gen, init, keep))
    k = np.array(keep, bool)[0, 0]
    assert np.array_equal(out[..., k], np.array(init)[..., k])
    assert np.array_equal(out[..., ~k], np.array(gen)[..., ~k])


def test_seeded_noise_is_deterministic_and_ordered():
    a, b = seeded_step_noise(5), seeded_step_noise(5)
    for i in range(3):
        assert np.array_equal(np.array(a(i, (1, 2, 3), mx.float32)), np.array(b(i, (1, 2, 3), mx.float32)))
    with pytest.raises(ValueError):
        a(7, (1, 2, 3), mx.float32)


def test_pingpong_last_step_returns_denoised():
    # With v = x - x0 (the exact velocity towards a fixed x0), every denoised estimate is x0.
    x0 = _rand((1, 3, 5), 6)
    noise = seeded_step_noise(1)
    out = list(sample_pingpong(lambda x, t, level: (x - x0) / t.reshape(-1, 1, 1), _rand((1, 3, 5), 7), pingpong_schedule(4), noise))
    assert len(out) == 4
    np.testing.assert_allclose(np.array(out[-1]), np.array(x0), atol=1e-5)


def test_latent_length_rule():
    assert latent_length(1.5, "same-s") == 18  # ceil(16.15) = 17 -> even for SAME-S
    assert latent_length(1.5, "same-l") == 17
    assert latent_length(30, "same-s") == 324 and latent_length(30, "same-l") == 323
    assert latent_length(0.01, "same-l") == 1


def test_inpaint_mask_sample_domain():
    # 0.4..1.0 s: samples [17640, 44100) regenerate -> latents 5..10 (latent j starts at 4096 j).
    keep = inpaint_keep_mask([(0.4, 1.0)], seconds=1.5, n_latents=18)
    assert np.flatnonzero(keep == 0).tolist() == list(range(5, 11)) + [17]  # 17 starts past 1.5 s
    # Several ranges, and the README's example: 4 s starts latent 44 (MLX's rounding gave 43).
    keep = inpaint_keep_mask([(4.0, 5.0), (1.0, 1.2)], seconds=10, n_latents=108)
    gone = np.flatnonzero(keep == 0).tolist()
    assert gone[0] == 11 and 43 not in gone and 44 in gone
