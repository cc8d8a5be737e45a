"""Original PyTorch checkpoints (golden/upstream_ckpt/) read without PyTorch, against the upstream outputs."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx import codec, upstream
from sa3_mlx.pipeline import Pipeline
from sa3_mlx.sampling import Guidance, apply_guidance, build_schedule
from sa3_mlx.weights import WeightError

from .util import assert_close, load_case

# Upstream HF encoder vs ours: README measures 4.1e-6 (fp32 embedding); headroom for BLAS order.
ATOL_T5 = 5e-5
# DiT with its own timestep features: the fp32 rounding of 2 pi f t (README, "Fourier-feature note");
# measured 1.2e-3 here (v, v with local cond and CFG 3/APG 1 alike) on outputs up to 11.
ATOL_DIT_OWN_FEATURES = 5e-3
ATOL_DIT_CFG = 5e-3
# SAME decode/encode vs PyTorch: README 2.1e-6 / 6.9e-7.
ATOL_DECODER = 5e-6
ATOL_ENCODER = 2e-6


@pytest.fixture(scope="module")
def ckpt(golden):
    return golden / "upstream_ckpt"


@pytest.fixture(scope="module")
def model(ckpt):
    return upstream.load(ckpt)


@pytest.fixture(scope="module")
def case(ckpt):
    return load_case(ckpt, "case_upstream.npz")


@pytest.fixture(scope="module")
def text(model):
    return model.load_text()


@pytest.fixture(scope="module")
def dit_and_conditioner(model):
    return model.load_dit()


def fourier_tolerance(seconds: np.ndarray) -> np.ndarray:
    """As in test_conditioning: few-ulp differences of the fp32 frequency constants scale with the argument."""
    t = np.clip(seconds, 0, 384) / 384
    return (5e-5 + 2e-8 * 2 * np.pi * 1e4 * t)[:, None, None]


# ---------------------------------------------------------------- config


def test_config_is_read(model):
    assert model.model_type == "diffusion_cond_inpaint"
    assert model.codec.family == "s" and model.codec.decoder_overrides["sinusoidal_blocks"] == 0
    assert (model.text.max_length, model.text.padding_mode) == (128, "learned")
    assert model.sampling.objective == "rf_denoiser" and model.sampling.shift is None
    assert model.seconds_range == (0.0, 384.0)
    assert model.dit_config["depth"] == 2 and model.dit_config["ff_inner"] == 512


def copy_with_config(ckpt, tmp_path, edit):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    config = json.loads((ckpt / "model_config.json").read_text())
    edit(config)
    (folder / "model_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"]["diffusion"].__setitem__("diffusion_objective", "v"), "diffusion_objective"),
    (lambda c: c["model"]["diffusion"]["config"].__setitem__("norm_type", "layer_norm"), "norm_type"),
    (lambda c: c["model"]["diffusion"]["config"].__setitem__("new_option", 1), "new_option"),
    (lambda c: c["model"]["conditioning"]["configs"][0]["config"].__setitem__("padding_mode", "none"), "padding_mode"),
    # "zero" has no learned embedding upstream, so the checkpoint's one is unexpected.
    (lambda c: c["model"]["conditioning"]["configs"][0]["config"].__setitem__("padding_mode", "zero"),
     "prompt.padding_embedding"),
    (lambda c: c["model"]["pretransform"]["config"]["decoder"].__setitem__("soft_clip", True), "soft_clip"),
    (lambda c: c["model"]["diffusion"].__setitem__("sampling_distribution_shift_options", {"type": "weird"}),
     "sampling_distribution_shift_options.type"),
    (lambda c: c["model"]["diffusion"]["config"].__setitem__("depth", 3), "does not match the weights"),
    (lambda c: c["model"]["diffusion"]["config"].__setitem__("conformer", True), "conformer"),
    (lambda c: c["model"]["pretransform"]["config"]["decoder"]["config"].__setitem__("ff_mult", 4),
     "SAME decoder config does not match the weights: ff_inner 256"),
])
def test_unsupported_config_values_are_errors(ckpt, tmp_path, edit, message):
    folder = copy_with_config(ckpt, tmp_path, edit)
    with pytest.raises(upstream.UpstreamError, match=message):
        model = upstream.load(folder)
        model.load_dit()
        model.load_codec("decoder")


def test_training_sections_and_options_at_their_defaults_are_accepted(ckpt, tmp_path):
    def edit(config):
        config["training"] = {"learning_rate": 1e-4, "demo": {"demo_every": 100}}
        config["model"]["diffusion"]["config"].update(transformer_type="continuous_transformer", conformer=False,
                                                      zero_init_branch_outputs=True)
        config["model"]["diffusion"]["config"]["ff_kwargs"]["glu"] = True

    model = upstream.load(copy_with_config(ckpt, tmp_path, edit))
    assert model.dit_config["depth"] == 2


def test_zero_padding_mode(tmp_path, ckpt):
    from safetensors.numpy import save_file

    tensors = upstream.read_safetensors(ckpt / "model.safetensors")
    del tensors["conditioner.conditioners.prompt.padding_embedding"]
    folder = copy_with_config(ckpt, tmp_path, lambda c: c["model"]["conditioning"]["configs"][0]["config"]
                              .__setitem__("padding_mode", "zero"))
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    _, conditioner = upstream.load(folder).load_dit()
    embeds = mx.ones((1, 4, 128))
    padded = np.array(conditioner.pad_prompt(embeds, mx.array([[1, 1, 0, 0]])))
    assert (padded[0, :2] == 1).all() and (padded[0, 2:] == 0).all()


def test_unexpected_tensor_is_an_error(tmp_path, ckpt):
    from safetensors.numpy import save_file

    tensors = upstream.read_safetensors(ckpt / "model.safetensors")
    tensors["model.model.transformer.extra.weight"] = np.zeros(3, np.float16)
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    shutil.copy(ckpt / "model_config.json", folder)
    # Caught by the strict loader, which names the key.
    with pytest.raises(WeightError, match="transformer.extra.weight"):
        upstream.load(folder).load_dit()


# ---------------------------------------------------------------- conditioning


def test_tokenizer_matches_transformers(text, model, case):
    _, tokenizer = text
    ids, mask = tokenizer.encode([str(p) for p in case["cond_prompts"]], model.text.max_length)
    np.testing.assert_array_equal(np.array(ids), case["cond_input_ids"])
    np.testing.assert_array_equal(np.array(mask), case["cond_attention_mask"])


def test_tokenizer_honours_padding_side_and_eos(ckpt, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(ckpt / "t5gemma-b-b-ul2", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(padding_side="left", add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    left = upstream.HFTokenizer(folder)
    right = upstream.HFTokenizer(ckpt / "t5gemma-b-b-ul2")
    ids_r, mask_r = (np.array(a)[0] for a in right.encode(["lofi house"], 12))
    ids_l, mask_l = (np.array(a)[0] for a in left.encode(["lofi house"], 12))
    n = int(mask_r.sum())
    assert mask_l.sum() == n + 1 and mask_l[-1] == 1 and mask_l[0] == 0
    np.testing.assert_array_equal(ids_l[-(n + 1):], list(ids_r[:n]) + [left.eos_id])
    truncated = np.array(left.encode(["lofi house loop 120 BPM"], 4)[0])[0]
    assert truncated[0] == left.bos_id and truncated[-1] == left.eos_id


def test_conditioning_matches_upstream(text, dit_and_conditioner, model, case):
    encoder, tokenizer = text
    _, conditioner = dit_and_conditioner
    ids, mask = tokenizer.encode([str(p) for p in case["cond_prompts"]], model.text.max_length)
    hidden = encoder(ids, mask)
    assert_close(np.array(hidden), case["cond_t5_last_hidden_state"], ATOL_T5, what="T5Gemma")
    padded = np.array(conditioner.pad_prompt(hidden, mask))
    assert_close(padded, case["cond_prompt_embeds"], ATOL_T5, what="learned padding")
    cross, global_cond = conditioner.build(hidden, mask, case["cond_seconds"].tolist())
    assert_close(np.array(cross), case["cond_cross_attn_cond"], ATOL_T5, what="cross_attn_cond")
    assert_close(np.array(global_cond), case["cond_global_cond"], ATOL_T5, what="global_cond")
    for key in ("cond_seconds", "cond_seconds_more"):
        seconds = case[key]
        err = np.abs(np.array(conditioner.seconds_embedding(seconds.tolist())) - case[f"{key}_embed"])
        assert np.all(err <= fourier_tolerance(seconds)), f"{key}: {err.max(axis=(1, 2))}"


# ---------------------------------------------------------------- DiT and codec


def dit_inputs(case):
    return tuple(mx.array(case[k]) for k in ("dit_x", "dit_t", "dit_cross_attn_cond", "dit_global_cond"))


def test_dit_matches_upstream(dit_and_conditioner, case):
    dit, _ = dit_and_conditioner
    x, t, cross, global_cond = dit_inputs(case)
    local = mx.array(case["dit_local_add_cond_bct"]).swapaxes(1, 2)
    assert_close(np.array(dit(x, t, cross, global_cond)), case["dit_v"], ATOL_DIT_OWN_FEATURES, what="v")
    assert_close(np.array(dit(x, t, cross, global_cond, local)), case["dit_v_with_local_add_cond"],
                 ATOL_DIT_OWN_FEATURES, what="v local")
    # Upstream's CFG with a null (all-zero) condition, combined by APG in denoised space.
    v_pair = dit(mx.concatenate([x, x]), mx.concatenate([t, t]), mx.concatenate([cross, mx.zeros_like(cross)]),
                 mx.concatenate([global_cond, global_cond]))
    guided = apply_guidance(x, t, v_pair[:2], v_pair[2:], Guidance(scale=3.0, apg=1.0))
    assert_close(np.array(guided), case["dit_v_cfg3_apg1"], ATOL_DIT_CFG, what="cfg 3 apg 1")


def test_codec_matches_upstream(model, case):
    decoder, encoder = model.load_codec("decoder"), model.load_codec("encoder")
    audio = codec.unpatchify(decoder(mx.array(case["dec_latents"])))
    assert_close(np.array(audio), case["dec_audio"], ATOL_DECODER, what="decode")
    latents = codec.encode(encoder, mx.array(case["enc_audio"]))
    assert_close(np.array(latents), case["enc_latents"], ATOL_ENCODER, what="encode")


def test_standalone_same_config(ckpt, tmp_path, case):
    """The SAME-S repo layout: AE fields under `model`, tensors without the pretransform prefix."""
    from safetensors.numpy import save_file

    tensors = upstream.read_safetensors(ckpt / "model.safetensors")
    prefix = upstream.PRETRANSFORM_PREFIX
    folder = tmp_path / "same-s"
    folder.mkdir()
    save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, str(folder / "model.safetensors"))
    shutil.copy(ckpt / "same_s_standalone_model_config.json", folder / "model_config.json")
    model = upstream.load(folder)
    assert not model.is_generator and model.codec.family == "s"
    audio = codec.unpatchify(model.load_codec("decoder")(mx.array(case["dec_latents"])))
    assert_close(np.array(audio), case["dec_audio"], ATOL_DECODER, what="standalone decode")


# ---------------------------------------------------------------- the whole upstream generate() run


# Latents after 8 steps from upstream's recorded noise: measured 3.9e-4 (values up to 10; the
# timestep-feature rounding, see above); audio after decoding: 1.3e-5.
ATOL_GEN_LATENTS = 2e-3
ATOL_GEN_AUDIO = 1e-4


def test_generate_matches_upstream(ckpt, case, monkeypatch):
    """StableAudioModel.generate(prompt, duration=0.5, duration_padding_sec=0.5, steps=8) with its RNG draws."""
    # The reference ran in fp32; pin it so the comparison holds on GPUs too (where the DiT defaults to fp16).
    pipe = Pipeline(str(ckpt), progress=False, dit_dtype=mx.float32, codec_dtype=mx.float32)
    assert pipe.defaults.steps == 8 and pipe.defaults.cfg == 1.0 and pipe.defaults.sampler == "pingpong"
    seconds, headroom = float(case["gen_duration"]), float(case["gen_duration_padding_sec"])
    plan = pipe.plan(pipe.settings(str(case["gen_prompt"]), seconds=seconds, headroom=headroom))
    assert (plan.latents, plan.valid_latents) == (12, 11)
    np.testing.assert_array_equal(np.arange(12) < plan.valid_latents, case["gen_dit_padding_mask"][0] > 0)
    assert not case["gen_dit_local_add_cond"].any()  # text-to-audio: zero inpaint conditioning

    def recorded_noise(seeds, n_lat):
        step_noise = case["gen_step_noise"]
        return mx.array(case["gen_initial_noise"]), lambda i, shape, dtype: mx.array(step_noise[i]).astype(dtype)

    monkeypatch.setattr(pipe, "draw_noise", recorded_noise)
    result = pipe.generate(str(case["gen_prompt"]), seconds=seconds, headroom=headroom)
    assert_close(result.latents, case["gen_latents"], ATOL_GEN_LATENTS, what="generate() latents")
    # Upstream clamps the decoded audio to [-1, 1]; ours leaves that to the writer.
    assert_close(np.clip(result.audio, -1, 1), case["gen_audio"], ATOL_GEN_AUDIO, what="generate() audio")

    # Without the padding mask the run differs far beyond the tolerance: the mask is exercised.
    result = pipe.generate(str(case["gen_prompt"]), seconds=seconds, headroom=0.0)
    assert result.latents.shape == case["gen_latents"].shape  # same length by our rule (12, even for SAME-S)
    assert np.abs(result.latents - case["gen_latents"]).max() > 20 * ATOL_GEN_LATENTS


def test_conditioning_inputs_of_generate(ckpt, case):
    pipe = Pipeline(str(ckpt), progress=False)
    cross, global_cond, uncond = pipe.conditioning(str(case["gen_prompt"]), None, float(case["gen_duration"]), Guidance())
    assert uncond is None
    assert_close(np.array(cross), case["gen_dit_cross_attn_cond"], ATOL_T5, what="cross_attn_cond")
    assert_close(np.array(global_cond), case["gen_dit_global_cond"], ATOL_T5, what="global_cond")
    assert_close(np.array(build_schedule(8, 1.0, pipe.source.shift)), case["gen_sigmas"][0], 1e-7,
                 what="schedule")


def test_sentencepiece_tokenizer_when_there_is_no_tokenizer_json(ckpt, tmp_path):
    """tokenizer.model alone: SentencePiece pieces, BOS as GemmaTokenizer adds it, the config's padding side."""
    import sentencepiece as spm

    folder = tmp_path / "t5"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (folder / name).symlink_to(ckpt / "t5gemma-b-b-ul2" / name)
    tokenizer = upstream.HFTokenizer(folder)
    processor = spm.SentencePieceProcessor()
    processor.Load(str(folder / "tokenizer.model"))
    ids, mask = (np.array(a)[0] for a in tokenizer.encode(["lofi house"], 10))
    pieces = processor.Encode("lofi house")
    assert list(ids[: len(pieces) + 1]) == [processor.bos_id()] + pieces
    assert mask.sum() == len(pieces) + 1 and (ids[mask == 0] == tokenizer.pad_id).all()


