"""The samplers (pingpong, euler, rk4, dpmpp) and the guidance options (CFG rescale, norm threshold,
interval) against upstream (golden/sampling/), the schedule shift override, and the four settings end to end:
the CLI on the tiny bundle and a rectified_flow release, `sa3 info`, the studio's JSON, refusals."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from sa3_mlx import settings as table
from sa3_mlx import upstream
from sa3_mlx.arguments import UsageError
from sa3_mlx.audio import read_metadata
from sa3_mlx.commands import main
from sa3_mlx.cli.generate import _banner_rows, build_parser, parse_settings
from sa3_mlx.denoiser import Denoiser
from sa3_mlx.pipeline import Pipeline
from sa3_mlx.sampling import SAMPLERS, Guidance, build_schedule
from sa3_mlx.settings import FIELD, FIELDS, SettingsError
from sa3_mlx.studio.settings import BadRequest, Limits
from sa3_mlx.studio.settings import parse_settings as parse_request
from tests.bundle import build_tiny_bundle
from tests.util import assert_close, load_case

# With the stored timestep features injected (README, golden/sampling: "about 1e-6 relative"), the sampled
# latents (magnitudes 10-17) agree to 8.6e-6 measured at cfg 1; the CFG runs add the batched forward's
# ~1.5e-6 relative per evaluation (measured 3.5e-5 on latents up to 17).
ATOL_SAMPLER = 2e-5
ATOL_SAMPLER_CFG = 5e-5
# One DiT forward (v up to 10): measured 6.7e-6. Guided velocities (up to 15): measured 2.9e-5, the forward's
# error times the guidance's (1 + 2 (scale - 1)) / t.
ATOL_V = 1e-5
ATOL_GUIDED = 5e-5


@pytest.fixture(scope="module")
def ckpt(golden) -> Path:
    return golden / "upstream_ckpt"


@pytest.fixture(scope="module")
def tiny_dit(ckpt):
    dit, _ = upstream.load(ckpt).load_dit()  # fp32
    return dit


def inject_features(monkeypatch, dit, ts: np.ndarray, features: np.ndarray) -> list[float]:
    """Make the DiT use upstream's stored timestep features (matched by t); returns the t of each call."""
    seen = []

    def lookup(t: mx.array) -> mx.array:
        values = np.array(t)
        index = [int(np.argmin(np.abs(ts - v))) for v in values]
        assert max(abs(float(ts[i]) - float(v)) for i, v in zip(index, values)) < 1e-6, values
        seen.append(float(values[0]))
        return mx.array(features[index])

    monkeypatch.setattr(dit, "timestep_features", lookup, raising=False)
    return seen


# ---- samplers against upstream sample_diffusion --------------------------------------------


@pytest.fixture(scope="module")
def samplers_case(golden):
    return load_case(golden / "sampling", "case_samplers.npz")


def test_the_golden_case_runs_every_sampler(samplers_case):
    runs = json.loads(str(samplers_case["runs_json"]))
    assert {r[1] for r in runs} == set(SAMPLERS) == set(table.SAMPLERS)


