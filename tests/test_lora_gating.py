"""LoRA gating by noise level (``--lora FILE:STRENGTH@LO-HI``): each step runs the DiT of the LoRAs active
at its level; no interval keeps the zero-cost merge."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx import codec
from sa3_mlx import settings as table
from sa3_mlx.audio import SAMPLE_RATE
from sa3_mlx.lora import LoraError, LoraStack
from sa3_mlx.pipeline import Pipeline, guidance_of
from sa3_mlx.sampling import SAMPLERS
from sa3_mlx.settings import SettingsError, lora_interval, parse_lora_spec


@pytest.fixture(scope="module")
def lora_file(golden):
    return golden / "lora" / "lora_a_r4_all.safetensors"


def test_spec_syntax_and_bounds(lora_file):
    assert lora_interval("a.safetensors:0.8@0.3-1") == ("a.safetensors:0.8", (0.3, 1.0))
    assert lora_interval("a.safetensors") == ("a.safetensors", None)
    assert lora_interval("dir@x/a.safetensors") == ("dir@x/a.safetensors", None)
    assert parse_lora_spec("a.safetensors:0.8@0.3-1") == ("a.safetensors", 0.8)
    assert parse_lora_spec("a.safetensors@0-0.5") == ("a.safetensors", 1.0)
    for spec in ("a.safetensors:1@0.5-0.2", "a.safetensors:1@0-2", "a.safetensors@-1-0.5"):
        with pytest.raises(SettingsError, match=r"the noise levels after '@' need 0 <= LO <= HI <= 1"):
            table.validate({"prompt": "x", "loras": (spec,)})
    stack = LoraStack.from_specs([f"{lora_file}:0.5@0.2-0.8", f"{lora_file}", (lora_file, 1.0, (0.0, 1.0))])
    assert stack.intervals == [(0.2, 0.8), None, None] and stack.gated
    assert stack.active_at(0.9) == {1, 2} and stack.active_at(0.5) == {0, 1, 2}
    assert stack.specs()[0] == f"{lora_file}:0.5@0.2-0.8" and stack.specs()[1] == f"{lora_file}:1.0"
    assert not LoraStack.from_specs([f"{lora_file}:1@0-1"]).gated  # the whole range: the plain merge
    with pytest.raises(LoraError, match="need 0 <= LO <= HI <= 1"):
        LoraStack.from_specs([(lora_file, 1.0, (0.7, 0.2))])


def test_each_step_runs_the_dit_of_the_loras_active_at_its_level(golden, lora_file):
    ckpt = str(golden / "upstream_ckpt")
    values = dict(seconds=2, steps=8, seed=3)
    gated = Pipeline(ckpt, progress=False, loras=[f"{lora_file}:1.0@0.5-1"])
    on = Pipeline(ckpt, progress=False, loras=[f"{lora_file}:1.0"])
    off = Pipeline(ckpt, progress=False)
    result = gated.generate("warm pad", **values)
    assert result.settings.loras == (f"{lora_file}:1.0@0.5-1.0",)
    assert table.reproduce_command(result.settings).count(f"--lora {lora_file}:1.0@0.5-1.0") == 1

    # The same run composed by hand: the conditioning with the LoRA merged (the conditioner's share stays
    # merged), the merged DiT at levels in [0.5, 1], the base DiT below.
    s = on.resolve(on.settings("warm pad", **values))
    plan = on.plan(s)
    levels = list(plan.sigmas)
    assert any(l >= 0.5 for l in levels[:-1]) and any(l < 0.5 for l in levels[:-1])
    guidance = guidance_of(s)
    cross, global_cond, uncond = on.conditioning("warm pad", None, 2, guidance)
    noise, step_noise = on.draw_noise([3], plan.latents)
    v_on = on.denoiser.velocity(1, plan.latents, cross, global_cond, uncond, guidance)
    v_off = off.denoiser.velocity(1, plan.latents, cross, global_cond, uncond, guidance)
    used = []

    def velocity(x, t, level):
        used.append(0.5 <= level <= 1)
        return (v_on if 0.5 <= level <= 1 else v_off)(x, t, level)

    latents = None
    for latents in SAMPLERS[s.sampler](velocity, noise.astype(on.dit_dtype), mx.array(plan.sigmas, mx.float32),
                                       step_noise):
        pass
    audio = codec.unpatchify(codec.decode(on.decoder, latents.astype(mx.float32).astype(on.codec_dtype)))
    expected = np.array(audio.astype(mx.float32))[..., :2 * SAMPLE_RATE]
    assert True in used and False in used
    np.testing.assert_array_equal(result.audio, expected)
    assert not np.array_equal(result.audio, on.generate("warm pad", **values).audio)

    # The whole range is the plain merge, exactly.
    whole = Pipeline(ckpt, progress=False, loras=[f"{lora_file}:1.0@0-1"])
    np.testing.assert_array_equal(whole.generate("warm pad", **values).audio, on.generate("warm pad", **values).audio)
    assert whole.lora_specs == [f"{lora_file}:1.0"]


def test_layer_filter_and_conditioner_strength(golden, lora_file):
    """``;skip=GLOB|GLOB`` leaves the adapter out of matching modules, ``;cond=S`` gives the conditioner's
    modules their own strength; the rest of the merge is unchanged."""
    from sa3_mlx import lora
    from sa3_mlx import upstream

    base = {k: v.astype(np.float32) for k, v in upstream.load(golden / "upstream_ckpt").dit_weights.items()}
    full = LoraStack.from_specs([f"{lora_file}:1.0"]).apply(base)
    stack = LoraStack.from_specs([f"{lora_file}:1.0@0.2-1;cond=0;skip=layers.1.|to_local_embed"])
    assert stack.cond_strengths == [0.0] and stack.skips == [("layers.1.", "to_local_embed")]
    assert stack.specs() == [f"{lora_file}:1.0@0.2-1.0;cond=0.0;skip=layers.1.|to_local_embed"]
    filtered = stack.apply(base)
    changed = [k for k in full if not np.array_equal(full[k], base[k])]
    assert any("layers.1." in k for k in changed) and lora.SECONDS_KEY in changed
    for key in changed:
        module = lora.key_to_module(key)
        left_out = lora.skipped(module, ("layers.1.", "to_local_embed")) or module.startswith(lora.COND_ROOT)
        if left_out:
            np.testing.assert_array_equal(filtered[key], base[key])
        else:
            np.testing.assert_array_equal(filtered[key], full[key])
    # Half the conditioner strength: the seconds embedder alone moves, as a strength-0.5 merge moves it.
    half = LoraStack.from_specs([f"{lora_file}:1.0;cond=0.5"]).apply(base)
    np.testing.assert_array_equal(half[lora.SECONDS_KEY],
                                  LoraStack.from_specs([f"{lora_file}:0.5"]).apply(base)[lora.SECONDS_KEY])
    for spec, words in ((f"{lora_file};cond=x", "cond expects a number"), (f"{lora_file};skip=", "options after"),
                        (f"{lora_file};cond=99", "the cond strength must be"), (f"{lora_file};bogus=1", "options after"),
                        (f"{lora_file};skip=a||b", "empty pattern")):
        with pytest.raises(SettingsError, match=words):
            table.validate({"prompt": "x", "loras": (spec,)})


def test_gated_and_filtered_lora_through_the_cli(sa3, golden, lora_file, work):
    ckpt = golden / "upstream_ckpt"
    spec = f"{lora_file}:0.8@0.5-1;skip=layers.0."
    code, out, err = sa3("--prompt", "x", "--model", ckpt, "--lora", spec, "--seconds", "1.5", "--seed", "2")
    assert code == 0, err
    from sa3_mlx.audio import read_metadata

    meta = read_metadata(work / out.strip())
    assert meta["loras"] == [f"{lora_file}:0.8@0.5-1.0;skip=layers.0."]
    code, info, _ = sa3("info", work / out.strip())
    assert code == 0 and f"--lora '{lora_file}:0.8@0.5-1.0;skip=layers.0.'" in info
    code, _, err = sa3("--prompt", "x", "--model", ckpt, "--lora", f"{lora_file}:1@0.9-0.1")
    assert code == 2 and "the noise levels after '@' need 0 <= LO <= HI <= 1" in err
