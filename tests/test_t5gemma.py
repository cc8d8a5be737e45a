"""T5Gemma encoder + tokenizer against the golden case and a numpy reference of the math."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx.models.t5gemma import T5GemmaConfig, load_t5gemma
from sa3_mlx.weights import WeightDict, WeightError

from .util import assert_close, load_case

WEIGHTS_FILE = "t5gemma_tiny_f16.npz"
MAX_LENGTH = 256  # the length the golden case was tokenized to

# MLX fp32 vs the HF PyTorch encoder: README measures 4.1e-6 max abs (outputs up to ~4).
# 5e-5 leaves room for other backends' summation order without hiding a real bug.
ATOL = 5e-5


def golden_weights(golden) -> WeightDict:
    with np.load(golden / WEIGHTS_FILE) as f:
        return WeightDict({k: f[k] for k in f.files}, WEIGHTS_FILE)


@pytest.fixture(scope="module")
def case(golden) -> dict[str, np.ndarray]:
    return load_case(golden, "case_t5gemma.npz")


@pytest.fixture(scope="module")
def prompts(case) -> list[str]:
    return [str(p) for p in case["prompts"]]


@pytest.fixture(scope="module")
def model(golden):
    return load_t5gemma(golden_weights(golden))


# ---------------------------------------------------------------- numpy reference


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_encoder(
    weights: dict, config: T5GemmaConfig, ids: np.ndarray, mask: np.ndarray, inv_freq: np.ndarray
) -> np.ndarray:
    """The encoder written out in float64 numpy, K/V heads copied with np.repeat (HF repeat_kv)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items() if k.endswith(".weight")}
    B, S = ids.shape
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def norm(x, key):
        rms = np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + config.rms_norm_eps)
        return x / rms * (1.0 + w[key])

    angles = np.arange(S)[:, None] * np.asarray(inv_freq, dtype=np.float64)[None, :]
    cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))

    def rope(x):
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def split(x, n):
        return x.reshape(B, S, n, D).transpose(0, 2, 1, 3)

    key_bias = np.where(mask > 0, 0.0, -1e9)[:, None, None, :]
    h = w["embed_tokens.weight"][ids] * math.sqrt(config.hidden_size)
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        x = norm(h, p + "pre_self_attn_layernorm.weight")
        q = rope(split(x @ w[p + "self_attn.q_proj.weight"].T, H))
        k = np.repeat(rope(split(x @ w[p + "self_attn.k_proj.weight"].T, KV)), H // KV, axis=1)
        v = np.repeat(split(x @ w[p + "self_attn.v_proj.weight"].T, KV), H // KV, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) * config.query_pre_attn_scalar**-0.5
        cap = config.attn_logit_softcapping
        scores = np.tanh(scores / cap) * cap + key_bias
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, H * D)
        h = h + norm(attn @ w[p + "self_attn.o_proj.weight"].T, p + "post_self_attn_layernorm.weight")

        x = norm(h, p + "pre_feedforward_layernorm.weight")
        gated = gelu_tanh(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + norm(gated @ w[p + "mlp.down_proj.weight"].T, p + "post_feedforward_layernorm.weight")
    return norm(h, "norm.weight")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_raw_matches_official_port(model, case, prompts):
    _, tokenizer, _ = model
    ids, mask = tokenizer.encode(prompts, MAX_LENGTH, add_bos=False)
    np.testing.assert_array_equal(np.array(ids), case["input_ids"])
    np.testing.assert_array_equal(np.array(mask), case["attention_mask"])


def test_tokenizer_bos_matches_pytorch_reference(model, case, prompts):
    _, tokenizer, _ = model
    ids, mask = tokenizer.encode(prompts, MAX_LENGTH)
    assert ids.dtype == mx.int32 and mask.dtype == mx.int32
    np.testing.assert_array_equal(np.array(ids), case["input_ids_with_bos"])
    np.testing.assert_array_equal(np.array(mask), case["attention_mask_with_bos"])


def test_tokenizer_pieces(model, case, prompts):
    _, tokenizer, _ = model
    assert tokenizer.pieces(prompts[0]) == list(case["token_pieces_prompt0"])


def test_tokenizer_truncation_keeps_bos(model, case, prompts):
    _, tokenizer, _ = model
    ids, mask = tokenizer.encode(prompts[:2], 5)
    np.testing.assert_array_equal(np.array(ids), case["input_ids_with_bos"][:2, :5])
    assert np.array(mask).all()


@pytest.mark.parametrize("bad", ["a bare string", ["ok", 3], [None]])
def test_tokenizer_rejects_non_str_prompts(model, bad):
    _, tokenizer, _ = model
    with pytest.raises(ValueError, match="list of str"):
        tokenizer.encode(bad, 8)


# ---------------------------------------------------------------- encoder vs golden


def test_encoder_with_bos_matches_hf(model, case):
    encoder, _, _ = model
    out = encoder(mx.array(case["input_ids_with_bos"]), mx.array(case["attention_mask_with_bos"]))
    assert out.dtype == mx.float32
    # Padded positions are compared too: the reference stores the encoder's output there
    # (padded queries still attend to the real keys; nonzero, position-dependent values),
    # and the README's 4.1e-6 figure is over all positions.
    assert_close(np.array(out), case["torch_embeds_with_bos"], atol=ATOL, what="with BOS vs HF")


def test_encoder_without_bos_matches_port_with_fp32_embedding(model, case):
    encoder, _, _ = model
    ids = mx.array(case["input_ids"])
    expected = case["embeds_fp32_embedding"]
    out = encoder(ids, mx.array(case["forward_mask_used"]))
    assert_close(np.array(out), expected, atol=ATOL, what="no BOS, forward mask")
    # The raw mask (empty prompt all zero) must give the same: the encoder unmasks
    # position 0 of an all-padding row itself, as the official port does.
    assert not case["attention_mask"][2].any()
    out_raw_mask = encoder(ids, mx.array(case["attention_mask"]))
    assert_close(np.array(out_raw_mask), expected, atol=ATOL, what="no BOS, raw mask")


def test_numpy_reference_matches_hf(golden, case):
    """Validates the numpy reference used by the GQA test on real (non-GQA) data."""
    weights = golden_weights(golden)
    config = T5GemmaConfig.from_weights(weights, WEIGHTS_FILE)
    rows = slice(0, 2)  # keep it quick; the empty prompt is covered above
    expected = case["torch_embeds_with_bos"][rows, :40]
    out = reference_encoder(
        weights, config, case["input_ids_with_bos"][rows, :40],
        case["attention_mask_with_bos"][rows, :40], weights["rope_inv_freq"],
    )
    assert_close(out, expected, atol=ATOL, what="numpy reference vs HF")


def test_load_from_path(golden, case):
    encoder, tokenizer, config = load_t5gemma(golden / WEIGHTS_FILE)
    assert config.hidden_size == 128 and config.num_hidden_layers == 2
    ids, mask = tokenizer.encode(["lofi house loop 120 BPM"], 32)
    out = encoder(ids, mask)
    assert_close(np.array(out), case["torch_embeds_with_bos"][:1, :32], atol=ATOL, what="path load")


# ---------------------------------------------------------------- grouped-query attention


def synthetic_gqa_weights(golden) -> tuple[WeightDict, T5GemmaConfig]:
    """A random 4-head / 2-KV-head model. META omits every size the shapes determine."""
    hidden, heads, kv_heads, head_dim, inner, vocab, layers = 48, 4, 2, 16, 80, 160, 2
    rng = np.random.default_rng(0)

    def rand(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    meta = {
        "num_attention_heads": heads,
        "rope_theta": 500.0,
        "rms_norm_eps": 1e-5,
        "attn_logit_softcapping": 3.0,  # small so the tanh cap is active
        "query_pre_attn_scalar": 24,
        "pad_token_id": 0,
        "unrelated_key": "ignored",
    }
    tensors = {
        "embed_tokens.weight": rand(vocab, hidden, scale=0.5),
        "norm.weight": rand(hidden, scale=0.2),
    }
    for i in range(layers):
        p = f"layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden, scale=0.4)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden, scale=0.4)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden, scale=0.2)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim, scale=0.1)
        tensors[p + "mlp.gate_proj.weight"] = rand(inner, hidden, scale=0.2)
        tensors[p + "mlp.up_proj.weight"] = rand(inner, hidden, scale=0.2)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, inner, scale=0.1)
        for name in ("pre_self_attn", "post_self_attn", "pre_feedforward", "post_feedforward"):
            tensors[p + f"{name}_layernorm.weight"] = rand(hidden, scale=0.2)
    with np.load(golden / WEIGHTS_FILE) as f:
        tensors["TOKENIZER_MODEL"] = f["TOKENIZER_MODEL"]
    tensors["META"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    config = T5GemmaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=inner,
        vocab_size=vocab, rope_theta=500.0, rms_norm_eps=1e-5,
        attn_logit_softcapping=3.0, query_pre_attn_scalar=24, pad_token_id=0,
    )
    return WeightDict(tensors, "synthetic_gqa.npz"), config


def test_gqa_matches_numpy_reference(golden):
    weights, expected_config = synthetic_gqa_weights(golden)
    encoder, tokenizer, config = load_t5gemma(weights)
    assert config == expected_config

    ids, mask = tokenizer.encode(["warm synth bass", "epic orchestral buildup with tribal drums"], 24)
    out = np.array(encoder(ids, mask))
    theta = config.rope_theta
    inv_freq = 1.0 / theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    expected = reference_encoder(weights, config, np.array(ids), np.array(mask), inv_freq)
    assert_close(out, expected, atol=1e-4, what="GQA vs numpy")


# ---------------------------------------------------------------- strict loading


def test_missing_key_is_named(golden):
    weights = golden_weights(golden)
    del weights["layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightError, match=r"missing key 'layers\.1\.mlp\.up_proj\.weight'"):
        load_t5gemma(weights)


def test_renamed_key_is_named(golden):
    weights = golden_weights(golden)
    weights["layers.0.self_attn.query.weight"] = weights.pop("layers.0.self_attn.q_proj.weight")
    with pytest.raises(WeightError) as err:
        load_t5gemma(weights)
    assert "unexpected key 'layers.0.self_attn.query.weight'" in str(err.value)
    assert WEIGHTS_FILE in str(err.value)


def test_reshaped_key_is_named(golden):
    weights = golden_weights(golden)
    weights["layers.0.self_attn.v_proj.weight"] = weights["layers.0.self_attn.v_proj.weight"][:64]
    expected = r"'layers\.0\.self_attn\.v_proj\.weight' has shape \[64, 128\], expected \[128, 128\]"
    with pytest.raises(WeightError, match=expected):
        load_t5gemma(weights)


@pytest.mark.parametrize("blob", ["META", "TOKENIZER_MODEL"])
def test_required_blobs(golden, blob):
    weights = golden_weights(golden)
    del weights[blob]
    with pytest.raises(WeightError, match=rf"{WEIGHTS_FILE}: missing key '{blob}'"):
        load_t5gemma(weights)


def test_rope_inv_freq_shape_is_checked(golden):
    weights = golden_weights(golden)
    weights["rope_inv_freq"] = weights["rope_inv_freq"][:16]
    with pytest.raises(WeightError, match="rope_inv_freq"):
        load_t5gemma(weights)


def test_pipeline_encodes_only_up_to_the_longest_prompt(model, prompts):
    """The pipeline runs the encoder on the used length only: real positions are unchanged
    (pads are masked out of their attention); positions past the longest prompt are zero
    (the conditioner replaces pad positions anyway)."""
    from sa3_mlx.conditioning import PromptEncoder
    from sa3_mlx.sources import PROMPT_TOKENS

    encoder, tokenizer, _ = model
    text = PromptEncoder(encoder, tokenizer, PROMPT_TOKENS)
    embeds, mask = text.encode(prompts)
    ids, full_mask = tokenizer.encode(prompts, max_length=PROMPT_TOKENS)
    full, full_mask = np.array(encoder(ids, full_mask)), np.array(full_mask)
    assert np.array_equal(np.array(mask), full_mask) and full_mask.sum(axis=1).max() < full_mask.shape[1] // 2
    real = full_mask.astype(bool)
    assert_close(np.array(embeds)[real], full[real], atol=ATOL, what="real positions, short vs full length")
    assert not np.array(embeds)[:, full_mask.sum(axis=1).max():].any()
