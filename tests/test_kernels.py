"""The kernel seam: the CPU backend's fast paths against the reference backend, and the selection.

The golden tests run whichever backend the device gets (the CPU one here) wherever
arrays are large enough; these pin each CPU fast path against the reference's op on
the same inputs, at sizes where the fast path is taken, including the cases the models
do not hit with the golden data (masks, broadcast keys and values, differential heads,
value masks, the sin gate, ``mx.compile`` tracing), then whole models under either
backend, then how :func:`sa3_mlx.kernels.active` picks one.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sa3_mlx import kernels
from sa3_mlx.kernels import DyTParams, Kernels, RMSNormParams
from sa3_mlx.kernels import cpu as cpu_kernels
from sa3_mlx.kernels.cpu import CPUKernels
from sa3_mlx.kernels.cuda import CUDAKernels
from sa3_mlx.models.dit import DiT, DiTConfig
from sa3_mlx.models.layers import Attention
from sa3_mlx.models.same import SAMEAttention, SAMEConfig, build_same
from sa3_mlx.models.t5gemma import T5GemmaConfig, T5GemmaEncoder

from .util import assert_close

# fp32, outputs of order 1: different summation orders only (measured <= 1.1e-6).
ATOL = 2e-5

REF = kernels.reference()
CPU = kernels.by_name("cpu")

on_cpu_only = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="numerics pinned on the CPU device")


def normal(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


def both(fn, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``fn(*args)`` under the CPU backend and under the reference, as numpy."""
    out = []
    for backend in (CPU, REF):
        with kernels.use(backend):
            out.append(np.array(fn(*args, **kwargs)))
    return out[0], out[1]


# ---------------------------------------------------------------- the CPU fast paths


def test_workers_use_the_cores_with_numpy_blas_single_threaded():
    workers = cpu_kernels.Workers.shared()
    if workers.count > 1:
        before = workers.blas.num_threads
        seen = []
        workers.split(8, lambda part: seen.append((part, workers.blas.num_threads)))
        parts = min(workers.count, 8)  # never more parts than items (a 16-core machine splits 8 items 8 ways)
        assert sorted(p.start for p, _ in seen) == [8 * i // parts for i in range(parts)]
        assert {n for _, n in seen} == {1} and workers.blas.num_threads == before
    else:  # numpy shares MLX's BLAS, or there is one core: everything in the calling thread
        seen = []
        workers.split(8, seen.append)
        assert seen == [slice(0, 8)]


@on_cpu_only
@pytest.mark.parametrize("op", ["softmax", "tanh", "sigmoid", "silu", "sin", "gelu_tanh"])
def test_element_wise(op):
    x = 3 * normal(4, 100, 300, seed=20)  # above NUMPY_MIN_ELEMENTS
    assert x.size >= cpu_kernels.NUMPY_MIN_ELEMENTS
    assert cpu_kernels.on_host(x) is not None
    assert_close(np.array(getattr(CPU, op)(x)), np.array(getattr(REF, op)(x)), atol=ATOL, what=op)


@on_cpu_only
def test_softmax_along_another_axis():
    x = 3 * normal(40, 30, 50, seed=21)
    assert_close(np.array(CPU.softmax(x, axis=1)), np.array(REF.softmax(x, axis=1)), atol=ATOL, what="softmax axis 1")


@on_cpu_only
@pytest.mark.parametrize("mask", [None, "additive", "bool"])
@pytest.mark.parametrize("shape", [(1, 8, 300, 32, 40), (40, 4, 34, 16, 34)], ids=["heads", "batch"])
def test_attention(mask, shape):
    """Keys with every head, values broadcast over the heads."""
    B, H, L, D, S = shape
    q, k, v = normal(B, H, L, D, seed=1), normal(B, H, S, D, seed=2), normal(B, 1, S, D, seed=3)
    m = None
    if mask == "additive":
        m = normal(B, 1, 1, S, seed=4)
    elif mask == "bool":
        m = mx.random.uniform(shape=(1, 1, L, S), key=mx.random.key(5)) > 0.3
    assert q.size * S >= cpu_kernels.NUMPY_MIN_ELEMENTS
    assert_close(np.array(CPU.attention(q, k, v, 0.2, m)), np.array(REF.attention(q, k, v, 0.2, m)),
                 atol=ATOL, what="attention")


@on_cpu_only
def test_small_attention_and_half_precision():
    """Below the threshold the CPU runs the three steps with its softmax; fp16 takes the reference."""
    q, k, v = normal(1, 2, 10, 8, seed=1), normal(1, 2, 12, 8, seed=2), normal(1, 2, 12, 8, seed=3)
    assert_close(np.array(CPU.attention(q, k, v, 0.3)), np.array(REF.attention(q, k, v, 0.3)), atol=ATOL,
                 what="small attention")
    h = [t.astype(mx.float16) for t in (q, k, v)]
    assert np.array_equal(np.array(CPU.attention(*h, 0.3)), np.array(REF.attention(*h, 0.3)))


@on_cpu_only
def test_attention_weights():
    q, k = normal(2, 4, 150, 32, seed=1), normal(2, 4, 20, 32, seed=2)
    bias = mx.log(mx.array([[1.0] * 19 + [5.0], [1.0] * 18 + [3.0, 0.0]]))[:, None, None, :]
    assert_close(np.array(CPU.attention_weights(q, k, 0.2, bias)), np.array(REF.attention_weights(q, k, 0.2, bias)),
                 atol=ATOL, what="attention weights")


@on_cpu_only
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "sin_pi"])
def test_glu(activation, with_bias):
    x = normal(3, 700, 2 * 200)  # several cache blocks per worker
    bias = normal(2 * 200, seed=1) if with_bias else None
    assert_close(np.array(CPU.glu(x, activation, bias)), np.array(REF.glu(x, activation, bias)),
                 atol=ATOL, what=f"glu {activation}")