@pytest.mark.parametrize("name, sampler, schedule, cfg, apg", [
    ("euler_logsnr", "euler", "logsnr", 1.0, 1.0), ("rk4_logsnr", "rk4", "logsnr", 1.0, 1.0),
    ("dpmpp_logsnr", "dpmpp", "logsnr", 1.0, 1.0), ("pingpong_logsnr", "pingpong", "logsnr", 1.0, 1.0),
    ("euler_linear", "euler", "linear", 1.0, 1.0), ("rk4_linear", "rk4", "linear", 1.0, 1.0),
    ("dpmpp_linear", "dpmpp", "linear", 1.0, 1.0), ("pingpong_linear", "pingpong", "linear", 1.0, 1.0),
    ("euler_logsnr_cfg4_apg1", "euler", "logsnr", 4.0, 1.0), ("dpmpp_logsnr_cfg4_apg0", "dpmpp", "logsnr", 4.0, 0.0),
])
def test_sampler_equals_upstream(samplers_case, tiny_dit, monkeypatch, name, sampler, schedule, cfg, apg):
    case = samplers_case
    assert [name, sampler, schedule, cfg, apg] in json.loads(str(case["runs_json"]))
    seen = inject_features(monkeypatch, tiny_dit, case["tfeat_t"], case["tfeat"])
    cross, global_cond = mx.array(case["cross_attn_cond"]), mx.array(case["global_cond"])
    noise = case["pingpong_noise"]
    states = list(Denoiser(tiny_dit, compile_steps=False).steps(
        mx.array(case["x"]), mx.array(case[f"sigmas_{schedule}"]), cross, global_cond,
        mx.zeros_like(cross) if cfg != 1 else None, Guidance(cfg, apg),
        lambda i, shape, dtype: mx.array(noise[i]).astype(dtype),
        mx.array(case["local_add_cond"]).transpose(0, 2, 1), None, sampler, mx.float32))
    steps = int(case["steps"])
    assert len(states) == steps  # one state per sampler step, however many evaluations a step takes
    evaluations = {"rk4": 4}.get(sampler, 1)
    assert len(seen) == steps * evaluations
    np.testing.assert_array_equal(np.array(seen[::evaluations], np.float32), case[f"{name}/step_t"])
    atol = ATOL_SAMPLER if cfg == 1 else ATOL_SAMPLER_CFG
    assert_close(np.array(states[-1]), case[f"{name}/latents"], atol, what=f"{name} latents")
    if f"{name}/step_x" in case:  # the state entering each step
        for i, state in enumerate(states[:-1]):
            assert_close(np.array(state), case[f"{name}/step_x"][i + 1], ATOL_SAMPLER, what=f"{name} step {i + 1}")


def test_new_samplers_yield_each_step_one_step_ahead(monkeypatch):
    """Every state is evaluated when it is yielded, and the next step is queued (async_eval) before it is."""
    from sa3_mlx import sampling

    queued, log = [], []
    real = mx.async_eval

    def record(*arrays):
        queued.append(arrays[0])
        log.append("queued")
        return real(*arrays)

    monkeypatch.setattr(sampling.mx, "async_eval", record)
    v = mx.array(np.random.default_rng(0).standard_normal((1, 3, 5)).astype(np.float32))
    x = mx.array(np.random.default_rng(1).standard_normal((1, 3, 5)).astype(np.float32))
    for name in ("rk4", "dpmpp", "euler"):
        queued.clear()
        log.clear()
        for state in SAMPLERS[name](lambda x_, t, level: v, x, build_schedule(4), None):
            log.append("yielded")
        assert log == ["queued", "queued", "yielded", "queued", "yielded", "queued", "yielded", "yielded"], name
        # A constant velocity is integrated exactly by every solver: from t = 1 to 0 they land on x - v.
        np.testing.assert_allclose(np.array(state), np.array(x - v), atol=1e-6)


# ---- guidance against upstream DiTWrapper.forward --------------------------------------------


@pytest.fixture(scope="module")
def guidance_case(golden):
    return load_case(golden / "sampling", "case_guidance.npz")


def guided(case, dit, guidance: Guidance, t: float = 0.5, uncond="null", padding: bool = False, cond=None):
    """The velocity the denoiser samples with, at noise level ``t`` for both items."""
    cross = mx.array(case["cross_attn_cond"]) if cond is None else cond
    if isinstance(uncond, str):
        uncond = mx.zeros_like(cross)  # upstream's null condition
    mask = mx.array(case["padding_mask"] > 0) if padding else None
    velocity = Denoiser(dit, compile_steps=False).velocity(
        2, 16, cross, mx.array(case["global_cond"]), uncond, guidance,
        mx.array(case["local_add_cond"]).transpose(0, 2, 1), mask)
    return np.array(velocity(mx.array(case["x"]), mx.full((2,), t, dtype=mx.float32), t))


def negative(case) -> mx.array:
    """The negative prompt's conditioning with its masked (padding) tokens zeroed, as upstream."""
    keep = case["negative_cross_attn_mask"][..., None] > 0
    return mx.array(np.where(keep, case["negative_cross_attn_cond"], 0).astype(np.float32))