def test_bfloat16_tensors_are_read(tmp_path):
    path = tmp_path / "bf16.safetensors"
    mx.save_safetensors(str(path), {"a": mx.array([1.5, -2.25], dtype=mx.bfloat16), "b": mx.array([3.0])})
    tensors = upstream.read_safetensors(path)
    assert tensors["a"].dtype == np.float32 and tensors["a"].tolist() == [1.5, -2.25]
    assert tensors["b"].tolist() == [3.0]


# ---------------------------------------------------------------- a SAME-L release (built from the golden files)


def to_upstream_block(arrays: dict, block: str) -> dict:
    """Official MLX names of one SAME half -> upstream state-dict names (inverse of map_same), weight norm split."""
    out = {}
    for key, value in arrays.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for new, old in (("attn.", "self_attn."), ("ff.glu_proj.", "ff.ff.0.proj."), ("ff.proj_out.", "ff.ff.2.")):
                if rest.startswith(new):
                    rest = old + rest[len(new):]
            out[f"{block}transformers.{index}.{rest}"] = value
        elif key == "mapping.weight":
            v = value.reshape(value.shape[0], -1, 1) * 2.0  # any scale: the fusion normalises it away
            out[block + "mapping.weight_v"] = v
            out[block + "mapping.weight_g"] = np.linalg.norm(value.reshape(value.shape[0], -1), axis=1)[:, None, None]
        elif key in ("mapping.bias", "new_tokens"):
            out[block + key] = value
    return out


