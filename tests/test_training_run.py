"""`sa3 encode` / `sa3 train` end to end on the tiny upstream checkpoint: data, captions, cache,
checkpoints, Ctrl-C, exact resume, the loss going down, the LoRA changing the audio."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file

from sa3_mlx import lora, upstream
from sa3_mlx.commands import Terminated, main
from sa3_mlx.training import data as data_mod
from sa3_mlx.training.run import TrainConfig, Trainer, train

RATE = 44100


@pytest.fixture(scope="module")
def ckpt(golden) -> Path:
    return golden / "upstream_ckpt"


@pytest.fixture(scope="module")
def model(ckpt):
    return upstream.load(ckpt)


def _clips(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(2.0 * RATE)) / RATE
    sf.write(folder / "tone_a.wav", np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2, 1), RATE)
    sub = folder / "more"
    sub.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    sf.write(sub / "noise.flac", 0.2 * rng.standard_normal(RATE), 22050)  # mono, another rate, 2 s
    (sub / "noise.txt").write_text("a noise burst\n")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return _clips(tmp_path_factory.mktemp("clips"))


def _config(clips, out, **kw) -> TrainConfig:
    base = dict(data=str(clips), model=str(Path(kw.pop("ckpt"))), out=str(out), rank=4, lr=1e-3, crop=16, seed=3,
                save_every=0, plot_every=0, steps=12, batch_size=2)
    base.update(kw)
    return TrainConfig(**base)


def test_captions_in_order(tmp_path):
    import mutagen.flac

    rng = np.random.default_rng(0)
    audio = 0.1 * rng.standard_normal((RATE, 2))
    for name in ("j", "t", "g", "plain_name"):
        sf.write(tmp_path / f"{name}.flac", audio, RATE)
    (tmp_path / "j.json").write_text(json.dumps({"prompt": "warm pad", "genre": "ambient", "bpm": 90}))
    (tmp_path / "j.txt").write_text("not this one")
    (tmp_path / "t.txt").write_text("  solo   cello ")
    tagged = mutagen.flac.FLAC(str(tmp_path / "g.flac"))
    tagged["genre"], tagged["bpm"], tagged["title"] = "Techno", "128", "Night"
    tagged.save()
    warnings = []
    caps = {n: data_mod.read_caption(tmp_path / f"{n}.flac", warnings.append) for n in ("j", "t", "g", "plain_name")}
    assert (caps["j"].source, caps["j"].prompt, caps["j"].pieces) == ("json", "warm pad", ["Genre: ambient", "BPM: 90"])
    assert (caps["t"].source, caps["t"].prompt) == ("txt", "solo cello")
    assert caps["g"].source == "tags" and sorted(caps["g"].pieces) == ["BPM: 128", "Genre: Techno", "Title: Night"]
    assert (caps["plain_name"].source, caps["plain_name"].prompt) == ("filename", "plain name")
    texts = {data_mod.caption_text(caps["g"], np.random.default_rng(s)) for s in range(20)}
    assert len(texts) > 1 and all(sorted(t.split(", ")) == sorted(caps["g"].pieces) for t in texts)
    assert data_mod.caption_text(caps["j"], np.random.default_rng(0), trigger="zq").startswith("zq, warm pad, ")
    subsets = [data_mod.caption_text(caps["g"], np.random.default_rng(s), tag_keep=0.4).split(", ") for s in range(30)]
    assert all(1 <= len(t) <= 3 and set(t) <= set(caps["g"].pieces) for t in subsets)
    assert len({len(t) for t in subsets}) > 1
    (tmp_path / "bad.json").write_text("{")
    sf.write(tmp_path / "bad.flac", audio, RATE)
    assert data_mod.read_caption(tmp_path / "bad.flac", warnings.append).source == "filename"
    assert any("bad.json" in w for w in warnings)
    assert not warnings[:-1]


def test_encode_cache_and_warnings(tmp_path, model, ckpt, monkeypatch, capsys):
    folder = _clips(tmp_path / "d")
    (folder / "broken.wav").write_bytes(b"RIFF0000WAVEnot audio")
    sf.write(folder / "silent.wav", np.zeros((RATE, 2)), RATE)
    assert main(["encode", str(folder), "--model", str(ckpt), "--json"]) == 0
    out, err = capsys.readouterr()
    listing = json.loads(out)
    assert len(listing["items"]) == 2
    assert "broken.wav" in err and "silent" in err
    noise = next(i for i in listing["items"] if i["path"].endswith("noise.flac"))
    assert noise["caption"]["source"] == "txt" and noise["valid"] == 22  # 2 s at 44.1 kHz, ceil(88200 / 4096)
    side = json.loads(Path(noise["latents"]).with_suffix(".json").read_text())
    assert side["padding_mask"] == [1] * 22 and abs(side["seconds_total"] - 2.0) < 1e-3
    assert side["caption_source"] == "txt"
    latents = np.load(noise["latents"])["latents"]
    assert latents.shape == (256, 22) and latents.dtype == np.float32

    # The same encoder as generation: the cached latents equal sa3_mlx.codec.encode of the file.
    from sa3_mlx import codec
    from sa3_mlx.audio import read_audio

    encoder = model.load_codec("encoder", mx.float32)
    direct = np.array(codec.encode(encoder, mx.array(read_audio(folder / "more" / "noise.flac")[None]))[0])
    np.testing.assert_array_equal(latents, direct)

    calls = []
    real = codec.encode
    monkeypatch.setattr(codec, "encode", lambda *a: calls.append(1) or real(*a))
    assert main(["encode", str(folder), "--model", str(ckpt)]) == 0
    assert calls == [], "nothing is encoded again"
    sf.write(folder / "tone_a.wav", np.zeros((RATE, 2)) + 0.25, RATE)  # changed content
    assert main(["encode", str(folder), "--model", str(ckpt)]) == 0
    assert len(calls) == 1
    Path(noise["latents"]).write_bytes(b"PK\x03\x04 damaged")  # a damaged cache entry is encoded again
    assert main(["encode", str(folder), "--model", str(ckpt)]) == 0
    assert len(calls) == 2 and np.load(noise["latents"])["latents"].shape == (256, 22)
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["encode", str(empty), "--model", str(ckpt)]) == 2
    assert "no audio files" in capsys.readouterr().err


def test_resume_equals_not_stopping(tmp_path, clips, ckpt):
    """12 steps at once == 5 steps, Ctrl-C (checkpoint), then --resume: same losses, same tensors, bit for bit."""
    whole = train(_config(clips, tmp_path / "whole", ckpt=ckpt))

    def stop_at_5(record):
        if record.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(clips, tmp_path / "split", ckpt=ckpt), on_step=stop_at_5)
    split = tmp_path / "split"
    assert (split / "split-step=5.safetensors").is_file()
    assert json.loads((split / "state.json").read_text())["step"] == 5
    resumed = train(_config(clips, split, ckpt=ckpt), resume=True)
    assert resumed.steps == 12 and len(resumed.log) == 7

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]

    assert losses(split) == losses(tmp_path / "whole") and len(losses(split)) == 12
    a, b = load_file(str(tmp_path / "whole" / "state.safetensors")), load_file(str(split / "state.safetensors"))
    assert a.keys() == b.keys()
    # the state by the saved names, whatever layout the trainer steps in (TrainStep.pack)
    names = {k[len("lora/"):] for k in a if k.startswith("lora/")}
    assert {k for k in a if k.startswith("opt/")} == {f"opt/{n}.{x}" for n in names for x in "mv"}
    assert not any("packed." in k for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (tmp_path / "whole" / "whole-step=12.safetensors").read_bytes() != b""
    assert whole.lora.name == "whole-step=12.safetensors"


def test_sigterm_saves_and_reports(tmp_path, clips, ckpt, monkeypatch, capsys):
    """SIGTERM (the entry point's Terminated) in the CLI: a checkpoint, a resume hint, exit 128 + 15."""
    from sa3_mlx.training import run as run_mod

    real = run_mod.Trainer.train_step

    def step(self):
        record = real(self)
        if record.step == 3:
            raise Terminated(15)
        return record

    monkeypatch.setattr(run_mod.Trainer, "train_step", step)
    out = tmp_path / "term"
    code = main(["train", str(clips), "--model", str(ckpt), "--out", str(out), "--steps", "10", "--rank", "2",
                 "--crop", "8", "--save-every", "0"])
    err = capsys.readouterr().err
    assert code == 128 + 15
    assert (out / "term-step=3.safetensors").is_file() and "--resume" in err


def test_train_end_to_end(tmp_path, clips, ckpt, model, capsys, monkeypatch):
    """40 steps from the CLI: files, a lower loss on fixed batches, a LoRA that loads and changes the audio."""
    out = tmp_path / "e2e"
    code = main(["train", str(clips), "--model", str(ckpt), "--out", str(out), "--steps", "40", "--rank", "4",
                 "--lr", "2e-3", "--crop", "16", "--batch-size", "2", "--save-every", "20", "--plot-every", "20",
                 "--seed", "1", "--adapter", "lora", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["steps"] == 40 and summary["files"] == 2 and summary["trainable_parameters"] > 0
    for name in ("e2e-step=20.safetensors", "e2e-step=40.safetensors", "state.json", "state.safetensors",
                 "train_config.json", "loss.png", "loss_by_timestep.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "t"} <= set(rows[0])

    # The loss on the same 12 batches (fixed draws), before and after training.
    config = TrainConfig.from_json(json.loads((out / "train_config.json").read_text()))
    trainer = Trainer(config, model=model, warn=lambda s: None)
    initial = trainer.params
    from sa3_mlx.training.checkpoint import load_state

    trained, _, _ = load_state(out)
    before, after = [], []
    for k in range(1, 13):
        batch, _ = trainer.make_batch(trainer.next_items(), k)
        before.append(float(trainer.step_fn.forward(initial, batch)["loss"]))
        after.append(float(trainer.step_fn.forward(trained, batch)["loss"]))
    assert np.mean(after) < 0.85 * np.mean(before), (np.mean(before), np.mean(after))

    file = lora.read_lora(out / "e2e-step=40.safetensors")
    assert (file.adapter_type, file.rank) == ("lora", 4)
    audio = []
    for extra in ([], ["--lora", str(out / "e2e-step=40.safetensors")]):
        (tmp_path / f"gen{len(audio)}").mkdir()
        monkeypatch.chdir(tmp_path / f"gen{len(audio)}")
        assert main(["--prompt", "tone", "--model", str(ckpt), "--seconds", "1", "--steps", "2", "--seed", "5",
                     "--json", *extra]) == 0
        path = json.loads(capsys.readouterr().out)["outputs"][0]["path"]
        audio.append(sf.read(path)[0])
    assert audio[0].shape == audio[1].shape
    assert np.abs(audio[0] - audio[1]).max() > 1e-3, "the LoRA changes the generated audio"


def test_bad_settings_are_one_line_errors(tmp_path, clips, ckpt, capsys):
    code = main(["train", str(clips), "--model", str(ckpt), "--include", "transformer.layers[0-0]", "--steps", "1",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "select no module" in capsys.readouterr().err
    assert main(["train", str(clips), "--model", str(ckpt), "--rank", "0"]) == 2
    assert main(["train", str(tmp_path / "missing"), "--model", str(ckpt)]) == 2
    assert main(["train", str(clips), "--model", str(ckpt), "--resume", str(tmp_path / "none")]) == 2
    assert "no train_config.json" in capsys.readouterr().err
    assert main(["train", str(clips), "--model", str(ckpt), "--fused", "--compiled-step", "on"]) == 2
    assert "error: --fused and --compiled-step on are two ways of compiling the step: choose one" in \
        capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_base_with_checkpointing(tmp_path, clips, ckpt, precision):
    """A bf16/fp16 frozen base (LoRA tensors stay fp32), with gradient checkpointing: finite
    losses, close to the fp32 run's first step."""
    full = train(_config(clips, tmp_path / "fp32", ckpt=ckpt, steps=3))
    half = train(_config(clips, tmp_path / precision, ckpt=ckpt, steps=3, base_precision=precision,
                         checkpointing=True))
    from sa3_mlx.training.checkpoint import load_state

    params, _, _ = load_state(tmp_path / precision)
    assert all(np.asarray(v).dtype == np.float32 for v in params.values())
    losses = [r["loss"] for r in half.log]
    assert all(np.isfinite(losses))
    assert abs(losses[0] - full.log[0]["loss"]) < 0.05 * full.log[0]["loss"]


def test_compiled_step_trains_as_the_plain_step(tmp_path, clips, ckpt, capsys):
    """sa3 train --compiled-step on (the GPUs' default): the plain run's losses; the CLI says what the first step
    does."""
    plain = train(_config(clips, tmp_path / "plain", ckpt=ckpt, steps=4, compiled_step=False))
    code = main(["train", str(clips), "--model", str(ckpt), "--out", str(tmp_path / "compiled"), "--rank", "4",
                 "--lr", "1e-3", "--crop", "16", "--seed", "3", "--save-every", "0", "--plot-every", "0",
                 "--steps", "4", "--batch-size", "2", "--compiled-step", "on", "--quiet"])
    assert code == 0
    assert "the first step traces the compiled step" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "compiled" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4
    for a, b in zip(log, plain.log):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
    assert json.loads((tmp_path / "compiled" / "train_config.json").read_text())["compiled_step"] is True


def test_merged_weights_train_as_the_factored_step(tmp_path, clips, ckpt):
    """sa3 train --merged-weights on (the GPUs' default: each stack forms its layers' adapted weights once per
    step): the factored run's losses, and the same saved adapter; recorded in the run's config."""
    plain = train(_config(clips, tmp_path / "plain", ckpt=ckpt, steps=4, merged_weights=False))
    code = main(["train", str(clips), "--model", str(ckpt), "--out", str(tmp_path / "merged"), "--rank", "4",
                 "--lr", "1e-3", "--crop", "16", "--seed", "3", "--save-every", "0", "--plot-every", "0",
                 "--steps", "4", "--batch-size", "2", "--merged-weights", "on", "--quiet"])
    assert code == 0
    log = [json.loads(line) for line in (tmp_path / "merged" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4
    for a, b in zip(log, plain.log):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
    assert json.loads((tmp_path / "merged" / "train_config.json").read_text())["merged_weights"] is True
    from safetensors.numpy import load_file

    mine = load_file(str(next((tmp_path / "merged").glob("*step=4.safetensors"))))
    theirs = load_file(str(plain.lora))
    assert set(mine) == set(theirs)
    for k in theirs:
        np.testing.assert_allclose(mine[k].astype(np.float32), theirs[k].astype(np.float32), rtol=1e-2, atol=1e-4,
                                   err_msg=k)


def test_python_api(tmp_path, clips, ckpt):
    import sa3_mlx

    seen = []
    run = sa3_mlx.train(clips, ckpt, out=str(tmp_path / "api"), steps=2, rank=2, crop=8, save_every=0,
                        plot_every=0, on_step=seen.append)
    assert [r.step for r in seen] == [1, 2] and run.lora.is_file() and len(run.log) == 2


def test_demo_clips(tmp_path, clips, ckpt, capsys):
    out = tmp_path / "demo"
    assert main(["train", str(clips), "--model", str(ckpt), "--out", str(out), "--steps", "4", "--rank", "2",
                 "--crop", "8", "--demo-every", "2", "--demo-prompts", "tone|noise", "--demo-seconds", "1",
                 "--plot-every", "0"]) == 0
    from sa3_mlx.audio import read_metadata

    for step in (2, 4):
        files = sorted((out / "demos" / f"step={step}").glob("*.wav"))
        assert [f.name for f in files] == ["00-tone.wav", "01-noise.wav"]
        meta = read_metadata(files[0])
        assert meta["prompt"] == "tone" and meta["training_step"] == step
        assert meta["loras"][0].startswith(str(out / f"demo-step={step}.safetensors"))
    capsys.readouterr()
    assert main(["train", str(clips), "--model", str(ckpt), "--demo-every", "2"]) == 2
    assert "--demo-prompts" in capsys.readouterr().err


def test_xs_bases_are_computed_once_per_run(tmp_path, clips, ckpt, monkeypatch):
    from sa3_mlx.training import adapters

    out = tmp_path / "xs"
    train(_config(clips, out, ckpt=ckpt, steps=2, adapter="lora-xs"))
    assert (out / "svd_bases.safetensors").is_file()
    monkeypatch.setattr(adapters, "svd_bases", lambda *a: (_ for _ in ()).throw(AssertionError("SVD again")))
    resumed = train(_config(clips, out, ckpt=ckpt, steps=4, adapter="lora-xs"), resume=True)
    assert resumed.steps == 4 and lora.read_lora(resumed.lora).adapter_type == "lora-xs"


def test_every_train_flag_is_in_the_readme():
    from sa3_mlx.cli.train import build_train_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Train your own LoRA"):readme.index("## Linux CPU")]
    flags = [o for a in build_train_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    missing = [f for f in flags if f"`{f}" not in section]
    assert not missing, f"flags not in the README's table: {missing}"
