"""Original releases through the pipeline and the CLI: `sa3 convert`, `--model`, `--lora`, `--headroom`."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx import convert, upstream
from sa3_mlx.audio import read_metadata
from sa3_mlx.commands import main
from sa3_mlx.lora import LoraError
from sa3_mlx.models.dit import load_dit
from sa3_mlx.models.t5gemma import load_t5gemma
from sa3_mlx import plan
from sa3_mlx.pipeline import Pipeline


@pytest.fixture(scope="module")
def ckpt(golden) -> Path:
    return golden / "upstream_ckpt"


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    convert.convert(ckpt, out, progress=False)
    return out


def test_convert_writes_the_official_file_set(converted):
    names = sorted(p.name for p in converted.iterdir())
    assert names == sorted(["t5gemma_f16.npz", "dit_upstream-ckpt_f16.npz", "same_s_encoder_f32.npz",
                            "same_s_decoder_f32.npz", "sa3_model.json", "tokenizer"])
    # The strict official loaders accept them as they are.
    _, dit_config, cond = load_dit(converted / "dit_upstream-ckpt_f16.npz")
    assert dit_config.depth == 2 and set(cond) == {"padding_embedding", "seconds_total_weight", "seconds_total_bias"}
    encoder, tokenizer, t5_config = load_t5gemma(converted / "t5gemma_f16.npz")
    assert t5_config.hidden_size == 128 and tokenizer.bos_id == 2
    with np.load(converted / "dit_upstream-ckpt_f16.npz") as f:
        assert all(f[k].dtype == np.float16 for k in f.files)
    with np.load(converted / "same_s_decoder_f32.npz") as f:
        assert all(f[k].dtype == np.float32 for k in f.files)


def test_dit_names_of_the_released_repos():
    assert convert.dit_name("stabilityai/stable-audio-3-small-music") == "sm-music"
    assert convert.dit_name("stabilityai/stable-audio-3-small-sfx") == "sm-sfx"
    assert convert.dit_name("/models/stable-audio-3-medium/") == "medium"
    assert convert.dit_name("stabilityai/stable-audio-3-small-music-base") == "stable-audio-3-small-music-base"


def test_converted_model_gives_the_same_outputs(ckpt, converted):
    direct = Pipeline(str(ckpt), progress=False)
    from_files = Pipeline(str(converted), progress=False)
    assert from_files.defaults == direct.defaults and from_files.source.prompt_tokens == direct.source.prompt_tokens == 128
    settings = dict(seconds=1.0, steps=3, seed=5, headroom=0.5)
    a = direct.generate("lofi house loop", **settings)
    b = from_files.generate("lofi house loop", **settings)
    # Same stored tensors (fp16 DiT and T5, fp16-exact codec) and the same tokenizer: the same run.
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.audio, b.audio)


def test_lora_strength_changes_without_reloading_the_base(ckpt, golden):
    lora_file = golden / "lora" / "lora_a_r4_all.safetensors"
    plain = Pipeline(str(ckpt), progress=False)
    with_lora = Pipeline(str(ckpt), progress=False, loras=[f"{lora_file}:1.0"])
    settings = dict(seconds=1.0, steps=2, seed=3)
    base = plain.generate("glass", **settings).latents
    adapted = with_lora.generate("glass", **settings).latents
    assert np.abs(adapted - base).max() > 1e-2
    base_weights = with_lora.source.dit_weights()  # the unmerged base stays loaded
    with_lora.set_lora_strength(0.0)
    np.testing.assert_array_equal(with_lora.generate("glass", **settings).latents, base)
    assert with_lora.source.dit_weights() is base_weights
    with_lora.set_lora_strength(1.0, index=0)
    np.testing.assert_array_equal(with_lora.generate("glass", **settings).latents, adapted)
    with pytest.raises(ValueError, match="out of range"):
        with_lora.set_lora_strength(1.0, index=1)


def test_cli_runs_the_upstream_checkpoint_with_stacked_loras(ckpt, golden, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lora_a = golden / "lora" / "lora_a_r4_all.safetensors"
    lora_b = golden / "lora" / "lora_b_r2_subset.safetensors"
    code = main(["--prompt", "lofi house loop", "--model", str(ckpt), "--lora", str(lora_a),
                 "--lora", f"{lora_b}:0.7", "--seconds", "1", "--steps", "2", "--seed", "4", "--headroom", "0.5",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    settings = summary["settings"]
    assert settings["release"] == str(ckpt) and settings["model"] is None and settings["sampler"] == "pingpong"
    assert settings["codec"] == "same-s"  # the release's own codec, recorded as a fact of the run
    assert settings["headroom"] == 0.5 and settings["cfg"] == 1.0  # the distilled model's default
    assert settings["loras"] == [f"{lora_a}:1.0", f"{lora_b}:0.7"]
    path = Path(summary["outputs"][0]["path"])
    assert read_metadata(path)["loras"] == settings["loras"]
    code = main(["info", str(path)])
    command = capsys.readouterr().out.splitlines()[-1]
    assert code == 0 and f"--model {ckpt}" in command and f"--lora {lora_b}:0.7" in command
    assert "--headroom 0.5" in command


def test_cli_errors(ckpt, golden, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["--prompt", "x", "--model", str(ckpt), "--dit", "sm-music"])
    assert code == 2 and "leave out --dit" in capsys.readouterr().err
    code = main(["--prompt", "x", "--model", str(ckpt), "--lora", "missing.safetensors:0.5"])
    assert code == 2 and "no such file missing.safetensors" in capsys.readouterr().err
    ckpt_file = tmp_path / "adapter.ckpt"
    ckpt_file.write_bytes(b"pickle")
    code = main(["--prompt", "x", "--model", str(ckpt), "--lora", str(ckpt_file), "--seconds", "1"])
    assert code == 2 and "convert_lora_ckpt_to_safetensors" in capsys.readouterr().err
    code = main(["--prompt", "x", "--model", str(tmp_path)])
    assert code == 2 and "model_config.json" in capsys.readouterr().err


def test_base_model_defaults_to_euler_with_guidance(ckpt, tmp_path):
    """A `rectified_flow` (base) config: Euler, tens of steps, CFG on."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    (folder / "t5gemma-b-b-ul2").symlink_to(ckpt / "t5gemma-b-b-ul2")
    config = json.loads((ckpt / "model_config.json").read_text())
    config["model"]["diffusion"]["diffusion_objective"] = "rectified_flow"
    (folder / "model_config.json").write_text(json.dumps(config))
    pipe = Pipeline(str(folder), progress=False)
    assert (pipe.defaults.sampler, pipe.defaults.steps, pipe.defaults.cfg) == ("euler", 50, 7.0)
    result = pipe.generate("glass", seconds=1.0, steps=2, seed=1)
    assert result.settings.sampler == "euler" and result.settings.cfg == 7.0


