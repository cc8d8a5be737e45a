"""The CPU's bf16 products through oneDNN (sa3_mlx/kernels/onednn.py): the ctypes binding against numpy,
the layers and the pipeline's ``--dit-dtype bf16`` with it, the fp32 fallback without it, and the
OpenMP setting made before libgomp can load."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sa3_mlx import backend, kernels
from sa3_mlx.kernels import cpu, onednn
from tests.util import load_case

AVAILABLE, WHY = onednn.status()
needs_onednn = pytest.mark.skipif(not AVAILABLE, reason=f"oneDNN bf16 products unavailable here: {WHY}")


def snr_db(reference, x) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    return float(10 * np.log10(np.sum(reference**2) / np.sum((np.asarray(x, dtype=np.float64) - reference) ** 2)))


def exact_bf16_product(x: np.ndarray, bits: np.ndarray, bias=None) -> np.ndarray:
    """What the kernel computes: x rounded to bf16 (nearest even), times the bf16 weight, summed in float64."""
    y = onednn.bf16_values(onednn.bf16_bits(x)).astype(np.float64) @ onednn.bf16_values(bits).astype(np.float64).T
    return y if bias is None else y + bias


# ---------------------------------------------------------------- numpy-only helpers (run everywhere)


def test_bf16_rounding_is_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -2.5, 3.0e38, 1e-40], dtype=np.float32)
    bits = onednn.bf16_bits(x)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1); 1 + 3 * 2^-8 rounds up.
    assert onednn.bf16_values(bits).tolist() == pytest.approx([1.0, 1.0, 1.0 + 2**-6, 1.0, -2.5, 2.9999e38, 1e-40],
                                                              rel=1e-2)
    assert onednn.bf16_values(bits)[:4].tolist() == [1.0, 1.0, 1.0 + 2**-6, 1.0]
    assert bits.dtype == np.uint16
    # Every bf16 value survives the round trip exactly.
    all_bits = np.arange(0, 0x7F80, 7, dtype=np.uint16)
    assert np.array_equal(onednn.bf16_bits(onednn.bf16_values(all_bits)), all_bits)


def test_cpu_flags_are_read_from_cpuinfo():
    assert onednn.cpu_has_bf16("processor : 0\nflags : fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert onednn.cpu_has_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not onednn.cpu_has_bf16("flags : fpu sse avx2 avx512f avx512_vnni\n")
    assert not onednn.cpu_has_bf16("")


# ---------------------------------------------------------------- when the path is not there


def _probe_with(monkeypatch, **env) -> tuple[bool, str]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(onednn, "_status", None)
    monkeypatch.setattr(onednn, "_lib", None)
    return onednn.status()


def test_switched_off_by_the_environment(monkeypatch):
    ok, why = _probe_with(monkeypatch, SA3_ONEDNN="0")
    assert not ok and why == "disabled by SA3_ONEDNN=0"


def test_a_missing_library_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "cpu_has_bf16", lambda cpuinfo=None: True)
    monkeypatch.setattr(onednn.sys, "platform", "linux")
    monkeypatch.setattr(onednn.platform, "machine", lambda: "x86_64")
    ok, why = _probe_with(monkeypatch, SA3_ONEDNN_LIB=str(tmp_path / "libdnnl.so.3"))
    assert not ok and "libdnnl.so.3 not found" in why
    with pytest.raises(onednn.OneDNNError, match="not available"):
        onednn.BF16Weight(np.zeros((4, 4), np.uint16))


def test_other_systems_load_nothing(monkeypatch):
    monkeypatch.setattr(onednn.sys, "platform", "darwin")
    ok, why = _probe_with(monkeypatch)
    assert not ok and why.startswith("needs Linux on x86-64")
    monkeypatch.setattr(onednn.sys, "platform", "linux")
    monkeypatch.setattr(onednn.platform, "machine", lambda: "aarch64")
    assert not _probe_with(monkeypatch)[0]
    monkeypatch.setattr(onednn.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(onednn, "cpu_has_bf16", lambda cpuinfo=None: False)
    ok, why = _probe_with(monkeypatch)
    assert not ok and "no native bf16" in why


def test_without_onednn_bf16_is_mlx_bf16_and_fp32_is_unchanged(monkeypatch):
    """No library (or another CPU): the CPU backend asks for no fp32 stand-in and converts nothing."""
    monkeypatch.setattr(onednn, "_status", (False, "absent for this test"))
    backend_ = cpu.CPUKernels()
    assert backend_.compute_dtype(mx.bfloat16) == mx.bfloat16
    assert backend_.compute_dtype(mx.float32) == mx.float32
    layer = nn.Linear(64, 32)
    x = mx.random.normal((8, 64))
    expected = layer(x)
    backend_.prepare(layer, mx.bfloat16)
    assert type(layer) is nn.Linear and layer.weight.dtype == mx.float32
    assert layer.linear_weights_transposed  # the fp32 layout, as without a precision
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), atol=1e-6)


def test_the_reference_backend_ignores_the_precision():
    ref = kernels.reference()
    assert ref.compute_dtype(mx.bfloat16) == mx.bfloat16 and ref.compute_dtype(mx.float16) == mx.float16
    layer = nn.Linear(16, 16)
    weight = layer.weight
    ref.prepare(layer, mx.bfloat16)
    assert type(layer) is nn.Linear and layer.weight is weight


# ---------------------------------------------------------------- the OpenMP setting


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="set on Linux x86-64 only")
def test_openmp_threads_sleep_unless_the_user_chose():
    code = "import os, sa3_mlx; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_openmp_setting_is_linux_x86_only(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(backend.sys, "platform", "darwin")
    assert not backend.passive_openmp() and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(backend.sys, "platform", "linux")
    monkeypatch.setattr(backend.platform, "machine", lambda: "aarch64")
    assert not backend.passive_openmp() and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(backend.platform, "machine", lambda: "x86_64")
    assert backend.passive_openmp() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


@needs_onednn
def test_libgomp_was_not_loaded_before_the_setting():
    """libgomp reads OMP_WAIT_POLICY once, when it loads: it must not be in the process before sa3_mlx."""
    code = ("import sys; maps = open('/proc/self/maps').read(); before = 'libgomp' in maps; import sa3_mlx, os; "
            "from sa3_mlx.kernels import onednn; onednn.status(); "
            "print(before, os.environ['OMP_WAIT_POLICY'], 'libgomp' in open('/proc/self/maps').read())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "PASSIVE", "True"]


# ---------------------------------------------------------------- the binding


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_binding_equals_the_exact_bf16_product(bias):
    rng = np.random.default_rng(0)
    k, n = 96, 80
    bits = onednn.bf16_bits(rng.standard_normal((n, k), dtype=np.float32))
    b = rng.standard_normal(n, dtype=np.float32) if bias else None
    weight = onednn.BF16Weight(bits, b)
    for m in (1, 7, 64, 7, 300):  # a repeated row count reuses its plan
        x = rng.standard_normal((m, k), dtype=np.float32)
        y = weight(x)
        assert y.shape == (m, n) and y.dtype == np.float32
        np.testing.assert_allclose(y, exact_bf16_product(x, bits, b), rtol=0, atol=2e-5)
    assert "bf16" in weight.implementation(64) or "amx" in weight.implementation(64)
    out = np.empty((5, n), np.float32)
    assert weight(rng.standard_normal((5, k), dtype=np.float32), out=out) is out
    with pytest.raises(ValueError, match="expected x of shape"):
        weight(np.zeros((3, k + 1), np.float32))


@needs_onednn
def test_plans_are_bounded_per_weight():
    rng = np.random.default_rng(1)
    bits = onednn.bf16_bits(rng.standard_normal((16, 32), dtype=np.float32))
    weight = onednn.BF16Weight(bits)
    for m in range(1, 3 * onednn._PLANS_PER_WEIGHT):
        x = rng.standard_normal((m, 32), dtype=np.float32)
        np.testing.assert_allclose(weight(x), exact_bf16_product(x, bits), atol=1e-5)
    assert len(weight._plans) == onednn._PLANS_PER_WEIGHT


@needs_onednn
def test_a_full_size_product_is_within_bf16_accuracy_of_fp32():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((1024, 1024), dtype=np.float32) / 32
    x = rng.standard_normal((400, 1024), dtype=np.float32)
    y = onednn.BF16Weight(onednn.bf16_bits(w))(x)
    assert snr_db(x @ w.T, y) > 50  # two bf16 roundings (8-bit mantissas), fp32 sums: ~55 dB measured


@needs_onednn
def test_the_shared_scratch_leaves_every_result_intact():
    """The bf16 copy of x lives in one buffer for all products (grown to the largest): results of
    earlier calls, other weights and other row counts, and of other threads stay what they were."""
    import threading

    rng = np.random.default_rng(5)
    sizes = [(96, 80, True), (256, 48, False), (32, 512, True)]  # (in, out, bias)
    weights = []
    for k, n, bias in sizes:
        bits = onednn.bf16_bits(rng.standard_normal((n, k), dtype=np.float32))
        b = rng.standard_normal(n, dtype=np.float32) if bias else None
        weights.append((onednn.BF16Weight(bits, b), bits, b))
    live = []
    for m in (300, 3, 64, 1, 300, 17):  # the scratch grows, then smaller products reuse it
        for weight, bits, b in weights:
            x = rng.standard_normal((m, weight.k), dtype=np.float32)
            live.append((weight(x), x, bits, b))
    assert len({y.ctypes.data for y, *_ in live}) == len(live)  # a new output per call
    for y, x, bits, b in live:  # all checked after the last call
        np.testing.assert_allclose(y, exact_bf16_product(x, bits, b), rtol=0, atol=2e-5)

    errors = []

    def worker(seed: int) -> None:
        r = np.random.default_rng(seed)
        for _ in range(20):
            weight, bits, b = weights[int(r.integers(len(weights)))]
            x = r.standard_normal((int(r.integers(1, 200)), weight.k), dtype=np.float32)
            if not np.allclose(weight(x), exact_bf16_product(x, bits, b), rtol=0, atol=2e-5):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------- layers and the pipeline


@needs_onednn
def test_linear_layers_become_bf16_with_half_the_bytes():
    mx.random.seed(3)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 128, bias=False))
    x = mx.random.normal((40, 256))
    expected = model(x)
    cpu.store_linear_weights_transposed(model)  # the fp32 layout the CPU backend keeps: any strides work
    fp32_bytes = sum(layer.weight.nbytes for layer in model.layers)
    assert onednn.use_bf16_products(model) == 2
    gc.collect()
    assert all(type(layer) is onednn.BF16Linear and layer.weight.dtype == mx.bfloat16 for layer in model.layers)
    assert sum(layer.weight.nbytes for layer in model.layers) * 2 == fp32_bytes
    y = model(x)
    assert y.dtype == mx.float32 and snr_db(np.array(expected), np.array(y)) > 45
    first = model.layers[0]
    h = exact_bf16_product(np.array(x), np.array(first.weight.view(mx.uint16)), np.array(first.bias))
    np.testing.assert_allclose(np.array(first(x)), h, atol=2e-5)
    # Inside mx.compile the layer takes MLX's product with the same bf16 weight.
    compiled = mx.compile(lambda a: model(a))
    assert snr_db(np.array(y), np.array(compiled(x))) > 45
    # Parameters replaced afterwards (module.update) are read again.
    first.update({"weight": mx.zeros_like(first.weight)})
    np.testing.assert_allclose(np.array(first(x)), np.broadcast_to(np.array(first.bias), (40, 512)), atol=0)


@needs_onednn
def test_the_glu_adds_the_bias_in_the_product():
    mx.random.seed(4)
    proj = nn.Linear(128, 2 * 96)
    x = mx.random.normal((2, 150, 128))
    expected = kernels.reference().glu(proj(x), "silu")
    onednn.use_bf16_products(proj)
    backend_ = cpu.CPUKernels()
    got = backend_.linear_glu(x, proj, "silu")
    assert snr_db(np.array(expected), np.array(got)) > 40
    # The numpy product goes straight into the host GLU (no MLX copy between): the same bits as the GLU
    # of the layer's MLX output, for both activations, and for an input too small for the host GLU.
    for shape in ((2, 150, 128), (1, 3, 128)):
        x = mx.random.normal(shape)
        for activation in kernels.GLU_ACTIVATIONS:
            via_mlx = np.array(backend_.glu(proj(x), activation))
            direct = np.array(backend_.linear_glu(x, proj, activation))
            assert direct.shape == via_mlx.shape == (*shape[:-1], 96)
            assert np.array_equal(direct.view(np.uint32), via_mlx.view(np.uint32))
    host = proj.host_product(x)
    assert isinstance(host, np.ndarray) and host.shape == (1, 3, 2 * 96)
    assert np.array_equal(host, np.array(proj(x)))


@needs_onednn
def test_pipeline_bf16_on_the_cpu_runs_the_dit_products_in_bf16(golden):
    """``--dit-dtype bf16`` on this CPU: the DiT is loaded in fp32 and its linear layers get bf16 weights; the
    reference case's latents stay within bf16 accuracy of the official fp32 run (45 dB measured; fp32: 63)."""
    from sa3_mlx.denoiser import Denoiser
    from sa3_mlx.models.dit import load_dit
    from sa3_mlx.sampling import Guidance, pingpong_schedule

    backend_ = kernels.by_name("cpu")
    assert backend_.compute_dtype(mx.bfloat16) == mx.float32
    with kernels.use(backend_):
        dit, _, _ = load_dit(golden / "dit_sm_tiny_f16.npz", dtype=backend_.compute_dtype(mx.bfloat16))
        backend_.prepare(dit, mx.bfloat16)
        linears = [m for _, m in dit.named_modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is onednn.BF16Linear for m in linears)
        assert dit.dtype == mx.float32
        case = load_case(golden, "case_pipeline_t2a.npz")
        noise = mx.array(case["supplied_noise"])
        latents = Denoiser(dit, compile_steps=False).sample(
            noise[:1], pingpong_schedule(8, 1.0), mx.array(case["cross_attn_batched"]),
            mx.array(case["global_cond_batched"]), None, Guidance(), lambda i, shape, dtype: noise[i + 1][None])
    assert latents.dtype == mx.float32
    assert snr_db(case["latents"], np.array(latents)) > 40


