"""The CUDA backend's kernels (attention heads, local attention) against the reference ops.

The kernel runs only on an NVIDIA GPU (MLX's CUDA backend); those tests skip elsewhere and are run
on the GPU machine whenever the kernel changes (docs/performance.md says how). What decides between
the kernel and the reference is checked everywhere.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx import kernels
from sa3_mlx.kernels import DyTParams, RMSNormParams
from sa3_mlx.kernels.cuda import LOCAL_MAX_WHOLE, MAX_HEAD_DIM, _banded_mma_plan, _kernel_applies, _local_plan
from sa3_mlx.models.dit import DiT, DiTConfig
from sa3_mlx.models.same import SAMEConfig, build_same

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


def test_local_attention_kernel_takes_only_what_it_computes():
    def sets(n, B=1, H=2, N=34, D=64, dtype=mx.float32):
        return [mx.zeros((B, H, N, D), dtype=dtype) for _ in range(n)]

    q, k, v = sets(2), sets(2), sets(1)[0]
    assert _local_plan(q, k, v, None, 1) == (34, 34, 34, 34)  # a SAME-S chunk, attended whole
    left, right, tile, keys = _local_plan(sets(2, N=170), sets(2, N=170), sets(1, N=170)[0], (1, 1), 17)
    assert (left, right) == (17, 17) and keys == tile + 34  # SAME-L: +-17 tokens
    assert _local_plan(sets(1), sets(1), v, None, 1) is not None  # one set
    assert _local_plan(sets(1, N=LOCAL_MAX_WHOLE + 1), sets(1, N=LOCAL_MAX_WHOLE + 1),
                       sets(1, N=LOCAL_MAX_WHOLE + 1)[0], None, 1) is None  # too long to attend whole
    assert _local_plan(q, k, v, (2, 2), 17) is None  # more keys per query than a block takes
    assert _local_plan(sets(2, D=48), sets(2, D=48), sets(1, D=48)[0], None, 1) is None  # width
    assert _local_plan(q, k, v.astype(mx.float16), None, 1) is None  # mixed dtypes
    assert _local_plan(q, k[:1], v, None, 1) is None  # sets disagree
    assert _local_plan(sets(2, H=1), k, v, None, 1) is None  # shapes disagree


def test_tensor_core_local_attention_takes_half_precision_windows_only():
    def sets(n, N=170, D=64, dtype=mx.float16):
        return [mx.zeros((1, 2, N, D), dtype=dtype) for _ in range(n)]

    # SAME-L: +-17 tokens, 16 queries see 50 keys (64 as tiles), 4 warps of 16 queries per block
    assert _banded_mma_plan(sets(2), sets(2), sets(1)[0], (1, 1), 17) == (17, 17, 4, 64)
    assert _banded_mma_plan(sets(1, dtype=mx.bfloat16), sets(1, dtype=mx.bfloat16), sets(1, dtype=mx.bfloat16)[0],
                            (1, 1), 17) is not None
    fp32 = sets(3, dtype=mx.float32)
    assert _banded_mma_plan(fp32[:2], fp32[:2], fp32[2], (1, 1), 17) is None  # fp32 keeps the SIMT kernel
    assert _banded_mma_plan(sets(2), sets(2), sets(1)[0], None, 1) is None  # whole sequences: the SIMT kernel
    assert _banded_mma_plan(sets(2), sets(2), sets(1)[0], (4, 4), 17) is None  # 16 queries would see > 128 keys
    assert _banded_mma_plan(sets(2, D=48), sets(2, D=48), sets(1, D=48)[0], (1, 1), 17) is None  # width
    assert _banded_mma_plan(sets(2, D=128), sets(2, D=128), sets(1, D=128)[0], (1, 1), 17) is None  # shared memory
    assert _banded_mma_plan(sets(2), sets(1), sets(1)[0], (1, 1), 17) is None  # sets disagree


LOCAL_CASES = [
    # sets, heads, N, head_dim, window, group
    (2, 3, 34, 64, None, 1),  # SAME-S chunks
    (1, 2, 20, 64, None, 1),
    (2, 2, 170, 64, (1, 1), 17),  # SAME-L
    (1, 2, 68, 128, (1, 1), 17),
    (2, 1, 96, 64, (2, 1), 8),  # asymmetric window
    (2, 2, 17, 64, (1, 1), 17),  # shorter than a block
]


@on_cuda
@pytest.mark.parametrize("sets,heads,N,head_dim,window,group", LOCAL_CASES)
def test_local_attention_kernel_equals_the_reference_in_fp32(sets, heads, N, head_dim, window, group):
    B = 2
    q = [normal(B, heads, N, head_dim, seed=s, scale=0.5) for s in range(sets)]
    k = [normal(B, heads, N, head_dim, seed=10 + s, scale=0.5) for s in range(sets)]
    v = normal(B, heads, N, head_dim, seed=20)
    assert _local_plan(q, k, v, window, group) is not None
    got = CUDA.local_attention(q, k, v, head_dim**-0.5, window, group)
    want = REF.local_attention(q, k, v, head_dim**-0.5, window, group)
    assert got.shape == want.shape == (B, heads, N, head_dim) and got.dtype == mx.float32
    assert_close(got, want, atol=2e-5, rtol=2e-5, what="local attention")


HALF_CASES = [
    # sets, heads, N, head_dim, window, group: the tensor-core kernel unless noted
    (2, 4, 17 * 24, 64, (1, 1), 17),  # SAME-L
    (2, 2, 96, 64, (2, 1), 8),  # asymmetric, a partial last block
    (1, 3, 68, 64, (1, 1), 17),  # one set
    (2, 2, 17, 64, (1, 1), 17),  # shorter than one warp's keys
    (2, 1, 306, 32, (1, 1), 17),  # narrower heads
    (2, 2, 132, 64, (0, 3), 4),  # keys only to the right
    (2, 1, 204, 128, (1, 1), 17),  # wider heads: the SIMT kernel
]


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("sets,heads,N,head_dim,window,group", HALF_CASES)
def test_local_attention_kernel_in_half_precision_is_as_close_to_fp32_as_the_reference(
        dtype, sets, heads, N, head_dim, window, group):
    B, scale = 2, head_dim**-0.5
    q = [normal(B, heads, N, head_dim, seed=s) for s in range(sets)]
    k = [normal(B, heads, N, head_dim, seed=10 + s) for s in range(sets)]
    v = normal(B, heads, N, head_dim, seed=20)
    exact = np.array(REF.local_attention(q, k, v, scale, window, group))
    half = lambda arrays: [a.astype(dtype) for a in arrays]  # noqa: E731
    assert (_banded_mma_plan(half(q), half(k), v.astype(dtype), window, group) is None) == (head_dim == 128)
    got = CUDA.local_attention(half(q), half(k), v.astype(dtype), scale, window, group)
    ref = REF.local_attention(half(q), half(k), v.astype(dtype), scale, window, group)
    assert got.dtype == dtype and got.shape == ref.shape
    err_kernel = np.sqrt(np.mean((np.array(got.astype(mx.float32)) - exact) ** 2))
    err_reference = np.sqrt(np.mean((np.array(ref.astype(mx.float32)) - exact) ** 2))
    assert err_kernel <= err_reference * 1.02, (err_kernel, err_reference)


@on_cuda
@pytest.mark.parametrize("family", ["s", "l"])
def test_same_decoder_under_the_cuda_backend_equals_the_reference(family):
    config = SAMEConfig.tiny(family, "decoder")
    mx.random.seed(0)
    decoder = build_same(config)
    latents = normal(1, config.latent_dim, 8, seed=5)
    outs = []
    for backend in (CUDA, REF):
        with kernels.use(backend):
            outs.append(np.array(decoder(latents)))
    assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5, what="SAME decoder output")


@on_cuda
@pytest.mark.parametrize("dtype,window,group", [(mx.float32, None, 1), (mx.float32, (1, 1), 17),
                                                (mx.float16, (1, 1), 17), (mx.bfloat16, (2, 1), 8)])
def test_local_attention_kernels_write_merged_heads_as_merge_heads_would(dtype, window, group):
    B, H, N, D = 2, 3, 34 if window is None else 170, 64
    q = [normal(B, H, N, D, seed=s, scale=0.5).astype(dtype) for s in range(2)]
    k = [normal(B, H, N, D, seed=10 + s, scale=0.5).astype(dtype) for s in range(2)]
    v = normal(B, H, N, D, seed=20).astype(dtype)
    heads = CUDA.local_attention(q, k, v, 0.125, window, group)
    merged = CUDA.local_attention(q, k, v, 0.125, window, group, merged=True)
    assert merged.shape == (B, N, H * D) and merged.dtype == dtype
    assert np.array_equal(np.array(merged.astype(mx.float32)), np.array(kernels.merge_heads(heads).astype(mx.float32)))


class MemmoveRuntime:
    """A stand-in for the CUDA runtime that copies with ``memmove`` (the CPU's addresses are host
    memory): what CUDAKernels.to_numpy plans and asks for, checked without a GPU."""

    def __init__(self, working=True):
        self.calls, self.working = [], working

    def copy_rows(self, dst, src, rows, width, pitch):
        self.calls.append((rows, width, pitch))
        if not self.working:
            return False
        for r in range(rows):
            ctypes.memmove(dst + r * width, src + r * pitch, width)
        return True


def host_layouts():
    a = normal(2, 2, 1000, seed=3)
    return {
        "contiguous": (a, (1, 2 * 2 * 1000 * 4, 2 * 2 * 1000 * 4)),
        "last-axis slice": (a[..., :700], (4, 700 * 4, 1000 * 4)),
        "one item's slice": (a[1, :, :333], (2, 333 * 4, 1000 * 4)),
        "transposed": (a.transpose(0, 2, 1), None),
        "strided": (a[..., ::2], None),
        "half precision": (a.astype(mx.float16)[:, :, 5:9], (4, 8, 2000)),
    }


@pytest.mark.parametrize("layout", list(host_layouts()))
def test_to_numpy_copies_rows_of_any_layout_as_np_array_would(layout, monkeypatch):
    import sa3_mlx.kernels.cuda as cuda

    x, plan = host_layouts()[layout]
    mx.eval(x)
    assert cuda.host_copy_plan(np.asarray(x)) == plan
    runtime = MemmoveRuntime()
    monkeypatch.setattr(cuda, "cuda_runtime", lambda: runtime)
    out = CUDA.to_numpy(x)
    assert out.flags.owndata and out.flags.writeable and out.flags.c_contiguous
    assert out.dtype == np.array(x).dtype and np.array_equal(out, np.array(x))
    assert len(runtime.calls) == 1  # one copy; a layout without a plan is made contiguous on the device first
    if plan is not None:
        assert runtime.calls == [plan]


def test_to_numpy_falls_back_to_numpy_when_the_runtime_fails_or_is_missing(monkeypatch):
    import sa3_mlx.kernels.cuda as cuda

    x = normal(2, 3, 50, seed=4)[..., 10:40]
    failing = MemmoveRuntime(working=False)
    monkeypatch.setattr(cuda, "cuda_runtime", lambda: failing)
    assert np.array_equal(CUDA.to_numpy(x), np.array(x)) and failing.calls
    monkeypatch.setattr(cuda, "cuda_runtime", lambda: None)
    assert np.array_equal(CUDA.to_numpy(x), np.array(x))
    bf16 = x.astype(mx.bfloat16)  # numpy has no bfloat16: the reference's conversion decides
    monkeypatch.setattr(cuda, "cuda_runtime", lambda: MemmoveRuntime())
    assert np.array_equal(CUDA.to_numpy(bf16.astype(mx.float32)), np.array(bf16.astype(mx.float32)))
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        CUDA.to_numpy(bf16)


@on_cuda
def test_to_numpy_on_the_gpu_uses_the_cuda_runtime_and_equals_np_array():
    import sa3_mlx.kernels.cuda as cuda

    assert cuda.cuda_runtime() is not None, "libcudart was not found beside MLX's CUDA backend"
    for x, _ in host_layouts().values():
        mx.eval(x)
        assert np.array_equal(CUDA.to_numpy(x), np.array(x))
    assert cuda.cuda_runtime().working
