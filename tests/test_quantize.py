"""Quantized DiT weights: loading (at load time and from quantized files, strictly), LoRA on a quantized
base, the CLI, API, studio and convert options, and generation on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

import sa3_mlx
from sa3_mlx import convert, kernels, weights
from sa3_mlx.arguments import UsageError
from sa3_mlx.audio import read_metadata
from sa3_mlx.bench import bit_widths, snr_db
from sa3_mlx.models.dit import load_dit
from sa3_mlx.models.layers import QuantizedLinear
from sa3_mlx.pipeline import Pipeline
from sa3_mlx.quantize import RECORD_KEY, Quantization, quantized_arrays, record
from sa3_mlx.weights import NpzWeights, WeightError, save_npz

Q4, Q8, Q4G32 = Quantization(4), Quantization(8), Quantization(4, 32)


@pytest.fixture(scope="module")
def dit_file(golden) -> Path:
    return golden / "dit_sm_tiny_f16.npz"


@pytest.fixture(scope="module")
def case(golden):
    with np.load(golden / "case_dit_small.npz") as f:
        return [mx.array(f[k]) for k in ("x", "t", "cross_attn_cond", "global_cond")]


def quantized_file(dit_file: Path, folder: Path, q: Quantization, name: str = "dit_q.npz", edit=None) -> Path:
    """The tiny DiT written as a quantized file (what sa3 convert --quantize writes), optionally edited."""
    model, _, _ = load_dit(dit_file, quantize=q)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    source = NpzWeights(dit_file)
    arrays = quantized_arrays({k: source[k] for k in source}, q, layers)
    if edit is not None:
        edit(arrays)
    path = folder / name
    save_npz(path, arrays)
    return path


@pytest.mark.parametrize("backend", ["mlx", "cpu"])
def test_quantized_dit_computes_with_its_dequantized_weights(dit_file, case, backend):
    with kernels.use(backend):
        quantized, _, _ = load_dit(dit_file, quantize=Q4)
        layers = [n for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)]
        # Every block linear but the local embedder (257 inputs), nothing outside the blocks.
        assert layers and all(n.startswith("transformer.layers.") and "to_local_embed" not in n for n in layers)
        assert any(n.endswith("ff.ff.0.proj") for n in layers) and any(n.endswith("cross_attn.to_kv") for n in layers)
        dense, _, _ = load_dit(dit_file)
        named = dict(quantized.named_modules())
        dense.update(tree_unflatten([(f"{n}.weight", named[n].dense_weight()) for n in layers]))
        v_q, v_dense, v_ref = (np.array(m(*case)) for m in (quantized, dense, load_dit(dit_file)[0]))
    np.testing.assert_allclose(v_q, v_dense, rtol=0, atol=2e-5 * np.abs(v_dense).max())
    assert 10 < snr_db(v_ref, v_q) < 40  # 4 bits on random weights: ~19 dB, far from the float model


def test_a_quantized_file_loads_as_quantizing_at_load_time(dit_file, case, tmp_path):
    for q in (Q4, Q4G32, Q8):
        path = quantized_file(dit_file, tmp_path, q, f"dit_{q.bits}_{q.group_size}.npz")
        from_file, _, _ = load_dit(path)  # the record says the bits and group size
        at_load, _, _ = load_dit(dit_file, quantize=q)
        assert from_file.quantization == q
        np.testing.assert_array_equal(np.array(from_file(*case)), np.array(at_load(*case)))
    with pytest.raises(WeightError, match="loads only as it is"):
        load_dit(path, quantize=Q4)


def _first_scales(arrays) -> str:
    return next(k for k in arrays if k.endswith(".scales"))


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop(_first_scales(a)), "missing key '.*scales'"),
    (lambda a: a.update({"transformer.layers.0.extra.scales": np.zeros((2, 2), np.float16)}), "unexpected key"),
    (lambda a: a.update({(k := _first_scales(a)): np.full_like(a[k], np.nan)}), "non-finite quantization scales"),
    (lambda a: a.update({(k := _first_scales(a)): a[k][:, :1]}), r"another group size than its record says"),
    (lambda a: a.update({(k := _first_scales(a).replace(".scales", ".weight")): a[k].view(np.float32)}),
     "expected a quantized layer's packed uint32 weight"),
    (lambda a: a.update({RECORD_KEY: np.frombuffer(b"{not json", np.uint8)}), "QUANTIZATION record is damaged"),
    (lambda a: a.update({RECORD_KEY: record(Q4, ["transformer.layers.0.pre_norm"])}), "not a linear layer"),
])
def test_quantized_files_are_loaded_strictly(dit_file, tmp_path, edit, message):
    path = quantized_file(dit_file, tmp_path, Q4, edit=edit)
    with pytest.raises(WeightError, match=message):
        load_dit(path)


def test_a_file_quantized_with_another_group_size_than_recorded_is_refused(dit_file, tmp_path):
    def claim_64(arrays):
        arrays[RECORD_KEY] = record(Q4, json.loads(arrays[RECORD_KEY].tobytes())["layers"])

    path = quantized_file(dit_file, tmp_path, Q4G32, edit=claim_64)  # group 32 tensors, a record saying 64
    with pytest.raises(WeightError, match=r"scales' has shape \[384, 4\], expected \[384, 2\].*one per 64 "
                                          "inputs at 4 bits; the file was quantized with another group size"):
        load_dit(path)


@pytest.fixture(scope="module")
def ckpt(golden) -> Path:
    return golden / "upstream_ckpt"


def test_lora_on_a_quantized_base_requantizes_only_what_it_changes(ckpt, golden, monkeypatch):
    lora_file = golden / "lora" / "lora_b_r2_subset.safetensors"
    settings = dict(seconds=1.0, steps=2, seed=3)
    plain = Pipeline(str(ckpt), progress=False, quantize=Q8).generate("glass", **settings).latents
    with_lora = Pipeline(str(ckpt), progress=False, quantize=Q8, loras=[f"{lora_file}:1.0"])
    adapted = with_lora.generate("glass", **settings).latents
    assert np.abs(adapted - plain).max() > 1e-3
    assert isinstance(with_lora.dit.transformer.layers[0].ff.ff[0].proj, QuantizedLinear)
    changed = []
    real_update = weights.update_strict
    monkeypatch.setattr(weights, "update_strict", lambda module, w, *a, **k: (changed.append(set(w)),
                                                                                real_update(module, w, *a, **k)))
    with_lora.set_lora_strength(0.0)
    np.testing.assert_array_equal(with_lora.generate("glass", **settings).latents, plain)
    with_lora.set_lora_strength(1.0)
    np.testing.assert_array_equal(with_lora.generate("glass", **settings).latents, adapted)
    touched = {k for k in with_lora._stored_dit() if k.endswith(".weight")} & changed[0]
    assert changed[0] == changed[1] and touched and len(changed[0]) < len(list(with_lora._stored_dit())) / 4


def test_convert_quantize_writes_a_file_set_that_loads_quantized(ckpt, golden, tmp_path, sa3):
    code, out, err = sa3("convert", ckpt, tmp_path / "q4", "--quantize", "4")
    assert code == 0, err
    files = {p.name for p in (tmp_path / "q4").iterdir()}
    assert "dit_upstream-ckpt_q4.npz" in files and "dit_upstream-ckpt_f16.npz" not in files
    manifest = json.loads((tmp_path / "q4" / "sa3_model.json").read_text())
    assert manifest["quantization"] == {"bits": 4, "group_size": 64}
    from_files = Pipeline(str(tmp_path / "q4"), progress=False)
    assert from_files.quantize == Q4
    settings = dict(seconds=1.0, steps=2, seed=5)
    direct = Pipeline(str(ckpt), progress=False, quantize=Q4).generate("lofi", **settings)
    np.testing.assert_array_equal(from_files.generate("lofi", **settings).latents, direct.latents)
    with pytest.raises(ValueError, match="loads only as it is"):
        Pipeline(str(tmp_path / "q4"), progress=False, quantize=Q8)
    # A LoRA on a quantized file merges into its dequantized weights and quantizes again.
    lora_file = golden / "lora" / "lora_a_r4_all.safetensors"
    with_lora = Pipeline(str(tmp_path / "q4"), progress=False, loras=[f"{lora_file}:1.0"])
    assert np.abs(with_lora.generate("lofi", **settings).latents - direct.latents).max() > 1e-3
    code, _, err = sa3("convert", ckpt, tmp_path / "x", "--quantize", "3")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "--quantize" in err


def test_quantized_generation_on_the_tiny_bundle(generate, work):
    code, out, err = generate("--prompt", "lofi", "--quantize", "4", "--out", "q.wav")
    assert code == 0, err
    meta = read_metadata(work / "output" / "q.wav")
    assert meta["quantize"] == "4" and meta["quantize_group_size"] == "64"
    code, out, err = generate("--prompt", "lofi", "--quantize", "8", "--quantize-group-size", "32", "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["quantize_group_size"] == "32"
    for bad in (["--quantize", "3"], ["--quantize-group-size", "32"]):
        code, _, err = generate("--prompt", "lofi", *bad)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "--quantize" in err


def test_api_and_studio_take_the_quantization(bundle, tmp_path):
    pipe = sa3_mlx.load("sm-music", weights_dir=bundle, bits=4, group_size=128)
    result = pipe.generate("lofi", seconds=1.0, steps=2, seed=1)
    assert np.isfinite(result.audio).all() and result.settings.quantize == "4"
    plain = Pipeline("sm-music", weights_dir=bundle)
    _ = plain.dit, pipe.dit
    assert pipe.weight_bytes["dit"] < plain.weight_bytes["dit"]
    with pytest.raises(ValueError, match="bits must be one of 8, 4"):
        sa3_mlx.load("sm-music", weights_dir=bundle, bits=3)
    from sa3_mlx.settings import validate
    from sa3_mlx.studio.jobs import Studio

    studio = Studio(tmp_path / "studio", weights_dir=bundle, quantize="8")
    assert studio._get_pipeline(validate({"prompt": "x"})).quantize == Q8


def test_bench_takes_bit_widths(sa3):
    assert bit_widths("16,8,4") == [16, 8, 4] and bit_widths("4") == [4]
    with pytest.raises(UsageError, match="16, 8, 4"):
        bit_widths("3")
    code, _, err = sa3("bench", "--random-weights", "--quantize", "16,3")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 64), (8, 128), (4, 128)])
def test_host_dequantization_equals_mlx(bits, group_size):
    from sa3_mlx.kernels.cpu import dequantize_on_host

    w = mx.random.normal((96, 256), key=mx.random.key(bits * group_size)) * 0.05
    packed, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    expected = np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits))
    got = dequantize_on_host(np.array(packed), np.array(scales), np.array(biases), group_size, bits)
    np.testing.assert_array_equal(got, expected)


def test_quantizing_a_module_in_memory_equals_quantizing_while_loading(dit_file, case):
    from sa3_mlx.quantize import dit_targets, quantize_module

    in_memory, _, _ = load_dit(dit_file)
    quantize_module(in_memory, Q4, dit_targets(in_memory, Q4))  # what random full-size weights go through
    loaded, _, _ = load_dit(dit_file, quantize=Q4)
    np.testing.assert_array_equal(np.array(in_memory(*case)), np.array(loaded(*case)))