def tiny_pipelines(bundle, **dtypes):
    """The tiny bundle's pipeline with ``dtypes`` and the fp32 one, and a short run of each: (pipelines, results)."""
    from sa3_mlx.pipeline import Pipeline

    pipes = [Pipeline("sm-music", weights_dir=bundle, progress=False, **d) for d in (dtypes, {})]
    if pipes[0].kernels.name != "cpu":
        pytest.skip("the bf16 products are the CPU backend's")
    return pipes, [p.generate("lofi house loop", seconds=1.0, steps=2, seed=3) for p in pipes]


@needs_onednn
def test_pipeline_dtype_plumbing(bundle):
    (pipe, _), (result, fp32) = tiny_pipelines(bundle, dit_dtype=mx.bfloat16)
    assert pipe.dit_compute_dtype == mx.float32 and pipe.dtype_name == "bf16"
    assert any(type(m) is onednn.BF16Linear for _, m in pipe.dit.named_modules())
    assert result.settings.dit_dtype == "bf16" and np.isfinite(result.audio).all()
    assert snr_db(fp32.latents, result.latents) > 35


# The reference cases' codecs with bf16 products against the official fp32 outputs, measured: SAME-S decoder
# 53.8 dB, encoder 50.7; SAME-L decoder 48.2, encoder 50.1 (fp32: 126-131 dB; MLX's own bf16: 40-42 dB).
CODEC_BF16_SNR_DB = 46.0


