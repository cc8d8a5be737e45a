"""Prompt padding, the seconds embedding and the assembled DiT conditioning."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx.conditioning import load_conditioner
from sa3_mlx.models.dit import load_dit
from sa3_mlx.models.t5gemma import load_t5gemma
from sa3_mlx.weights import WeightError
from tests.util import assert_close, load_case


@pytest.fixture(scope="module")
def conditioner(golden):
    _, _, cond_weights = load_dit(golden / "dit_sm_tiny_f16.npz")
    return load_conditioner(cond_weights, "dit_sm_tiny_f16.npz")


@pytest.fixture(scope="module")
def upstream(golden):
    return load_case(golden / "upstream_ckpt", "case_upstream.npz")


def fourier_tolerance(seconds: np.ndarray) -> np.ndarray:
    """Per-value tolerance: the Fourier argument reaches 2 pi 1e4 t (t = seconds / 384), and a
    few-ulp difference in the fp32 frequency constants (ours are correctly rounded, torch's
    come from its own linspace/exp) moves a feature by ~ ulp(argument) ~ 2e-8 x argument."""
    t = np.clip(seconds, 0, 384) / 384
    return (5e-5 + 2e-8 * 2 * np.pi * 1e4 * t)[:, None, None]


def test_seconds_embedding_matches_pytorch(conditioner, upstream):
    # The upstream checkpoint carries the same conditioner weights (fp16) as the tiny DiT file.
    for key in ("cond_seconds", "cond_seconds_more"):  # 1.5/30 s; 0/190/500 s (500 clamps to 384)
        seconds = upstream[key]
        ours = np.array(conditioner.seconds_embedding(seconds.tolist()))
        err = np.abs(ours - upstream[f"{key}_embed"])
        assert np.all(err <= fourier_tolerance(seconds)), f"seconds embedding {seconds}: errors {err.max(axis=(1, 2))}"


def test_assembled_conditioning_matches_pytorch(conditioner, upstream):
    embeds = mx.array(upstream["cond_t5_last_hidden_state"])
    mask = mx.array(upstream["cond_attention_mask"])
    padded = np.array(conditioner.pad_prompt(embeds, mask))
    assert_close(padded, upstream["cond_prompt_embeds"], atol=0, what="learned padding")
    cross, glob = conditioner.build(embeds, mask, upstream["cond_seconds"].tolist())
    assert_close(np.array(cross), upstream["cond_cross_attn_cond"], atol=5e-5, what="cross_attn_cond")
    assert_close(np.array(glob), upstream["cond_global_cond"], atol=5e-5, what="global_cond")
    zeros = np.array(conditioner.pad_prompt(embeds, mask, mode="zeros"))
    pads = upstream["cond_attention_mask"] == 0
    assert not zeros[pads].any() and np.array_equal(zeros[~pads], upstream["cond_t5_last_hidden_state"][~pads])


def test_official_port_conditioning_from_the_prompt(golden, conditioner):
    """Prompt -> T5Gemma (port's raw tokens) -> learned padding + seconds token == the port's pipeline input.

    The port casts T5Gemma's embedding output to fp16 (reference README: 5.6e-3 max abs
    against fp32), which we do not; that bounds the agreement.
    """
    encoder, tokenizer, _ = load_t5gemma(golden / "t5gemma_tiny_f16.npz")
    case = load_case(golden, "case_pipeline_cfg_apg.npz")
    ids, mask = tokenizer.encode(["lofi house loop 120 BPM", "drums and vocals"], max_length=256, add_bos=False)
    embeds = encoder(mx.array(ids), mx.array(mask))
    cross, glob = conditioner.build(embeds, mx.array(mask), [1.5, 1.5])
    assert_close(np.array(cross), case["cross_attn_batched"], atol=6e-3, what="cross_attn (port path)")
    assert_close(np.array(glob), case["global_cond_batched"], atol=5e-5, what="global cond")


def test_conditioner_loading_is_strict(golden):
    _, _, cond_weights = load_dit(golden / "dit_sm_tiny_f16.npz")
    broken = dict(cond_weights)
    del broken["seconds_total_bias"]
    with pytest.raises(WeightError, match="cond.seconds_total_bias"):
        load_conditioner(broken, "x.npz")
    broken = dict(cond_weights, padding_embedding=np.zeros(7, np.float16))
    with pytest.raises(WeightError, match="cond.padding_embedding"):
        load_conditioner(broken, "x.npz")
