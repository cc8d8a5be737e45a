"""The CUDA backend's attention-heads kernel against the reference ops.

The kernel runs only on an NVIDIA GPU (MLX's CUDA backend); those tests skip elsewhere and are run
on the GPU machine whenever the kernel changes (docs/performance.md says how). What decides between
the kernel and the reference is checked everywhere.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx import kernels
from sa3_mlx.kernels import DyTParams, RMSNormParams
from sa3_mlx.kernels.cuda import MAX_HEAD_DIM, _kernel_applies
from sa3_mlx.models.dit import DiT, DiTConfig

from .util import assert_close

REF = kernels.reference()
CUDA = kernels.by_name("cuda")

on_cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


def normal(*shape, seed=0, scale=1.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def rms(dim, seed):
    return RMSNormParams(1 + normal(dim, seed=seed, scale=0.2), 1e-6)


def dyt(dim, seed):
    return DyTParams(mx.array([0.7]), 1 + normal(dim, seed=seed, scale=0.2), normal(dim, seed=seed + 1, scale=0.1))


def test_the_kernel_takes_only_what_it_computes():
    x = mx.zeros((2, 5, 3 * 4 * 64))
    q, k = rms(64, 0), rms(64, 1)
    assert _kernel_applies(x, 4, "qkv", q, k, 32)
    assert _kernel_applies(x.astype(mx.float16), 4, "qkv", q, k, 64)
    assert _kernel_applies(mx.zeros((1, 5, 4 * 64)), 4, "v", None, None, 0)
    assert not _kernel_applies(x.reshape(2, 5, 3, 256), 4, "qkv", q, k, 32)  # rank
    assert not _kernel_applies(x.astype(mx.int32), 4, "qkv", q, k, 32)  # dtype
    assert not _kernel_applies(x, 5, "qkv", q, k, 32)  # width not split into the heads
    assert not _kernel_applies(x, 4, "qkv", q, k, 33)  # odd RoPE width
    assert not _kernel_applies(x, 4, "qkv", q, k, 96)  # RoPE wider than a head
    assert not _kernel_applies(x, 4, "qkv", q, None, 32)  # a key set without its norm
    assert not _kernel_applies(x, 4, "qkv", q, dyt(64, 2), 32)  # two kinds of norm
    wide = 2 * MAX_HEAD_DIM
    assert not _kernel_applies(mx.zeros((1, 3, 3 * wide)), 1, "qkv", rms(wide, 0), rms(wide, 1), 0)


CASES = [
    # kinds, heads, head_dim, rope_dims, norm, masked
    ("qkv", 4, 64, 32, "rms", False),
    ("qkv", 4, 64, 32, "rms", True),
    ("qkvqk", 3, 64, 64, "rms", True),
    ("qkvqk", 2, 64, 32, "dyt", False),
    ("q", 4, 64, 0, "rms", False),
    ("qq", 4, 64, 0, "rms", False),
    ("kv", 4, 64, 0, "rms", False),
    ("kkv", 4, 64, 0, "rms", False),
    ("qkv", 2, 16, 16, "rms", False),  # narrower than a warp
    ("qkv", 2, 96, 48, "rms", False),  # not a multiple of the warp
]


def _run(backend, x, heads, kinds, norms, rope_dims, mask):
    with kernels.use(backend):
        return backend.heads(x, heads, kinds, norms[0], norms[1], rope_dims, 10000.0, mask)


@on_cuda
@pytest.mark.parametrize("kinds,heads,head_dim,rope_dims,norm,masked", CASES)
def test_heads_kernel_equals_the_reference_in_fp32(kinds, heads, head_dim, rope_dims, norm, masked):
    B, N = 2, 37
    x = normal(B, N, len(kinds) * heads * head_dim, seed=3, scale=2.0)
    make = rms if norm == "rms" else dyt
    norms = (make(head_dim, 10), make(head_dim, 20))
    mask = mx.broadcast_to((mx.arange(N) < 30).astype(mx.float32), (B, N)).reshape(B, 1, N, 1) if masked else None
    got = _run(CUDA, x, heads, kinds, norms, rope_dims, mask)
    want = _run(REF, x, heads, kinds, norms, rope_dims, mask)
    assert len(got) == len(kinds)
    for g, w, kind in zip(got, want, kinds):
        assert g.shape == w.shape == (B, heads, N, head_dim) and g.dtype == mx.float32
        # fp32 rounding of the norm and of cos/sin at positions up to 36
        assert_close(g, w, atol=2e-5, rtol=2e-5, what=f"{kinds} set {kind}")


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_heads_kernel_in_half_precision_is_as_close_to_fp32_as_the_reference(dtype):
    B, N, H, D = 1, 300, 8, 64
    x = normal(B, N, 5 * H * D, seed=4, scale=3.0)
    norms = (rms(D, 1), rms(D, 2))
    exact = _run(REF, x, H, "qkvqk", norms, 32, None)
    half = [RMSNormParams(n.weight.astype(dtype), n.eps) for n in norms]
    got = _run(CUDA, x.astype(dtype), H, "qkvqk", half, 32, None)
    ref = _run(REF, x.astype(dtype), H, "qkvqk", half, 32, None)
    for g, r, e in zip(got, ref, exact):
        assert g.dtype == dtype
        e = np.array(e)
        # RMS errors: one rounding (the kernel's) against two (the reference's norm, then RoPE)
        err_kernel = np.sqrt(np.mean((np.array(g.astype(mx.float32)) - e) ** 2))
        err_reference = np.sqrt(np.mean((np.array(r.astype(mx.float32)) - e) ** 2))
        assert err_kernel <= err_reference * 1.02, (err_kernel, err_reference)


@on_cuda
@pytest.mark.parametrize("differential", [False, True])
def test_dit_under_the_cuda_backend_equals_the_reference(differential):
    config = DiTConfig(io_channels=8, embed_dim=128, depth=2, num_heads=2, head_dim=64, cond_token_dim=32,
                       global_cond_dim=24, local_add_cond_dim=9, num_memory_tokens=3, ff_inner=192,
                       timestep_features_dim=16, differential=differential)
    mx.random.seed(0)
    dit = DiT(config)
    x = normal(2, 8, 21, seed=1)
    t = mx.array([0.3, 0.8])
    cross = normal(2, 7, 32, seed=2)
    glob = normal(2, 24, seed=3)
    local = normal(2, 21, 9, seed=4)
    padding = mx.broadcast_to(mx.arange(21) < 17, (2, 21))
    outs = []
    for backend in (CUDA, REF):
        with kernels.use(backend):
            outs.append(np.array(dit(x, t, cross, glob, local, padding)))
    assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5, what="DiT output")
