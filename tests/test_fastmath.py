"""The CPU fast paths (numpy over the cores) against the plain MLX ops they replace.

The golden tests run the fast paths wherever arrays are large enough; these pin each
one against MLX's own ops on the same inputs, at sizes where the fast path is taken,
including the cases the models do not hit with the golden data (masks, broadcast
keys and values, differential heads, value masks, the sin gate).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sa3_mlx.models import fastmath
from sa3_mlx.models.layers import Attention
from sa3_mlx.models.same import SAMEAttention, SAMEConfig

from .util import assert_close

# fp32, outputs of order 1: different summation orders only (measured <= 1.1e-6).
ATOL = 2e-5

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the fast paths are CPU-only")


@pytest.fixture
def mlx_only(monkeypatch):
    """Run with the numpy paths switched off (the reference)."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(fastmath, "NUMPY_MIN_ELEMENTS", 1 << 62)
            return np.array(fn(*args, **kwargs))

    return run


def normal(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_workers_use_the_cores_with_numpy_blas_single_threaded():
    workers = fastmath.Workers.shared()
    if workers.count > 1:
        before = workers.blas.num_threads
        seen = []
        workers.split(8, lambda part: seen.append((part, workers.blas.num_threads)))
        assert sorted(p.start for p, _ in seen) == [8 * i // workers.count for i in range(workers.count)]
        assert {n for _, n in seen} == {1} and workers.blas.num_threads == before
    else:  # numpy shares MLX's BLAS, or there is one core: everything in the calling thread
        seen = []
        workers.split(8, seen.append)
        assert seen == [slice(0, 8)]


@pytest.mark.parametrize("mask", [None, "additive", "bool"])
@pytest.mark.parametrize("shape", [(1, 8, 300, 32, 40), (40, 4, 34, 16, 34)], ids=["heads", "batch"])
def test_attention(mlx_only, mask, shape):
    B, H, L, D, S = shape
    q, k, v = normal(B, H, L, D, seed=1), normal(B, H, S, D, seed=2), normal(B, 1, S, D, seed=3)
    m = None
    if mask == "additive":
        m = normal(B, 1, 1, S, seed=4)
    elif mask == "bool":
        m = mx.random.uniform(shape=(1, 1, L, S), key=mx.random.key(5)) > 0.3
    got = fastmath.attention(q, k, v, 0.2, m)
    assert_close(np.array(got), mlx_only(fastmath.attention, q, k, v, 0.2, m), atol=ATOL, what="attention")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "sin_pi"])
def test_glu(mlx_only, activation, with_bias):
    x = normal(3, 700, 2 * 200)  # several cache blocks per worker
    bias = normal(2 * 200, seed=1) if with_bias else None
    assert_close(np.array(fastmath.glu(x, activation, bias)), mlx_only(fastmath.glu, x, activation, bias),
                 atol=ATOL, what=f"glu {activation}")


def test_linear_glu_adds_the_bias_in_the_glu():
    proj = nn.Linear(64, 2 * 300)
    mx.eval(proj.parameters())
    proj.bias = normal(600, seed=2)
    x = normal(2, 100, 64, seed=3)
    expected = np.array(fastmath.glu(proj(x), "silu"))
    assert_close(np.array(fastmath.linear_glu(x, proj, "silu")), expected, atol=ATOL, what="linear_glu")


@pytest.mark.parametrize("differential", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_dit_self_attention(mlx_only, differential, masked):
    attn = Attention(128, 32, differential=differential, rope_dims=16)
    mx.eval(attn.parameters())
    attn.q_norm.weight = 1 + 0.1 * normal(32, seed=6)
    attn.k_norm.weight = 1 + 0.1 * normal(32, seed=7)
    x = normal(2, 150, 128, seed=8)
    value_mask = None
    if masked:
        value_mask = (mx.arange(150) < 120).astype(mx.float32)[None, None, :, None]
        value_mask = mx.concatenate([value_mask, mx.ones_like(value_mask)])
    got = np.array(attn(x, value_mask=value_mask))
    assert_close(got, mlx_only(attn, x, value_mask=value_mask), atol=ATOL, what="DiT self-attention")


def test_same_chunk_attention(mlx_only):
    config = SAMEConfig(family="s", role="decoder", dim=128, num_heads=4, head_dim=32, num_blocks=2, ff_inner=64,
                        latent_dim=16, io_channels=32, mapping_kernel=3)
    attn = SAMEAttention(config)
    mx.eval(attn.parameters())
    for norm, seed in ((attn.q_norm, 9), (attn.k_norm, 10)):
        norm.alpha = mx.array([0.7 + 0.1 * seed])
        norm.gamma = 1 + 0.1 * normal(32, seed=seed)
        norm.beta = 0.1 * normal(32, seed=seed + 10)
    x = normal(30, config.chunk_tokens, 128, seed=11)
    assert_close(np.array(attn(x)), mlx_only(attn, x), atol=ATOL, what="SAME chunk attention")


def test_rope_table_matches_mlx_rope():
    cos, sin = fastmath.rope_table(50, 16, 10000.0)
    x = normal(1, 1, 50, 16)
    half = 8
    a, b = np.array(x)[0, 0, :, :half], np.array(x)[0, 0, :, half:]
    c, s = cos[:, 0, 0], sin[:, 0, 0]
    ours = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    expected = np.array(mx.fast.rope(x, 16, traditional=False, base=10000.0, scale=1.0, offset=0))[0, 0]
    # Angles up to 49 rad, formed in fp32 by MLX and in float64 here (measured 7.7e-7).
    assert_close(ours, expected, atol=ATOL, what="RoPE table")


@pytest.mark.parametrize("differential", [False, True])
def test_cross_attention_with_values_through_the_output_projection(differential):
    """A short context's values are multiplied by ``to_out`` once ("value_out"); the result
    equals attending and projecting every step."""
    attn = Attention(128, 32, cross=True, differential=differential)
    mx.eval(attn.parameters())
    x, context = normal(2, 90, 128, seed=12), normal(2, 20, 128, seed=13)
    bias = mx.log(mx.array([[1.0] * 19 + [5.0], [1.0] * 18 + [3.0, 0.0]]))[:, None, None, :]
    kv = attn.context_keys_values(context, bias)
    assert "value_out" in kv and kv["value_out"].shape == (2, 4 * 20, 128)
    plain = {k: v for k, v in kv.items() if k != "value_out"}
    assert_close(np.array(attn(x, context_kv=kv)), np.array(attn(x, context_kv=plain)), atol=ATOL,
                 what="value_out vs attend-then-project")
    assert "value_out" not in attn.context_keys_values(normal(2, 40, 128, seed=14))  # 40 >= head_dim