def test_euler_integrates_the_flow():
    """With a constant velocity v, Euler from t=1 to 0 lands exactly on x - v (and is deterministic)."""
    from sa3_mlx.sampling import build_schedule, sample_euler

    x = mx.random.normal((1, 4, 3), key=mx.random.key(0))
    v = mx.random.normal((1, 4, 3), key=mx.random.key(1))
    sigmas = build_schedule(5)
    steps = list(sample_euler(lambda x_, t, level: v, x, sigmas))
    assert len(steps) == 5
    np.testing.assert_allclose(np.array(steps[-1]), np.array(x - v), atol=1e-6)


def test_configured_distribution_shift_is_used(ckpt, tmp_path, monkeypatch):
    from sa3_mlx.sampling import build_schedule

    folder = tmp_path / "shifted"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    (folder / "t5gemma-b-b-ul2").symlink_to(ckpt / "t5gemma-b-b-ul2")
    config = json.loads((ckpt / "model_config.json").read_text())
    shift = {"type": "flux", "alpha_min": 2.0, "alpha_max": 2.0}
    config["model"]["diffusion"]["sampling_distribution_shift_options"] = shift
    (folder / "model_config.json").write_text(json.dumps(config))
    pipe = Pipeline(str(folder), progress=False)
    assert pipe.source.shift == shift
    seen = []

    def record(*args, **kwargs):
        sigmas = build_schedule(*args, **kwargs)
        seen.append(np.array(sigmas))
        return sigmas

    monkeypatch.setattr(plan, "build_schedule", record)
    result = pipe.generate("glass", seconds=1.0, steps=4, seed=1)
    np.testing.assert_array_equal(seen[0], np.array(build_schedule(4, 1.0, shift, seq_len=11)))
    np.testing.assert_array_equal(np.array(result.plan.sigmas, np.float32), seen[0])  # what the sampler ran
    assert result.plan.shift == shift and result.plan.shift_is_model

    config["model"]["diffusion"]["sampling_distribution_shift_options"] = {"type": "flux", "alpha": 2.0}
    (folder / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(upstream.UpstreamError, match="alpha"):
        Pipeline(str(folder), progress=False)


def test_lora_on_the_official_files(ckpt, golden, tmp_path):
    """The official-format DiT holds the same tensors: merged there it equals the merge on the upstream file."""
    folder = tmp_path / "official"
    folder.mkdir()
    for name, source in (("t5gemma_f16.npz", "t5gemma_tiny_f16.npz"), ("dit_sm-music_f16.npz", "dit_sm_tiny_f16.npz"),
                         ("same_s_decoder_f32.npz", "same_s_decoder_tiny_f32.npz")):
        (folder / name).symlink_to(golden / source)
    spec = [f"{golden / 'lora' / 'dora_rows_r4_layers.safetensors'}:0.5"]
    official = Pipeline("sm-music", weights_dir=folder, progress=False, loras=spec)
    original = Pipeline(str(ckpt), progress=False, loras=spec)
    case = load_case_upstream(ckpt)
    inputs = [mx.array(case[k]) for k in ("dit_x", "dit_t", "dit_cross_attn_cond", "dit_global_cond")]
    np.testing.assert_array_equal(np.array(official.dit(*inputs)), np.array(original.dit(*inputs)))
    official.set_lora_strength(1.0)
    assert np.abs(np.array(official.dit(*inputs)) - np.array(original.dit(*inputs))).max() > 1e-2


def test_lora_that_does_not_fit_the_model_is_an_error(golden, tmp_path):
    from tests.bundle import build_tiny_bundle

    bundle = build_tiny_bundle(tmp_path / "bundle")  # a 64-wide DiT: the 128-wide adapters cannot fit
    pipe = Pipeline("sm-music", weights_dir=bundle, progress=False,
                    loras=[str(golden / "lora" / "lora_b_r2_subset.safetensors")])
    with pytest.raises(LoraError, match=r"do not fit the model.*lora_A has shape \[2, 128\]"):
        pipe.dit


def load_case_upstream(ckpt):
    with np.load(ckpt / "case_upstream.npz") as f:
        return {k: f[k] for k in f.files}


def test_convert_command_and_generating_from_its_output(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(ckpt), "out"]) == 0
    listed = capsys.readouterr().out.split()
    assert "out/dit_upstream-ckpt_f16.npz" in listed and "out/sa3_model.json" in listed
    code = main(["--prompt", "glass", "--model", "out", "--seconds", "1", "--steps", "2", "--seed", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert Path(out.strip()).is_file()
    assert main(["convert", str(tmp_path / "nowhere"), "out2"]) == 2
    assert "no such folder" in capsys.readouterr().err