def test_glu_rejects_unknown_activations():
    for backend in (CPU, REF):
        with pytest.raises(ValueError, match="unknown GLU activation"):
            backend.glu(normal(2, 8), "relu")


@on_cpu_only
@pytest.mark.parametrize("activation", ["silu", "sin_pi"])
def test_linear_glu_adds_the_bias_in_the_glu(activation):
    proj = nn.Linear(64, 2 * 300)
    mx.eval(proj.parameters())
    proj.bias = normal(600, seed=2)
    x = normal(2, 100, 64, seed=3)
    assert_close(np.array(CPU.linear_glu(x, proj, activation)), np.array(REF.linear_glu(x, proj, activation)),
                 atol=ATOL, what="linear_glu")


def _rms(seed):
    return RMSNormParams(1 + 0.1 * normal(32, seed=seed), 1e-6)


def _dyt(seed):
    return DyTParams(mx.array([0.7 + 0.1 * seed]), 1 + 0.1 * normal(32, seed=seed), 0.1 * normal(32, seed=seed + 10))


@on_cpu_only
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("differential", [False, True])
@pytest.mark.parametrize("norm", ["rms", "dyt"])
@pytest.mark.parametrize("rope_dims", [0, 16])
def test_self_attention(norm, differential, masked, rope_dims):
    make = _rms if norm == "rms" else _dyt
    q_norm, k_norm = make(6), make(7)
    B, N, H, D = 2, 150, 4, 32
    qkv = normal(B, N, (5 if differential else 3) * H * D, seed=8)
    value_mask = None
    if masked:
        value_mask = mx.stack([(mx.arange(N) < 120), mx.ones(N, dtype=mx.bool_)]).astype(mx.float32)
    args = (qkv, H, D**-0.5, q_norm, k_norm, rope_dims, 10000.0, differential, value_mask)
    assert cpu_kernels.on_host(qkv) is not None
    assert_close(np.array(CPU.self_attention(*args)), np.array(REF.self_attention(*args)), atol=ATOL,
                 what="self-attention")


def test_differential_self_attention_equals_one_attention_over_2h_heads():
    """The reference's two maps over shared values are what SAME used to run as one
    attention over 2H heads with tiled values: the heads are independent."""
    H, D = 4, 32
    qkv = normal(30, 34, 5 * H * D, seed=12)
    q_norm, k_norm = _dyt(2), _dyt(3)
    fused = np.array(REF.self_attention(qkv, H, D**-0.5, q_norm, k_norm, 16, 10000.0, True))
    q, k, v, q_diff, k_diff = mx.split(qkv, 5, axis=-1)
    queries = REF.qk_norm(mx.concatenate([kernels.split_heads(q, H), kernels.split_heads(q_diff, H)], axis=1), q_norm)
    keys = REF.qk_norm(mx.concatenate([kernels.split_heads(k, H), kernels.split_heads(k_diff, H)], axis=1), k_norm)
    values = mx.tile(kernels.split_heads(v, H), (1, 2, 1, 1))
    out = REF.attention(REF.rope(queries, 16, 10000.0), REF.rope(keys, 16, 10000.0), values, D**-0.5)
    main, diff = mx.split(out, 2, axis=1)
    heads_2h = np.array(kernels.merge_heads(main - diff))
    if mx.default_device() == mx.cpu:
        assert np.array_equal(fused, heads_2h)
    else:
        assert_close(fused, heads_2h, atol=ATOL, what="two maps vs 2H heads")


