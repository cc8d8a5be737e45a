"""Batched CFG / APG on both DiTs against the reference (null condition = zeros)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx.models.dit import load_dit
from sa3_mlx.sampling import Guidance, apply_guidance
from tests.util import assert_close, load_case

SETTINGS = [(3.0, 1.0), (3.0, 0.0), (2.5, 0.5)]


@pytest.mark.parametrize("variant,weights", [("small", "dit_sm_tiny_f16.npz"), ("medium", "dit_medium_tiny_f16.npz")])
@pytest.mark.parametrize("scale,apg", SETTINGS)
def test_guided_velocity(golden, variant, weights, scale, apg):
    case = load_case(golden, f"case_dit_{variant}.npz")
    dit, _, _ = load_dit(golden / weights, dtype=mx.float32)
    x, t = mx.array(case["x"]), mx.array(case["t"])
    cross, glob = mx.array(case["cross_attn_cond"]), mx.array(case["global_cond"])
    batch = x.shape[0]
    pair = dit.condition(mx.concatenate([cross, mx.zeros_like(cross)]), mx.concatenate([glob, glob]))
    x2 = mx.concatenate([x, x])

    def guided(features):
        v = dit.predict(x2, dit.embed_timestep(features), pair)
        return np.array(apply_guidance(x, t, v[:batch], v[batch:], Guidance(scale, apg)))

    expected = case[f"v_cfg{scale}_apg{apg}"]
    # With the reference's own timestep features the only difference is fp32 rounding.
    stored = mx.array(np.concatenate([case["inter_timestep_features"]] * 2))
    assert_close(guided(stored), expected, atol=5e-5, what=f"{variant} cfg {scale} apg {apg} (stored features)")
    # With ours (PyTorch rounding order): the README's PyTorch-vs-port CFG/APG error, <= 1.4e-2.
    features = dit.timestep_features(mx.concatenate([t, t]))
    assert_close(guided(features), expected, atol=1.4e-2, what=f"{variant} cfg {scale} apg {apg}")