@needs_onednn
@pytest.mark.parametrize("family", ["s", "l"])
@pytest.mark.parametrize("role", ["decoder", "encoder"])
def test_codecs_with_bf16_products_are_within_bf16_accuracy_of_the_golden(golden, family, role):
    from tests.test_same import load_tiny

    backend_ = kernels.by_name("cpu")
    case = load_case(golden, f"case_same_{family}_{role}.npz")
    with kernels.use(backend_):
        model = load_tiny(golden, family, role)
        backend_.prepare(model, mx.bfloat16)
        linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is onednn.BF16Linear for m in linears)
        out = model(mx.array(case["latents" if role == "decoder" else "audio_patches"]))
    assert out.dtype == mx.float32
    assert snr_db(case["patches" if role == "decoder" else "latents"], np.array(out)) > CODEC_BF16_SNR_DB


@needs_onednn
def test_pipeline_codec_bf16_on_the_cpu_runs_the_codec_products_in_bf16(bundle):
    (pipe, fp32), (result, plain) = tiny_pipelines(bundle, codec_dtype=mx.bfloat16)
    assert pipe.codec_compute_dtype == mx.float32 and pipe.codec_dtype_name == "bf16"
    for part in (pipe.decoder, pipe.encoder):
        assert all(type(m) is onednn.BF16Linear for _, m in part.named_modules() if isinstance(m, nn.Linear))
    assert result.settings.codec_dtype == "bf16" and result.audio.dtype == np.float32
    assert np.array_equal(result.latents, plain.latents)  # the DiT is untouched
    assert snr_db(plain.audio, result.audio) > CODEC_BF16_SNR_DB
    audio = plain.audio[0]
    assert snr_db(fp32.encode_audio(audio), pipe.encode_audio(audio)) > CODEC_BF16_SNR_DB