@on_cpu_only
def test_self_attention_value_mask_in_heads_layout():
    """The DiT keeps its value mask as [B, 1, N, 1]; it means the same as [B, N]."""
    qkv = normal(2, 100, 3 * 128, seed=9)
    mask = (mx.arange(100) < 70).astype(mx.float32)
    flat, heads = mx.stack([mask, mx.ones(100)]), mx.stack([mask, mx.ones(100)])[:, None, :, None]
    for backend in (CPU, REF):
        a = backend.self_attention(qkv, 4, 0.2, _rms(1), _rms(2), 16, 10000.0, False, flat)
        b = backend.self_attention(qkv, 4, 0.2, _rms(1), _rms(2), 16, 10000.0, False, heads)
        assert np.array_equal(np.array(a), np.array(b))


@on_cpu_only
@pytest.mark.parametrize("differential", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_dit_self_attention(differential, masked):
    attn = Attention(128, 32, differential=differential, rope_dims=16)
    mx.eval(attn.parameters())
    attn.q_norm.weight = 1 + 0.1 * normal(32, seed=6)
    attn.k_norm.weight = 1 + 0.1 * normal(32, seed=7)
    x = normal(2, 150, 128, seed=8)
    value_mask = None
    if masked:
        value_mask = (mx.arange(150) < 120).astype(mx.float32)[None, None, :, None]
        value_mask = mx.concatenate([value_mask, mx.ones_like(value_mask)])
    got, expected = both(attn, x, value_mask=value_mask)
    assert_close(got, expected, atol=ATOL, what="DiT self-attention")


def _randomize_dyt(attn: SAMEAttention) -> None:
    for norm, seed in ((attn.q_norm, 9), (attn.k_norm, 10)):
        norm.alpha = mx.array([0.7 + 0.1 * seed])
        norm.gamma = 1 + 0.1 * normal(32, seed=seed)
        norm.beta = 0.1 * normal(32, seed=seed + 10)


@on_cpu_only
@pytest.mark.parametrize("window", [None, (1, 1)])
def test_same_attention(window):
    config = SAMEConfig(family="s", role="decoder", dim=128, num_heads=4, head_dim=32, num_blocks=2, ff_inner=64,
                        latent_dim=16, io_channels=32, mapping_kernel=3)
    attn = SAMEAttention(config)
    mx.eval(attn.parameters())
    _randomize_dyt(attn)
    x = normal(30, config.chunk_tokens, 128, seed=11)
    if window is not None:  # SAME-L's banded attention over one long sequence
        x = x.reshape(2, -1, 128)
    got, expected = both(attn, x, window)
    assert_close(got, expected, atol=ATOL, what=f"SAME attention, window {window}")


def test_rope_table_matches_mlx_rope():
    cos, sin = cpu_kernels.rope_table(50, 16, 10000.0)
    x = normal(1, 1, 50, 16)
    half = 8
    a, b = np.array(x)[0, 0, :, :half], np.array(x)[0, 0, :, half:]
    c, s = cos[:, 0, 0], sin[:, 0, 0]
    ours = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    expected = np.array(REF.rope(x, 16, 10000.0))[0, 0]
    # Angles up to 49 rad, formed in fp32 by MLX and in float64 here (measured 7.7e-7).
    assert_close(ours, expected, atol=ATOL, what="RoPE table")


@on_cpu_only
def test_tracing_takes_the_reference(monkeypatch):
    """Inside mx.compile nothing can be evaluated: every fast path falls back to MLX ops."""
    seen = []
    host = cpu_kernels._host

    def spy(x):
        seen.append(result := host(x))
        return result

    monkeypatch.setattr(cpu_kernels, "_host", spy)
    x = normal(4, 100, 300, seed=30)
    qkv = normal(2, 150, 5 * 128, seed=31)
    q, k, v = normal(1, 8, 300, 32, seed=1), normal(1, 8, 40, 32, seed=2), normal(1, 8, 40, 32, seed=3)

    def ops(backend):
        def run(x, qkv, q, k, v):
            return (backend.softmax(x), backend.tanh(x), backend.silu(x), backend.gelu_tanh(x),
                    backend.glu(x, "sin_pi"), backend.attention(q, k, v, 0.2),
                    backend.self_attention(qkv, 4, 0.2, _dyt(1), _dyt(2), 16, 10000.0, True))
        return run

    traced = mx.compile(ops(CPU))(x, qkv, q, k, v)
    assert seen and all(s is None for s in seen)
    for got, expected in zip(traced, ops(REF)(x, qkv, q, k, v)):
        assert_close(np.array(got), np.array(expected), atol=ATOL, what="traced")


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


# ---------------------------------------------------------------- whole models, either backend


@on_cpu_only
@pytest.mark.parametrize("differential", [False, True])
def test_dit_forward(differential):
    config = DiTConfig(io_channels=16, embed_dim=128, depth=2, num_heads=4, head_dim=32, cond_token_dim=32,
                       global_cond_dim=24, local_add_cond_dim=8, num_memory_tokens=4, ff_inner=256,
                       timestep_features_dim=32, differential=differential)
    dit = DiT(config)
    dit.transformer.memory_tokens = normal(4, 128, seed=40)
    for i, layer in enumerate(dit.transformer.layers):
        layer.to_scale_shift_gate = 0.1 * normal(6 * 128, seed=41 + i)
    mx.eval(dit.parameters())
    T = 200
    tokens = normal(2, 12, 32, seed=42)
    cross = mx.concatenate([tokens, mx.broadcast_to(tokens[:, -1:], (2, 50, 32))], axis=1)  # merged repeats
    padding = mx.stack([mx.arange(T) < 150, mx.ones(T, dtype=mx.bool_)]).astype(mx.float32)
    args = (normal(2, 16, T, seed=43), mx.array([0.3, 0.8]), cross, normal(2, 24, seed=44),
            normal(2, T, 8, seed=45), padding)
    got, expected = both(dit, *args)
    assert_close(got, expected, atol=ATOL, what="DiT forward, CPU vs reference")


@on_cpu_only
@pytest.mark.parametrize("family,role", [("s", "decoder"), ("s", "encoder"), ("l", "decoder")])
def test_same_codec(family, role):
    model = build_same(SAMEConfig.tiny(family, role))
    for block in model.blocks:
        _randomize_dyt(block.attn)
    model.new_tokens = normal(1, 1, 64, seed=50)
    mx.eval(model.parameters())
    x = normal(1, 256, 40, seed=51) if role == "decoder" else normal(1, 512, 40 * 16, seed=51)
    got, expected = both(model, x)
    assert_close(got, expected, atol=ATOL, what=f"SAME-{family.upper()} {role}, CPU vs reference")


@on_cpu_only
def test_t5gemma_encoder():
    config = T5GemmaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, vocab_size=100, attn_logit_softcapping=3.0)
    encoder = T5GemmaEncoder(config)
    mx.eval(encoder.parameters())
    ids = mx.random.randint(1, 100, (2, 64), key=mx.random.key(60))
    mask = mx.stack([mx.arange(64) < 40, mx.ones(64, dtype=mx.bool_)]).astype(mx.int32)
    got, expected = both(encoder, ids, mask)
    assert_close(got, expected, atol=ATOL, what="T5Gemma encoder, CPU vs reference")