def test_same_l_release(golden, tmp_path):
    from safetensors.numpy import save_file

    dec = load_case(golden, "same_l_decoder_tiny_f32.npz")
    enc = load_case(golden, "same_l_encoder_tiny_f32.npz")
    tensors = {**to_upstream_block(dec, "decoder.layers.3."), **to_upstream_block(enc, "encoder.layers.0.")}
    tensors.update({"decoder.layers.1.weight": dec["project_in.weight"], "decoder.layers.1.bias": dec["project_in.bias"],
                    "encoder.layers.2.weight": enc["project_out.weight"], "encoder.layers.2.bias": enc["project_out.bias"],
                    "bottleneck.running_std": dec["running_std"], "bottleneck.scaling_factor": enc["scaling_factor"],
                    "bottleneck.bias": enc["bias"], "bottleneck.noise_scaling_factor": np.zeros((1, 0, 1), np.float32)})
    folder = tmp_path / "same-l"
    folder.mkdir()
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = json.loads((golden / "upstream_ckpt" / "same_s_standalone_model_config.json").read_text())
    for role in ("encoder", "decoder"):
        c = config["model"][role]["config"]
        del c["chunk_size"], c["chunk_midpoint_shift"]
        c.update(sliding_window=[1, 1], transformer_depths=[4])
    config["model"]["decoder"]["config"].update(conv_mapping=False, sinusoidal_blocks=[3])
    (folder / "model_config.json").write_text(json.dumps(config))

    model = upstream.load(folder)
    assert model.codec.family == "l" and model.codec.decoder_overrides["sliding_window"] == (1, 1)
    case = load_case(golden, "case_same_l_decoder.npz")
    assert_close(np.array(model.load_codec("decoder")(mx.array(case["latents"]))), case["patches"], ATOL_DECODER,
                 what="SAME-L decoder")
    case = load_case(golden, "case_same_l_encoder.npz")
    assert_close(np.array(model.load_codec("encoder")(mx.array(case["audio_patches"]))), case["torch_latents"],
                 ATOL_ENCODER, what="SAME-L encoder")


def test_text_encoder_from_the_configs_model_path(ckpt, tmp_path):
    """No t5gemma folder beside the model: the conditioner config's model_path is used, as upstream."""
    folder = copy_with_config(ckpt, tmp_path, lambda c: c["model"]["conditioning"]["configs"][0]["config"]
                              .__setitem__("model_path", str(ckpt)))
    assert not (folder / "t5gemma-b-b-ul2").exists()
    model = upstream.load(folder)
    assert model.text_folder() == ckpt / "t5gemma-b-b-ul2"
    encoder, tokenizer = model.load_text()
    assert encoder.config.hidden_size == 128 and tokenizer.padding_side == "right"


def test_longer_than_training_length_warns(ckpt):
    """model_config's sample_size (5292032 samples = 120 s) is the training length: beyond it, a warning."""
    pipe = Pipeline(str(ckpt), progress=False)
    assert pipe.source.training_seconds == 5292032 / 44100  # 120.0007 s
    assert any("trained on" in w for w in pipe.plan(pipe.settings("x", seconds=200.0)).warnings)
    assert not pipe.plan(pipe.settings("x", seconds=60.0)).warnings
