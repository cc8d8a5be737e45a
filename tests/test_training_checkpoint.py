"""Checkpoints in upstream's saved format (golden/train/lora_*_step1.safetensors), read back by our loader."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from sa3_mlx import lora, upstream
from sa3_mlx.training import checkpoint
from sa3_mlx.training.adapters import AdapterConfig, LoraParametrization
from sa3_mlx.training.optimizer import AdamW

from .util import load_case

CASES = ("lora", "dora-rows", "lora-xs", "bora", "lora_filtered", "trainlora")


def _config(case) -> AdapterConfig:
    c = json.loads(str(case["lora_config_json"]))
    tup = (lambda v: None if v is None else tuple(v))
    return AdapterConfig(c["adapter_type"], c["rank"], c["alpha"], tup(c["include"]), tup(c["exclude"]))


@pytest.mark.parametrize("name", CASES)
def test_file_is_upstreams(golden, tmp_path, name):
    """From the tensors after step 1: the same file, byte for byte (keys, fp16, metadata); with
    step/epoch/base model the same keys and tensors, and upstream's config fields unchanged."""
    case = load_case(golden / "train", f"case_train_{name}.npz")
    after = {k[len("after/"):]: v for k, v in case.items() if k.startswith("after/")}
    ours = checkpoint.save_lora(tmp_path / "a.safetensors", after, _config(case))
    reference = golden / "train" / f"lora_{name}_step1.safetensors"
    assert ours.read_bytes() == reference.read_bytes()

    extra = checkpoint.save_lora(tmp_path / "b.safetensors", after, _config(case),
                                 extra={"step": 1, "epoch": 0, "base_model": "upstream_ckpt"})
    with safe_open(str(extra), "np") as f, safe_open(str(reference), "np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert set(f.metadata()) == set(g.metadata()) == {"lora_config"}
        mine, theirs = json.loads(f.metadata()["lora_config"]), json.loads(g.metadata()["lora_config"])
        assert {k: mine[k] for k in theirs} == theirs and mine["step"] == 1
        for key in g.keys():
            assert f.get_tensor(key).dtype == np.float16
            np.testing.assert_array_equal(f.get_tensor(key), g.get_tensor(key))
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files are left"


def test_trained_file_loads_and_equals_merging_by_hand(golden, tmp_path):
    """A LoRA trained here (dora-rows, a few steps) read by sa3_mlx.lora and merged gives the same
    DiT output as the training parametrization with the same (fp16-rounded) tensors."""
    model = upstream.load(golden / "upstream_ckpt")
    case = load_case(golden / "train", "case_train_dora-rows.npz")
    config = AdapterConfig("dora-rows", 4, 8)
    lp = LoraParametrization.build(model.dit_weights, config)
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    opt = AdamW(lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    for _ in range(3):  # any non-trivial tensors will do; random "gradients"
        params, _ = opt.update(params, {k: mx.array(rng.standard_normal(v.shape).astype(np.float32))
                                        for k, v in params.items()})
    path = checkpoint.save_lora(tmp_path / "t.safetensors", params, config, extra={"step": 3})
    loaded = lora.read_lora(path)
    assert (loaded.adapter_type, loaded.rank, loaded.alpha) == ("dora-rows", 4, 8.0)
    base = {k: v.astype(np.float32) for k, v in model.dit_weights.items()}
    merged = {**base, **lora.merge(base, [loaded], [1.0])}

    rounded = {k: mx.array(np.asarray(v).astype(np.float16).astype(np.float32)) for k, v in params.items()}
    by_hand = {**base, **{k: np.array(v) for k, v in lp.weights(rounded).items()}}
    assert set(lora.merge(base, [loaded], [1.0])) == {t.key for t in lp.targets}
    x, t = mx.array(case["x0"]), mx.array(case["t"])
    cross, glob = mx.array(case["cross_attn_cond"]), mx.array(case["global_cond"])
    outs = []
    for weights in (merged, by_hand):
        dit, _ = model.load_dit(weights=weights)
        outs.append(np.array(dit(x, t, cross, glob)))
    base_dit, _ = model.load_dit()
    v_base = np.array(base_dit(x, t, cross, glob))
    assert np.abs(outs[0] - v_base).max() > 0.05, "the LoRA changes the output"
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-5 * np.abs(v_base).max())


def test_state_round_trip(tmp_path):
    params = {"a.parametrizations.weight.0.lora_A": mx.array(np.arange(6, dtype=np.float32).reshape(2, 3))}
    opt = AdamW()
    params, _ = opt.update(params, {k: mx.ones_like(v) for k, v in params.items()})
    checkpoint.save_state(tmp_path, params, opt.arrays(), {"step": opt.step, "order": [1, 0]})
    p2, o2, info = checkpoint.load_state(tmp_path)
    assert info == {"step": 1, "order": [1, 0]}
    np.testing.assert_array_equal(np.array(p2["a.parametrizations.weight.0.lora_A"]),
                                  np.array(params["a.parametrizations.weight.0.lora_A"]))
    restored = AdamW()
    restored.load_arrays(o2, info["step"])
    for name, (m, v) in opt.state.items():
        np.testing.assert_array_equal(np.array(restored.state[name][0]), np.array(m))
        np.testing.assert_array_equal(np.array(restored.state[name][1]), np.array(v))
    with pytest.raises(FileNotFoundError):
        checkpoint.load_state(tmp_path / "nothing")