# ---------------------------------------------------------------- policies


def test_chunk_groups():
    assert REF.chunks_per_group(40, 34) == 40
    assert CPU.chunks_per_group(40, 34) == cpu_kernels.CPU_GROUP_TOKENS // 34
    assert CPU.chunks_per_group(40, 4000) == 1


def test_prepare_lays_out_fp32_weights_only_on_the_cpu():
    module = nn.Module()
    module.a, module.b = nn.Linear(8, 12), nn.Linear(8, 12)
    module.b.set_dtype(mx.float16)
    mx.eval(module.parameters())
    before = {name: (layer.weight, np.array(layer.weight)) for name, layer in (("a", module.a), ("b", module.b))}
    REF.prepare(module)
    assert module.a.weight is before["a"][0] and module.b.weight is before["b"][0]
    CPU.prepare(module)
    assert module.a.weight is not before["a"][0] and np.array_equal(np.array(module.a.weight), before["a"][1])
    assert module.b.weight is before["b"][0]


# ---------------------------------------------------------------- selection


def test_backends_by_device_and_name():
    assert isinstance(CPU, CPUKernels) and type(REF) is Kernels
    assert kernels.by_name("cpu") is CPU and kernels.by_name("MLX") is REF
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.by_name("metal")


def test_for_device(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    gpu = kernels.by_name("cuda") if mx.cuda.is_available() else REF  # Metal: the reference
    assert kernels.for_device(mx.cpu) is CPU
    assert kernels.for_device(mx.Device(mx.DeviceType.gpu)) is gpu
    assert kernels.for_device() is (CPU if mx.default_device() == mx.cpu else gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert isinstance(kernels.for_device(mx.Device(mx.DeviceType.gpu)), CUDAKernels)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert kernels.for_device(mx.Device(mx.DeviceType.gpu)) is REF


@pytest.mark.parametrize("name", ["mlx", "cpu", "cuda"])
def test_env_override(monkeypatch, name):
    monkeypatch.setenv(kernels.ENV_VAR, name)
    expected = kernels.by_name(name)
    assert kernels.for_device(mx.cpu) is expected
    assert kernels.for_device(mx.Device(mx.DeviceType.gpu)) is expected
    monkeypatch.setattr(kernels, "_default", None)  # as in a fresh process
    assert kernels.active() is expected
    monkeypatch.setenv(kernels.ENV_VAR, "metal")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.for_device()


def test_active_is_decided_once(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_default", None)
    first = kernels.active()
    assert first is kernels.for_device()
    monkeypatch.setenv(kernels.ENV_VAR, "mlx" if first is CPU else "cpu")
    assert kernels.active() is first  # the process's choice stands


def test_use_sets_the_backend_for_the_context():
    default = kernels.active()
    other = REF if default is CPU else CPU
    with kernels.use(other) as chosen:
        assert chosen is other and kernels.active() is other
        with kernels.use("cpu"):
            assert kernels.active() is CPU
        assert kernels.active() is other
    assert kernels.active() is default
    with pytest.raises(TypeError):
        with kernels.use(object()):
            pass


def test_use_is_per_thread():
    """A worker thread and the main thread each run their own backend."""
    default = kernels.active()
    ready, done = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def worker():
        seen["start"] = kernels.active()  # a new thread starts with nothing set
        with kernels.use(REF):
            ready.wait()
            seen["inside"] = kernels.active()
            done.wait()

    thread = threading.Thread(target=worker)
    with kernels.use(CPU):
        thread.start()
        ready.wait()
        seen["main"] = kernels.active()
        done.wait()
        thread.join()
    assert seen == {"start": default, "inside": REF, "main": CPU}


def test_the_cpu_layout_is_applied_while_loading_with_the_same_values(golden):
    """Under the CPU backend, load_dit stores fp32 Linear weights transposed as it reads them (no second
    full-size copy); values are those of a plain load, and prepare() then leaves the module alone."""
    from mlx.utils import tree_flatten

    from sa3_mlx.models.dit import load_dit

    path = golden / "dit_sm_tiny_f16.npz"
    with kernels.use("mlx"):
        plain, _, _ = load_dit(path, dtype=mx.float32)
    with kernels.use("cpu"):
        laid_out, _, _ = load_dit(path, dtype=mx.float32)
    assert laid_out.linear_weights_transposed and not getattr(plain, "linear_weights_transposed", False)
    a, b = dict(tree_flatten(plain.parameters())), dict(tree_flatten(laid_out.parameters()))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    before = laid_out.transformer.layers[0].ff.ff[2].weight
    kernels.by_name("cpu").prepare(laid_out)
    assert laid_out.transformer.layers[0].ff.ff[2].weight is before


def test_the_numpy_workers_use_one_blas_thread_also_when_another_thread_calls_them():
    """A generation outside the main thread (a studio job, a batch worker): OpenBLAS's usual setter does
    nothing from there, so split uses the one that does; the count is restored after."""
    workers = cpu_kernels.Workers.shared()
    if workers.count < 2:
        pytest.skip("numpy shares MLX's BLAS, or there is one core")
    before, seen = workers.blas.num_threads, []

    def call():
        workers.split(workers.count, lambda part: seen.append(workers.blas.num_threads))

    caller = threading.Thread(target=call)
    caller.start()
    caller.join()
    if workers.any_thread_blas is None:
        pytest.skip("this OpenBLAS has no openblas_set_num_threads_local")
    assert seen and set(seen) == {1}, seen
    assert workers.blas.num_threads == before


@pytest.mark.parametrize("window", [None, (1, 1)])
def test_local_attention_merged_is_merge_heads_of_the_heads(window):
    ref = kernels.reference()
    q = [mx.random.normal((2, 3, 34, 16), key=mx.random.key(s)) for s in range(2)]
    k = [mx.random.normal((2, 3, 34, 16), key=mx.random.key(10 + s)) for s in range(2)]
    v = mx.random.normal((2, 3, 34, 16), key=mx.random.key(20))
    heads = ref.local_attention(q, k, v, 0.25, window, 17)
    merged = ref.local_attention(q, k, v, 0.25, window, 17, merged=True)
    assert merged.shape == (2, 34, 48)
    assert np.array_equal(np.array(merged), np.array(kernels.merge_heads(heads)))