GUIDANCE_CASES = {
    "v_cfg4_vanilla": (dict(apg=0.0), False),
    "v_cfg4_apg1": (dict(apg=1.0), False),
    "v_cfg4_apg05": (dict(apg=0.5), False),
    "v_cfg4_rescale07": (dict(apg=0.0, rescale=0.7), False),
    "v_cfg4_apg1_rescale07": (dict(apg=1.0, rescale=0.7), False),
    "v_cfg4_normthr": (dict(apg=0.0, norm_threshold="cfg_norm_threshold"), False),
    "v_cfg4_vanilla_padmask": (dict(apg=0.0), True),
    "v_cfg4_apg1_padmask": (dict(apg=1.0), True),
    "v_cfg4_normthr_padmask": (dict(apg=0.0, norm_threshold="cfg_norm_threshold_padmask"), True),
}


@pytest.mark.parametrize("name", list(GUIDANCE_CASES))
def test_guidance_equals_upstream(guidance_case, tiny_dit, monkeypatch, name):
    case = guidance_case
    inject_features(monkeypatch, tiny_dit, case["tfeat_t"], case["tfeat"])
    options, padding = GUIDANCE_CASES[name]
    if "norm_threshold" in options:
        options = dict(options, norm_threshold=float(case[options["norm_threshold"]]))
    out = guided(case, tiny_dit, Guidance(4.0, **options), padding=padding)
    assert_close(out, case[name], ATOL_GUIDED, what=name)


def test_norm_threshold_clips_only_the_items_above_it(guidance_case):
    """The case is built so that the plain threshold clips item 1 only, the masked one both: the data the
    threshold tests rely on (norms of the denoised difference, t = 0.5, i.e. 0.5 |v_c - v_u|)."""
    case = guidance_case
    diff = 0.5 * (case["v_cond"] - case["v_uncond"])
    np.testing.assert_allclose(np.linalg.norm(diff.reshape(2, -1), axis=1), case["diff_norm"], rtol=1e-5)
    assert case["diff_norm"][0] < case["cfg_norm_threshold"] < case["diff_norm"][1]
    assert (case["diff_norm_padmask"] > case["cfg_norm_threshold_padmask"]).all()


def test_unguided_forwards_and_negative_prompt_equal_upstream(guidance_case, tiny_dit, monkeypatch):
    case = guidance_case
    inject_features(monkeypatch, tiny_dit, case["tfeat_t"], case["tfeat"])
    off = Guidance(1.0)
    assert_close(guided(case, tiny_dit, off, uncond=None), case["v_cond"], ATOL_V, what="v_cond")
    zeros = mx.zeros_like(mx.array(case["cross_attn_cond"]))
    assert_close(guided(case, tiny_dit, off, uncond=None, cond=zeros), case["v_uncond"], ATOL_V, what="v_uncond")
    assert_close(guided(case, tiny_dit, off, uncond=None, padding=True), case["v_cond_padmask"], ATOL_V,
                 what="v_cond_padmask")
    assert_close(guided(case, tiny_dit, off, uncond=None, cond=negative(case)), case["v_neg_as_cond"], ATOL_V,
                 what="v_neg_as_cond")
    assert_close(guided(case, tiny_dit, Guidance(4.0, 0.0), uncond=negative(case)), case["v_cfg4_neg_vanilla"],
                 ATOL_GUIDED, what="v_cfg4_neg_vanilla")


def test_cfg_interval_equals_upstream(guidance_case, tiny_dit, monkeypatch):
    case = guidance_case
    inject_features(monkeypatch, tiny_dit, case["tfeat_t"], case["tfeat"])
    interval = tuple(float(v) for v in case["cfg_interval"])
    inside, outside = float(case["t_interval_in"]), float(case["t_interval_out"])
    assert interval[0] <= inside <= interval[1] < outside
    g = Guidance(4.0, 0.0, interval=interval)
    assert_close(guided(case, tiny_dit, g, t=inside), case["v_cfg4_interval_in"], ATOL_GUIDED, what="interval, inside")
    out = guided(case, tiny_dit, g, t=outside)
    assert_close(out, case["v_cfg4_interval_out"], ATOL_V, what="interval, outside")
    # Outside the interval: exactly the conditional forward (upstream's is bit-equal to its v_cond_t08).
    np.testing.assert_array_equal(case["v_cfg4_interval_out"], case["v_cond_t08"])
    np.testing.assert_array_equal(out, guided(case, tiny_dit, Guidance(1.0), t=outside, uncond=None))


# ---- the settings: both front ends, bounds, metadata ----------------------------------------

NEW = ("cfg_rescale", "cfg_norm_threshold", "cfg_interval", "shift")


