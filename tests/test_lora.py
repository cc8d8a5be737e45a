"""LoRA / DoRA adapters in the upstream format (golden/lora/), merged into the tiny upstream DiT."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from sa3_mlx import lora, upstream

from .util import assert_close, load_case

# DiT outputs with our own timestep features (see test_upstream: fp32 rounding of 2 pi f t, measured 1.2e-3).
ATOL_V = 5e-3
# Merged weights vs upstream's parametrized weight: plain LoRA measures 3e-8, DoRA ~1e-7 (float64 here, fp32 there).
ATOL_WEIGHT = 1e-6
QKV = "transformer.layers.1.self_attn.to_qkv.weight"


@pytest.fixture(scope="module")
def lora_dir(golden):
    return golden / "lora"


@pytest.fixture(scope="module")
def case(lora_dir):
    return load_case(lora_dir, "case_lora.npz")


@pytest.fixture(scope="module")
def model(golden):
    return upstream.load(golden / "upstream_ckpt")


@pytest.fixture(scope="module")
def base(model):
    return {k: v.astype(np.float32) for k, v in model.dit_weights.items()}


@pytest.fixture(scope="module")
def files(lora_dir):
    return {name: lora.read_lora(lora_dir / f"{stem}.safetensors") for name, stem in
            (("A", "lora_a_r4_all"), ("B", "lora_b_r2_subset"), ("D", "dora_rows_r4_layers"))}


def fourier_tolerance(seconds: np.ndarray) -> np.ndarray:
    t = np.clip(seconds, 0, 384) / 384
    return (5e-5 + 2e-8 * 2 * np.pi * 1e4 * t)[:, None, None]


def test_files_are_read(files):
    a, b, d = files["A"], files["B"], files["D"]
    assert (a.adapter_type, a.rank, a.alpha, len(a.tensors)) == ("lora", 4, 8.0, 31)
    assert (b.rank, b.alpha, len(b.tensors)) == (2, 1.0, 8)
    assert (d.adapter_type, len(d.tensors)) == ("dora-rows", 14)
    assert "conditioners.seconds_total.embedder.embedding.1" in a.tensors
    assert b.targets("model.transformer.layers.1.ff.ff.2") and not b.targets("model.transformer.layers.1.cross_attn.to_q")
    assert not b.targets("model.transformer.layers.0.ff.ff.2")


@pytest.mark.parametrize("name, stack", [
    ("A_1.0", [("A", 1.0)]),
    ("A_0.5", [("A", 0.5)]),
    ("AB_1.0_0.7", [("A", 1.0), ("B", 0.7)]),
    ("D_1.0", [("D", 1.0)]),
    ("D_0.5", [("D", 0.5)]),
])
def test_merged_model_matches_upstream(model, base, files, case, name, stack):
    merged = lora.merge(base, [files[f] for f, _ in stack], [s for _, s in stack])
    weights = {**base, **merged}
    key = f"merged_weight_{name}_model.transformer.layers.1.self_attn.to_qkv"
    if key in case:
        assert_close(weights[QKV], case[key], ATOL_WEIGHT, what=f"{name} merged to_qkv")
    dit, conditioner = model.load_dit(weights=weights)
    x, t, cross, global_cond = (mx.array(case[k]) for k in ("x", "t", "cross_attn_cond", "global_cond"))
    assert_close(np.array(dit(x, t, cross, global_cond)), case[f"v_{name}"], ATOL_V, what=f"v {name}")
    # The LoRA changes the prediction far beyond the tolerance (the comparison is not vacuous).
    assert np.abs(case[f"v_{name}"] - case["v_base"]).max() > 20 * ATOL_V
    if f"sec_embed_{name}" in case:
        seconds = case["seconds"]
        err = np.abs(np.array(conditioner.seconds_embedding(seconds.tolist())) - case[f"sec_embed_{name}"])
        assert np.all(err <= fourier_tolerance(seconds)), f"seconds embedding {name}: {err.max()}"


def test_strength_change_without_reloading(base, files):
    stack = lora.LoraStack([files["A"], files["B"]], [1.0, 0.7])
    first = stack.apply(base)[QKV]
    stack.set_strength(0.0)
    np.testing.assert_array_equal(stack.apply(base)[QKV], base[QKV])
    stack.set_strength(0.7, index=1)
    stack.set_strength(1.0, index=0)
    np.testing.assert_array_equal(stack.apply(base)[QKV], first)


def test_spec_parsing():
    assert lora.parse_spec("a.safetensors") == (lora.Path("a.safetensors"), 1.0)
    assert lora.parse_spec("dir/a.safetensors:0.5") == (lora.Path("dir/a.safetensors"), 0.5)
    assert lora.parse_spec("C:/x/a.safetensors") == (lora.Path("C:/x/a.safetensors"), 1.0)


def write_lora(path, tensors, config):
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(path),
              metadata={"lora_config": json.dumps(config)})
    return path


def test_unknown_module_is_an_error(tmp_path, base):
    mark = ".parametrizations.weight.0."
    path = write_lora(tmp_path / "x.safetensors", {
        f"model.transformer.layers.7.self_attn.to_qkv{mark}lora_A": np.zeros((2, 128)),
        f"model.transformer.layers.7.self_attn.to_qkv{mark}lora_B": np.zeros((384, 2)),
    }, {"rank": 2, "alpha": 2, "adapter_type": "lora"})
    with pytest.raises(lora.LoraError, match="layers.7.self_attn.to_qkv"):
        lora.merge(base, [lora.read_lora(path)], [1.0])


def test_wrong_shape_is_an_error(tmp_path, base):
    mark = ".parametrizations.weight.0."
    path = write_lora(tmp_path / "x.safetensors", {
        f"model.transformer.layers.0.self_attn.to_out{mark}lora_A": np.zeros((2, 64)),
        f"model.transformer.layers.0.self_attn.to_out{mark}lora_B": np.zeros((128, 2)),
    }, {"rank": 2, "alpha": 2, "adapter_type": "lora"})
    with pytest.raises(lora.LoraError, match=r"to_out.*lora_A has shape \[2, 64\]"):
        lora.merge(base, [lora.read_lora(path)], [1.0])


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "adapter.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(lora.LoraError, match="convert_lora_ckpt_to_safetensors"):
        lora.read_lora(path)


def test_lora_xs_uses_svd_bases_of_the_base_weight(tmp_path, base):
    """lora-xs: W + s * scale * U M V^T, U, V the top singular vectors with the largest |U| entry positive.

    The off-diagonal entry of M makes the result depend on that sign convention."""
    mark = ".parametrizations.weight.0."
    module = "model.transformer.layers.0.ff.ff.2"
    m_xs = np.array([[1.0, 0.3, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, 0.5]], np.float32)
    path = write_lora(tmp_path / "xs.safetensors", {f"{module}{mark}M_xs": m_xs},
                      {"rank": 3, "alpha": 6, "adapter_type": "lora-xs"})
    merged = lora.merge(base, [lora.read_lora(path)], [0.5])
    w0 = base["transformer.layers.0.ff.ff.2.weight"].astype(np.float64)
    u, _, vh = np.linalg.svd(w0, full_matrices=False)
    u, v = u[:, :3], vh[:3].T
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(3)])
    u, v = u * signs, v * signs
    expected = 0.5 * (6 / 3) * u @ m_xs.astype(np.float16).astype(np.float64) @ v.T  # stored fp16
    delta = merged["transformer.layers.0.ff.ff.2.weight"] - w0
    # The merged weight is stored fp32: one rounding of values up to max|W|.
    assert_close(delta, expected, np.finfo(np.float32).eps * np.abs(w0).max(), what="lora-xs delta")
    assert np.abs(expected).max() > 1e-2


@pytest.mark.parametrize("adapter_type, magnitude_shapes", [
    ("dora-cols", {"magnitude": "in"}),
    ("bora", {"magnitude_r": "out", "magnitude_c": "in"}),
])
def test_column_and_bidirectional_dora(tmp_path, base, adapter_type, magnitude_shapes):
    """Trained magnitudes set the column (and row) norms of the merged weight; strength 0 leaves W."""
    mark = ".parametrizations.weight.0."
    module, key = "model.transformer.layers.0.self_attn.to_out", "transformer.layers.0.self_attn.to_out.weight"
    w0 = base[key].astype(np.float64)
    rng = np.random.default_rng(1)
    sizes = {"in": w0.shape[1], "out": w0.shape[0]}
    magnitudes = {name: rng.uniform(0.5, 2.0, sizes[axis]) for name, axis in magnitude_shapes.items()}
    tensors = {f"{module}{mark}lora_A": rng.standard_normal((2, 128)) * 0.1,
               f"{module}{mark}lora_B": rng.standard_normal((128, 2)) * 0.1,
               **{f"{module}{mark}{name}": value for name, value in magnitudes.items()}}
    path = write_lora(tmp_path / "d.safetensors", tensors, {"rank": 2, "alpha": 2, "adapter_type": adapter_type})
    adapter = lora.read_lora(path)
    merged = lora.merge(base, [adapter], [1.0])[key].astype(np.float64)
    stored = {name: value.astype(np.float16).astype(np.float64) for name, value in magnitudes.items()}
    column = stored["magnitude"] if adapter_type == "dora-cols" else stored["magnitude_c"]
    np.testing.assert_allclose(np.linalg.norm(merged, axis=0), column, rtol=1e-5)
    np.testing.assert_array_equal(lora.merge(base, [adapter], [0.0])[key], base[key])