def test_values_are_checked_and_spelled_once():
    s = table.validate({"prompt": "x", "cfg_interval": [0.2, 0.6], "shift": "flux:alpha_max=3,alpha_min=2"})
    assert s.cfg_interval == (0.2, 0.6) and s.shift == "flux:alpha_min=2.0,alpha_max=3.0"
    d = table.validate({"prompt": "x"})
    assert (d.cfg_rescale, d.cfg_norm_threshold, d.cfg_interval, d.shift) == (0.0, 0.0, (0.0, 1.0), "model")
    assert table.shift_options("model") is None and table.shift_options("none") == {"type": "none"}
    assert table.shift_options(s.shift) == {"type": "flux", "alpha_min": 2.0, "alpha_max": 3.0}
    for f in (FIELD[n] for n in NEW):
        assert f.fronts == ("cli", "api")
        if f.kind in ("float", "interval"):
            assert f.maximum is not None and np.isfinite(f.maximum), f.name
    for name, value in (("cfg_rescale", float("nan")), ("cfg_norm_threshold", float("inf")),
                        ("cfg_interval", (0.0, float("nan"))), ("shift", "flux:alpha_min=nan")):
        with pytest.raises(SettingsError, match=name):
            table.validate({"prompt": "x", name: value})


def test_openapi_schema_states_the_new_settings():
    props = table.json_schema("api")["properties"]
    assert props["cfg_rescale"]["minimum"] == 0 and props["cfg_rescale"]["maximum"] == 1
    assert props["cfg_norm_threshold"]["maximum"] == table.MAX_CFG_NORM_THRESHOLD
    interval = props["cfg_interval"]
    assert interval["type"] == "array" and interval["minItems"] == interval["maxItems"] == 2
    assert interval["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0} and interval["default"] == [0.0, 1.0]
    shift = props["shift"]
    assert shift["type"] == "string" and shift["default"] == "model" and shift["maxLength"] == 200
    pattern = re.compile(shift["pattern"])
    for text in ("model", "none", "flux:alpha_min=2,alpha_max=2", "logsnr:rate=0.0"):
        assert pattern.match(text)
    for text in ("flux:", "nonsense", "none:rate=1"):
        assert not pattern.match(text)
    assert table.FIELD["sampler"].choices == ("pingpong", "euler", "rk4", "dpmpp")
    assert props["sampler"]["enum"] == ["pingpong", "euler", "rk4", "dpmpp", None]


def test_metadata_round_trips_into_the_same_settings():
    s = table.validate({"prompt": "x", "cfg": 3.0, "cfg_rescale": 0.7, "cfg_norm_threshold": 12.5,
                        "cfg_interval": (0.1, 0.9), "shift": "full:base_shift=1,max_length=2000", "sampler": "dpmpp"})
    again = table.from_metadata(json.loads(json.dumps(table.to_metadata(s))))
    assert again == s
    command = table.reproduce_command(s)
    assert "--cfg-interval 0.1,0.9" in command and "--shift full:base_shift=1.0,max_length=2000" in command
    assert parse_settings(build_parser().parse_args(shlex.split(command)[1:])) == s
    assert "--shift" not in table.reproduce_command(table.validate({"prompt": "x"}))


# ---- schedules ---------------------------------------------------------------------------



def test_shift_override_gives_upstream_schedules(bundle):
    pipe = Pipeline("sm-music", weights_dir=bundle, progress=False)
    for text, shift in (("none", {"type": "none"}), ("flux:alpha_min=3,alpha_max=3", {"type": "flux", "alpha_min": 3.0,
                                                                                          "alpha_max": 3.0}),
                        ("logsnr:rate=0.5", {"type": "logsnr", "rate": 0.5}),
                        ("full", {"type": "full"})):
        plan = pipe.plan(pipe.settings("x", seconds=10, steps=6, shift=text))
        assert plan.shift == shift and not plan.shift_is_model
        np.testing.assert_array_equal(np.array(plan.sigmas, np.float32),
                                      np.array(build_schedule(6, 1.0, shift, seq_len=108)))
    plan = pipe.plan(pipe.settings("x", steps=6))
    assert plan.shift is None and plan.shift_is_model and plan.shift_description == "logsnr:rate=0.0 (the model's)"
    np.testing.assert_array_equal(np.array(plan.sigmas, np.float32), np.array(build_schedule(6)))
    # The linear schedule of the golden case, and a shift that does not fall to 0 steadily is refused.
    np.testing.assert_allclose(pipe.plan(pipe.settings("x", steps=6, shift="none")).sigmas,
                               np.linspace(1, 0, 7), atol=1e-7)
    with pytest.raises(SettingsError, match=r"^shift logsnr:anchor_logsnr=0.0,rate=0.0,logsnr_end=-2.0 gives noise"):
        pipe.plan(pipe.settings("x", steps=6, shift="logsnr:anchor_logsnr=0,rate=0,logsnr_end=-2"))


def test_banner_shows_the_schedule_and_guidance(bundle):
    pipe = Pipeline("sm-music", weights_dir=bundle, progress=False)
    s = pipe.settings("x", seconds=2, steps=8, seed=1, cfg=3, cfg_rescale=0.7, cfg_norm_threshold=40,
                      cfg_interval=(0.2, 0.9), shift="flux:alpha_min=2,alpha_max=2", format="wav16")
    rows = dict(_banner_rows(pipe.resolve(s), pipe, pipe.plan(s), [Path("a.wav")]))
    assert rows["schedule"].startswith("flux:alpha_min=2.0,alpha_max=2.0   sigmas 1 ")
    assert rows["schedule"].endswith(" 0") and "..." in rows["schedule"]
    assert rows["guidance"] == "cfg 3  apg 1  rescale 0.7  norm threshold 40  at sigma 0.2..0.9"
    s = pipe.settings("x", steps=2, format="wav16")
    rows = dict(_banner_rows(pipe.resolve(s), pipe, pipe.plan(s), [Path("a.wav")]))
    assert rows["schedule"] == "logsnr:rate=0.0 (the model's)   sigmas 1 0.891 0"


# ---- end to end: the CLI -------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(ckpt, tmp_path_factory) -> Path:
    """The tiny original release as a rectified_flow (-base) model: euler by default, rk4 and dpmpp too."""
    folder = tmp_path_factory.mktemp("base")
    (folder / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    (folder / "t5gemma-b-b-ul2").symlink_to(ckpt / "t5gemma-b-b-ul2")
    config = json.loads((ckpt / "model_config.json").read_text())
    config["model"]["diffusion"]["diffusion_objective"] = "rectified_flow"
    (folder / "model_config.json").write_text(json.dumps(config))
    return folder


def read(path) -> np.ndarray:
    return sf.read(str(path), dtype="float32", always_2d=True)[0].T


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def info_command(sa3, path) -> str:
    code, out, _ = sa3("info", path)
    assert code == 0
    return re.search(r"^\s*command\s+(sa3 .*)$", out, re.M).group(1)


def test_guidance_and_shift_flags_end_to_end_and_info_reproduces(generate, sa3, work):
    flags = ["--prompt", "drum fill", "--cfg", "3", "--negative-prompt", "vocals", "--cfg-rescale", "0.7",
             "--cfg-norm-threshold", "0.5", "--cfg-interval", "0,0.95", "--shift", "flux:alpha_min=2,alpha_max=2",
             "--steps", "3", "--format", "wav32f"]
    code, _, err = generate(*flags, "--out", "a.wav")
    assert code == 0, err
    meta = read_metadata(work / "output" / "a.wav")
    assert (meta["cfg_rescale"], meta["cfg_norm_threshold"], meta["cfg_interval"], meta["shift"]) == (
        0.7, 0.5, [0.0, 0.95], "flux:alpha_min=2.0,alpha_max=2.0")
    command = info_command(sa3, work / "output" / "a.wav")
    for words in ("--cfg-rescale 0.7", "--cfg-norm-threshold 0.5", "--cfg-interval 0.0,0.95",
                  "--shift flux:alpha_min=2.0,alpha_max=2.0"):
        assert words in command
    code, _, err = generate(*shlex.split(command)[1:], "--out", "again.wav")
    assert code == 0, err
    a = read(work / "output" / "a.wav")
    np.testing.assert_array_equal(read(work / "output" / "again.wav"), a)
    # Each setting changes the audio.
    for i, (flag, value) in enumerate((("--cfg-rescale", "0"), ("--cfg-norm-threshold", "0"),
                                       ("--cfg-interval", "0,1"), ("--shift", "model"))):
        at = flags.index(flag)
        changed = flags[:at + 1] + [value] + flags[at + 2:]
        assert generate(*changed, "--out", f"b{i}.wav")[0] == 0
        assert not np.array_equal(read(work / "output" / f"b{i}.wav"), a), flag


def test_guidance_outside_its_interval_is_the_unguided_run(generate, work):
    """2 pingpong steps evaluate at sigma 1 and 0.891: an interval holding neither is cfg 1, bit for bit."""
    assert generate("--prompt", "bell", "--format", "wav32f", "--out", "plain.wav")[0] == 0
    code, _, err = generate("--prompt", "bell", "--cfg", "4", "--cfg-interval", "0.2,0.6", "--format", "wav32f",
                            "--out", "outside.wav")
    assert code == 0, err
    np.testing.assert_array_equal(read(work / "output" / "outside.wav"), read(work / "output" / "plain.wav"))
    assert generate("--prompt", "bell", "--cfg", "4", "--cfg-interval", "0.95,1", "--format", "wav32f",
                    "--out", "first.wav")[0] == 0
    assert not np.array_equal(read(work / "output" / "first.wav"), read(work / "output" / "plain.wav"))


@pytest.mark.parametrize("sampler", ["rk4", "dpmpp", "euler"])
def test_base_model_samplers_end_to_end(sa3, work, base_model, sampler):
    code, out, err = sa3("--prompt", "glass", "--model", base_model, "--sampler", sampler, "--steps", "2",
                         "--seconds", "1", "--seed", "3", "--cfg", "2", "--format", "wav32f", "--out", "a.wav")
    assert code == 0, err
    path = work / "output" / "a.wav"
    assert read_metadata(path)["sampler"] == sampler
    command = info_command(sa3, path)
    assert f"--sampler {sampler}" in command and f"--model {base_model}" in command
    code, _, err = sa3(*shlex.split(command)[1:], "--out", "again.wav")
    assert code == 0, err
    np.testing.assert_array_equal(read(work / "output" / "again.wav"), read(path))


def test_samplers_differ_on_the_base_model(base_model):
    pipe = Pipeline(str(base_model), progress=False)
    assert pipe.defaults.objective == "rectified_flow" and pipe.defaults.samplers == ("euler", "rk4", "dpmpp")
    runs = {name: pipe.generate("glass", seconds=1.0, steps=3, seed=2, sampler=name).latents
            for name in ("euler", "rk4", "dpmpp")}
    assert not np.array_equal(runs["euler"], runs["rk4"]) and not np.array_equal(runs["euler"], runs["dpmpp"])


@pytest.mark.parametrize("args, words", [
    (["--cfg-rescale", "1.5"], "--cfg-rescale must be in [0, 1] (got 1.5)"),
    (["--cfg-rescale", "nan"], "--cfg-rescale expects a finite number (got 'nan')"),
    (["--cfg-norm-threshold", "-1"], "--cfg-norm-threshold must be in [0, 10000] (got -1)"),
    (["--cfg-norm-threshold", "1e5"], "--cfg-norm-threshold must be in [0, 10000] (got 100000)"),
    (["--cfg-interval", "0.6,0.2"], "--cfg-interval 0.6,0.2 needs 0 <= LO <= HI <= 1"),
    (["--cfg-interval", "0.5"], "--cfg-interval expects LO,HI, e.g. 0.2,0.8 (got '0.5')"),
    (["--cfg-interval", "-0.1,0.5"], "--cfg-interval -0.1,0.5 needs 0 <= LO <= HI <= 1"),
    (["--cfg-interval", "0,x"], "--cfg-interval expects a number (got 'x')"),
    (["--shift", "foo"], "--shift must be one of model, none, logsnr, flux, full"),
    (["--shift", "flux:alpha=2"], "--shift flux has no parameter 'alpha' (its parameters: min_length, max_length, "
                                  "alpha_min, alpha_max)"),
    (["--shift", "flux:alpha_min=0"], "--shift flux: alpha_min must be in [0.1, 20] (got 0)"),
    (["--shift", "logsnr:anchor_length=2.5"], "--shift logsnr: anchor_length expects a whole number (got '2.5')"),
    (["--shift", "none:rate=1"], "--shift none takes no parameters"),
    (["--shift", "flux:min_length=5000"], "--shift flux: min_length must be below max_length (got 5000 and 4096)"),
    (["--shift", "logsnr:anchor_logsnr=0,rate=0,logsnr_end=-2", "--steps", "6"],
     "--shift logsnr:anchor_logsnr=0.0,rate=0.0,logsnr_end=-2.0 gives noise levels that do not fall steadily to 0 "
     "over 6 steps of 1.5 s (1, 0.5826, 0.6608, 0.7311, 0.7914, 0.8411, ...)"),
    (["--sampler", "rk4"], "--sampler rk4 does not suit sm-music: rf_denoiser models take pingpong"),
    (["--sampler", "euler"], "--sampler euler does not suit sm-music: rf_denoiser models take pingpong"),
])
def test_bad_values_are_one_error_line(generate, work, args, words):
    code, out, err = generate("--prompt", "x", *args)
    assert code == 2 and words in one_error_line(err), err
    assert out == "" and not [p for p in work.rglob("*") if p.is_file()]  # nothing written


def test_pingpong_on_a_base_model_is_refused(sa3, work, base_model):
    code, out, err = sa3("--prompt", "x", "--model", base_model, "--sampler", "pingpong", "--seconds", "1")
    assert code == 2 and f"--sampler pingpong does not suit {base_model}: rectified_flow models take euler, rk4 " \
                         "or dpmpp" in one_error_line(err)
    with pytest.raises(SettingsError, match=r"^sampler pingpong does not suit"):
        Pipeline(str(base_model), progress=False).plan(table.validate({"prompt": "x", "sampler": "pingpong"}))


def test_studio_refuses_a_sampler_the_model_does_not_take_when_submitted(bundle, tmp_path):
    from sa3_mlx.studio.jobs import Studio

    studio = Studio(tmp_path / "out", weights_dir=bundle)
    try:
        with pytest.raises(BadRequest, match="^sampler dpmpp does not suit sm-music: rf_denoiser models take pingpong$"):
            studio.submit(parse_request({"prompt": "x", "sampler": "dpmpp"}, Limits()))
        assert studio.jobs == {} and studio.history.get("0" * 16) is None
    finally:
        studio.close()


@pytest.mark.parametrize("local,padding", [(False, False), (True, True)])
def test_compiled_steps_equal_the_uncompiled_ones_in_half_precision(local, padding):
    """What the GPU runs (steps under mx.compile, kept across generations) against the plain ops, on the CPU."""
    from sa3_mlx.models.dit import DiT, DiTConfig

    config = DiTConfig(io_channels=8, embed_dim=64, depth=2, num_heads=2, head_dim=32, cond_token_dim=16,
                       global_cond_dim=12, local_add_cond_dim=9, num_memory_tokens=3, ff_inner=96,
                       timestep_features_dim=16, differential=True)
    mx.random.seed(0)
    dit = DiT(config)
    dit.set_dtype(mx.float16)
    keys = mx.random.split(mx.random.key(1), 5)
    cross = mx.random.normal((1, 7, 16), key=keys[0])
    glob = mx.random.normal((1, 12), key=keys[1])
    local_cond = mx.random.normal((2, 21, 9), key=keys[2]) if local else None
    mask = mx.broadcast_to(mx.arange(21) < 17, (1, 21)) if padding else None
    noise = mx.random.normal((2, 8, 21), key=keys[3])
    sigmas = mx.array([1.0, 0.6, 0.2, 0.0])

    def step_noise(i, shape, dtype):
        return mx.random.normal(shape, key=mx.random.key(100 + i)).astype(dtype)

    outs = []
    for compiled in (True, False):
        denoiser = Denoiser(dit, compile_steps=compiled)
        for _ in range(2):  # the second generation reuses what the first compiled
            states = list(denoiser.steps(noise, sigmas, cross, glob, mx.zeros_like(cross), Guidance(scale=3.0),
                                         step_noise, local_cond, mask, "pingpong", mx.float16))
            outs.append(np.array(states[-1].astype(mx.float32)))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[2], outs[3])
    # Equal on the CPU (measured); a GPU's fused kernels may round fp16 element-wise chains once instead of
    # per op: a few fp16 ulps (1e-3 relative) through three steps.
    scale = np.abs(outs[2]).max()
    assert_close(outs[0], outs[2], atol=5e-3 * scale, rtol=0, what="compiled vs plain fp16 sampling")
