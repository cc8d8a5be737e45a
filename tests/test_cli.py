"""The ``sa3`` command end to end on a tiny bundle of the eight official files (random weights).

Generation runs in-process through ``sa3_mlx.commands.main`` (stdout captured, so not a
terminal: the quiet, machine-readable mode). What needs a real process (a terminal,
Ctrl-C, a full disk, the hub) runs ``python -m sa3_mlx``.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import resource
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from sa3_mlx import codec, hub, output
from sa3_mlx.audio import SAMPLE_RATE, integrated_loudness, read_audio, read_metadata, to_db, true_peak
from sa3_mlx.commands import main
from sa3_mlx.cli.generate import build_parser
from sa3_mlx.cli.picker import pick
from sa3_mlx.pipeline import Pipeline
from sa3_mlx.plan import inpaint_keep_mask
from tests.bundle import build_tiny_bundle
from tests.hub_standin import HubStandIn

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_LATENT = codec.SAMPLES_PER_LATENT
# A decoded latent depends on latents at most this far away (measured on the tiny codecs:
# SAME-S 2-3 through its pairs of shifted chunks, SAME-L 4 = blocks x sliding window).
DECODER_REACH = 4




def read(path) -> np.ndarray:
    """A file's samples as float32 ``[channels, samples]``."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE
    return data.T


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden temporaries included); [] when it does not exist."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---- every mode, end to end --------------------------------------------------------------


def test_text_to_audio_file_metadata_and_info(generate, sa3, work):
    code, out, err = generate("--prompt", "lofi house loop", "--seconds", "2", "--steps", "3", "--seed", "7")
    assert code == 0, err
    assert out == "output/lofi_house_loop_7.wav\n"  # not a terminal: only the path
    path = work / "output" / "lofi_house_loop_7.wav"
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (44100, 2, 2 * 44100, "PCM_16")
    meta = read_metadata(path)
    expected = dict(model="sm-music", decoder="same-s", prompt="lofi house loop", negative_prompt=None, seconds=2.0,
                    steps=3, seed=7, cfg=1.0, apg=1.0, mode="text-to-audio", init_noise_level=1.0, inpaint=[],
                    num_outputs=1, format="wav16", loudness=None, init_audio=None,
                    dit_dtype="fp32" if mx.default_device() == mx.cpu else "fp16")  # each device's default
    assert {k: meta[k] for k in expected} == expected
    code, out, err = sa3("info", path, "--json")
    assert code == 0 and json.loads(out) == meta


def test_same_seed_same_audio_and_info_command_reproduces(generate, sa3, work, init_wav):
    init = init_wav(2.0)
    settings = ["--prompt", "drum fill", "--dit", "sm-sfx", "--seconds", "2.5", "--steps", "3", "--cfg", "2.5",
                "--apg", "0.5", "--negative-prompt", "vocals", "--init-audio", init, "--inpaint-range", "0.5,1",
                "--format", "flac"]
    assert generate(*settings, "--seed", "3", "--out", "a.flac")[0] == 0
    assert generate(*settings, "--seed", "3", "--out", "b.flac")[0] == 0
    assert generate(*settings, "--seed", "4", "--out", "c.flac")[0] == 0
    a, b, c = (read(work / "output" / name) for name in ("a.flac", "b.flac", "c.flac"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)

    # `sa3 info` prints the command that makes the file again.
    code, out, _ = sa3("info", work / "output" / "a.flac")
    command = re.search(r"^\s*command\s+(sa3 .*)$", out, re.M).group(1)
    code, _, err = generate(*shlex.split(command)[1:], "--out", "again.flac")
    assert code == 0, err
    np.testing.assert_array_equal(read(work / "output" / "again.flac"), a)


def test_batch_is_seeds_in_a_row_and_files_are_numbered(generate, work):
    code, out, err = generate("--prompt", "rain on a tin roof", "--dit", "sm-sfx", "--seed", "20",
                              "--num-outputs", "3", "--format", "wav32f", "--out", "rain")
    assert code == 0, err
    names = [f"output/rain_{i}.wav" for i in (1, 2, 3)]
    assert out.splitlines() == names
    assert [read_metadata(work / n)["seed"] for n in names] == [20, 21, 22]
    assert {read_metadata(work / n)["num_outputs"] for n in names} == {1}
    batch = [read(work / n) for n in names]
    assert all(a.shape == (2, int(1.5 * SAMPLE_RATE)) for a in batch)
    # Item i of the batch is the single run with seed 20 + i (up to the rounding of batched matmuls).
    assert generate("--prompt", "rain on a tin roof", "--dit", "sm-sfx", "--seed", "21", "--format", "wav32f",
                    "--out", "single")[0] == 0
    np.testing.assert_allclose(read(work / "output" / "single.wav"), batch[1], atol=1e-5)
    assert not np.array_equal(batch[0], batch[1])


def test_audio_to_audio_any_rate_mono_trimmed(generate, work, init_wav):
    init = init_wav(2.5, rate=22050, channels=1)
    code, out, err = generate("--prompt", "jazz trio", "--init-audio", init, "--seconds", "2", "--out", "a2a.wav")
    assert code == 0, err
    assert "only its first 2 s are used" in err
    meta = read_metadata(work / "output" / "a2a.wav")
    assert meta["mode"] == "audio-to-audio" and meta["init_noise_level"] == 0.9  # the upstream default
    assert read(work / "output" / "a2a.wav").shape == (2, 2 * SAMPLE_RATE)
    code, _, err = generate("--prompt", "jazz trio", "--init-audio", init, "--seconds", "2",
                            "--init-noise-level", "0.4", "--out", "a2a_04.wav")
    assert code == 0, err
    assert read_metadata(work / "output" / "a2a_04.wav")["init_noise_level"] == 0.4
    assert not np.array_equal(read(work / "output" / "a2a.wav"), read(work / "output" / "a2a_04.wav"))


@pytest.mark.parametrize(
    "dit, init_seconds, seconds, ranges, mode",
    [
        ("sm-music", 3.0, 3.0, ["0.8,1.3"], "inpainting"),
        ("medium", 3.0, 3.0, ["0.3,0.6", "1.5,2.2"], "inpainting"),
        ("sm-music", 1.0, 2.5, [], "continuation"),
    ],
)
def test_inpainting_and_continuation_keep_the_audio_outside(
    generate, work, bundle, init_wav, dit, init_seconds, seconds, ranges, mode
):
    init = init_wav(init_seconds)
    flags = [x for r in ranges for x in ("--inpaint-range", r)]
    code, _, err = generate("--prompt", "drum fill", "--dit", dit, "--init-audio", init, *flags,
                            "--seconds", str(seconds), "--steps", "3", "--seed", "5", "--format", "wav32f",
                            "--out", "inpainted.wav")
    assert code == 0, err
    output = read(work / "output" / "inpainted.wav")
    assert output.shape == (2, int(seconds * SAMPLE_RATE))
    meta = read_metadata(work / "output" / "inpainted.wav")
    assert meta["mode"] == mode

    # The same run through the Python API: the kept latents are the encoded init audio, bit for bit.
    pipe = Pipeline(dit, weights_dir=bundle, progress=False)
    audio = read_audio(init)
    spans = [tuple(float(x) for x in r.split(",")) for r in ranges]
    result = pipe.generate("drum fill", seconds=seconds, steps=3, seed=5, init_audio=audio, inpaint=spans)
    assert [tuple(r) for r in meta["inpaint"]] == [tuple(r) for r in result.settings.inpaint]
    np.testing.assert_array_equal(result.audio[0], output)  # the CLI wrote exactly this run

    n = result.latents.shape[-1]
    keep = inpaint_keep_mask(result.plan.inpaint, seconds, n).astype(bool)  # continuation tail included
    assert keep.any() and not keep.all()
    padded = np.zeros((2, n * SAMPLES_PER_LATENT), np.float32)
    padded[:, : min(audio.shape[1], padded.shape[1])] = audio[:, : padded.shape[1]]
    # The encoder at the pipeline's codec precision (fp16 for SAME-L on a GPU), as the pipeline runs it.
    init_latents = np.array(codec.encode(pipe.encoder, mx.array(padded[None]).astype(pipe.codec_dtype))
                            .astype(mx.float32))[..., :n]
    np.testing.assert_array_equal(result.latents[0][:, keep], init_latents[0][:, keep])
    assert np.abs(result.latents[0][:, ~keep] - init_latents[0][:, ~keep]).max() > 1e-2

    # In the audio: away from the regenerated latents (more than the decoder's reach), the output
    # is the decode of the init latents; inside them it is new.
    decoded = np.array(codec.unpatchify(codec.decode(pipe.decoder, mx.array(init_latents).astype(pipe.codec_dtype)))
                       .astype(mx.float32))[0, :, : output.shape[1]]
    regenerated = np.flatnonzero(~keep)
    distance = np.abs(np.arange(n)[:, None] - regenerated[None, :]).min(axis=1)
    far = np.repeat(distance > DECODER_REACH, SAMPLES_PER_LATENT)[: output.shape[1]]
    inside = np.repeat(~keep, SAMPLES_PER_LATENT)[: output.shape[1]]
    assert far.sum() >= 4 * SAMPLES_PER_LATENT
    np.testing.assert_allclose(output[:, far], decoded[:, far], atol=1e-5)
    # (The tiny random decoder is mostly biases, so new latents move its audio only a little.)
    assert np.abs(output[:, inside] - decoded[:, inside]).max() > 1e-4


def test_cfg_with_and_without_negative_prompt(generate, work):
    common = ["--prompt", "epic orchestral buildup", "--dit", "medium", "--seed", "2", "--format", "wav32f"]
    assert generate(*common, "--out", "plain.wav")[0] == 0
    assert generate(*common, "--cfg", "3", "--out", "cfg.wav")[0] == 0
    assert generate(*common, "--cfg", "3", "--negative-prompt", "vocals", "--out", "neg.wav")[0] == 0
    plain, cfg, neg = (read(work / "output" / n) for n in ("plain.wav", "cfg.wav", "neg.wav"))
    assert not np.array_equal(plain, cfg) and not np.array_equal(cfg, neg)
    meta = read_metadata(work / "output" / "neg.wav")
    assert (meta["cfg"], meta["negative_prompt"], meta["decoder"]) == (3.0, "vocals", "same-l")
    assert read_metadata(work / "output" / "cfg.wav")["negative_prompt"] is None
    # A negative prompt without guidance does nothing: said so, and the audio is the plain one.
    code, _, err = generate(*common, "--negative-prompt", "vocals", "--out", "ignored.wav")
    assert code == 0 and "negative prompt is ignored" in err
    np.testing.assert_array_equal(read(work / "output" / "ignored.wav"), plain)


def test_a_decoder_other_than_the_dits_own_runs_with_a_warning(generate, work):
    code, out, err = generate("--prompt", "x", "--dit", "sm-music", "--decoder", "same-l")
    assert code == 0 and "sm-music was trained with same-s" in err
    assert read_metadata(work / out.strip())["decoder"] == "same-l"


@pytest.mark.parametrize(
    "args, name, subtype",
    [
        (["--format", "wav24"], "x.wav", "PCM_24"),
        (["--format", "wav32f"], "x.wav", "FLOAT"),
        (["--format", "flac"], "x.flac", "PCM_24"),
        (["--out", "song.flac"], "song.flac", "PCM_24"),  # the format follows the file name
        (["--format", "mp3"], "x.mp3", "MPEG_LAYER_III"),
        (["--out", "song.mp3"], "song.mp3", "MPEG_LAYER_III"),
        (["--format", "ogg"], "x.ogg", "VORBIS"),
        (["--out", "song.opus"], "song.opus", "OPUS"),
    ],
)
def test_output_formats(generate, work, args, name, subtype):
    code, out, err = generate("--prompt", "x", *args)
    assert code == 0, err
    path = work / "output" / (name if "--out" in args else "x_1" + Path(name).suffix)
    assert out.strip() == str(path.relative_to(work))
    info = sf.info(str(path))
    assert (info.subtype, info.channels, info.samplerate) == (subtype, 2, 48000 if subtype == "OPUS" else SAMPLE_RATE)
    meta = read_metadata(path)
    assert meta["prompt"] == "x"
    assert meta["format"] == (args[1] if "--format" in args else output.SUFFIX_FORMATS[path.suffix])


def test_a_format_the_local_libsndfile_lacks_is_one_error_before_generating(generate, work, monkeypatch):
    monkeypatch.setattr(sf, "available_subtypes", lambda container=None: {"PCM_16": "", "PCM_24": "", "FLOAT": ""})
    for args in (["--format", "mp3"], ["--out", "a.opus"]):
        code, out, err = generate("--prompt", "x", *args)
        line = one_error_line(err)
        assert code == 2 and out == "" and line.startswith("error: --format ")
        assert "output needs a libsndfile that encodes" in line and not (work / "output").exists()


def test_mp3_metadata_reproduces_the_run(generate, sa3, work):
    """The settings in the MP3's ID3 comment give back the command, which writes the same MP3 again."""
    code, out, err = generate("--prompt", "déjà vu (tape hiss:0.5), 日本", "--format", "mp3", "--seed", "4")
    assert code == 0, err
    path = work / out.strip()
    meta = read_metadata(path)
    assert (meta["prompt"], meta["format"], meta["seed"]) == ("déjà vu (tape hiss:0.5), 日本", "mp3", 4)
    code, info, _ = sa3("info", path)
    assert code == 0
    command = next(line for line in info.splitlines() if line.strip().startswith("command ")).split("command", 1)[1]
    assert "--format mp3" in command
    words = shlex.split(command)[1:]
    assert generate(*words, "--out", "again.mp3")[0] == 0
    np.testing.assert_array_equal(read(work / "output" / "again.mp3"), read(path))


def test_loudness_and_json_summary(generate, work):
    code, out, err = generate("--prompt", "techno kick", "--seconds", "2", "--loudness", "-20", "--json")
    assert code == 0, err
    (line,) = out.splitlines()  # one JSON document, nothing else on stdout
    summary = json.loads(line)
    (output,) = summary["outputs"]
    assert output["seed"] == 1 and output["loudness_lufs"] == pytest.approx(-20, abs=0.5)
    assert output["true_peak_dbtp"] <= -1.0 and output["peak_dbfs"] <= output["true_peak_dbtp"]
    audio = read(work / output["path"])
    assert integrated_loudness(audio) == pytest.approx(-20, abs=0.5)
    assert to_db(true_peak(audio)) <= -1.0 + 0.01  # 16-bit rounding
    assert summary["settings"]["prompt"] == "techno kick" and summary["loudness"] == -20
    assert [s["name"] for s in summary["stages"]] == [
        "load text encoder", "text encoding", "load DiT", "sampling", "load decoder", "decoding"]
    assert summary["peak_memory_bytes"] > 0 and summary["wall_seconds"] > 0 and summary["audio_seconds"] == 2
    assert read_metadata(work / output["path"])["loudness"] == -20


def test_existing_outputs_are_never_replaced_silently(generate, work):
    assert generate("--prompt", "bell", "--out", "take.wav")[0] == 0
    before = (work / "output" / "take.wav").read_bytes()
    code, _, err = generate("--prompt", "bell", "--seed", "2", "--out", "take.wav")
    assert code == 2 and "already exists" in one_error_line(err) and "--overwrite" in err
    assert (work / "output" / "take.wav").read_bytes() == before
    assert generate("--prompt", "bell", "--seed", "2", "--out", "take.wav", "--overwrite")[0] == 0
    assert (work / "output" / "take.wav").read_bytes() != before
    # Auto-named outputs step aside instead.
    assert generate("--prompt", "bell")[1] == "output/bell_1.wav\n"
    assert generate("--prompt", "bell")[1] == "output/bell_1-2.wav\n"


@pytest.fixture
def generate_asking(sa3, bundle):
    """Like ``generate`` but leaves --dit and --prompt out, so they are asked for."""

    def run(*args):
        return sa3(*args, "--seconds", "1", "--steps", "2", "--weights-dir", bundle)

    return run


def test_model_decoder_and_prompt_are_asked_for(generate_asking, work, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("2\n\nthunder over hills\n"))
    code, out, err = generate_asking()
    assert code == 0, err
    meta = read_metadata(work / out.strip())
    assert (meta["model"], meta["decoder"], meta["prompt"]) == ("sm-sfx", "same-s", "thunder over hills")
    assert re.search(r"^seed \d+$", err, re.M)  # a random seed is printed (stderr: stdout stays paths only)
    assert "Choose a model" in err and "3) medium" in err

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = generate_asking("--dit", "medium")
    assert code == 2 and "no --prompt given" in one_error_line(err)


class FakeTerminal(io.StringIO):
    """A stream that claims to be a terminal, on a file descriptor termios cannot drive."""

    def __init__(self, text: str, fd: int):
        super().__init__(text)
        self._fd = fd

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd


def test_picker_falls_back_to_numbers_without_termios(monkeypatch):
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        monkeypatch.setattr(sys, "stderr", FakeTerminal("", fd))
        monkeypatch.setattr(sys, "stdin", FakeTerminal("\n3\nnope\n1\n", fd))
        assert pick("Choose:", ["a", "b", "c"], "b") == "b"  # tcgetattr fails on /dev/null: numbered prompt
        monkeypatch.setitem(sys.modules, "termios", None)  # a Python without termios (Windows)
        assert pick("Choose:", ["a", "b", "c"], "b") == "c"
        assert pick("Choose:", ["a", "b", "c"], "b") == "a"  # after "nope" is refused
        assert "'nope' is not one of the choices" in sys.stderr.getvalue()
        assert pick("Choose:", ["a", "b", "c"], "b") == "b"  # end of input: the default
    finally:
        os.close(fd)


def test_play_uses_a_player_on_path_or_says_there_is_none(generate, work, monkeypatch):
    bin_dir = work / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    code, _, err = generate("--prompt", "bell", "--play")
    assert code == 0 and "no audio player found" in err
    player = bin_dir / "aplay"
    player.write_text(f"#!/bin/sh\necho \"$@\" > {work / 'played.txt'}\n")
    player.chmod(0o755)
    code, out, _ = generate("--prompt", "bell", "--seed", "2", "--play")
    assert code == 0
    assert (work / "played.txt").read_text().split() == ["-q", out.strip()]


# ---- the terminal, Ctrl-C, a full disk: real processes --------------------------------------------


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(args: list, cwd: Path, interrupt_when: str | None = None, timeout: float = 120,
                    signum: int = signal.SIGINT):
    """Run ``python -m sa3_mlx ARGS`` with a pseudo-terminal as stdout and stderr.

    With ``interrupt_when``, ``signum`` (SIGINT: Ctrl-C) is sent once that text has been printed.
    Returns (exit code, everything printed, colour codes removed).
    """
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="120", TERM="xterm")
    # Ctrl-C as a terminal delivers it even when this suite runs as a background job, whose children inherit an
    # ignored SIGINT (Python then installs no KeyboardInterrupt handler, as a background program should not).
    proc = subprocess.Popen([sys.executable, "-m", "sa3_mlx", *map(str, args)], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    printed, deadline, interrupted = b"", time.monotonic() + timeout, False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                printed += chunk
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
            if interrupt_when and not interrupted and interrupt_when in ANSI_ESCAPE.sub("", printed.decode("utf-8", "replace")):
                time.sleep(0.3)  # a few steps in
                proc.send_signal(signum)
                interrupted = True
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, ANSI_ESCAPE.sub("", printed.decode("utf-8", "replace"))


def test_terminal_output_like_the_official_runner(bundle, work):
    code, text = run_in_terminal(["--prompt", "[lofi] house", "--dit", "sm-music", "--seconds", "1.5", "--steps", "3",
                                  "--seed", "4", "--weights-dir", bundle], work)
    assert code == 0, text
    for expected in ("sa3-mlx", "text-to-audio", "'[lofi] house'", "noise level", "load text encoder", "load DiT",
                     "text encoding", "sampling", "3/3 steps", "decoding", "writing", "Peak memory by stage",
                     "<- max", "x realtime", "seed 4", "▸ saved", "output/lofi_house_4.wav", "dBFS"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert (work / "output" / "lofi_house_4.wav").is_file()


def test_ctrl_c_exits_130_and_leaves_nothing(bundle, work):
    code, text = run_in_terminal(["--prompt", "long", "--dit", "sm-music", "--seconds", "60", "--steps", "1000",
                                  "--seed", "1", "--weights-dir", bundle], work, interrupt_when="/1000 steps")
    assert code == 130, text
    assert "interrupted" in text and "Traceback" not in text
    # Stopped mid-way through sampling: some steps done, the stage never finished.
    assert re.search(r"[1-9]\d*/1000 steps", text) and not re.search(r"sampling\s+\d+ ms", text)
    assert files_in(work / "output") == []


def test_full_disk_is_one_error_and_leaves_nothing(bundle, work):
    def small_file_limit():  # writes past 100 kB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-m", "sa3_mlx", "--prompt", "x", "--dit", "sm-music",
                           "--seconds", "2", "--steps", "2", "--seed", "1", "--weights-dir", str(bundle)],
                          cwd=work, preexec_fn=small_file_limit, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "output/x_1.wav" in line and "File too large" in line
    assert proc.stdout == ""
    assert files_in(work / "output") == []


# ---- bad input: one line, exit 2, nothing written --------------------------------------------------


@pytest.mark.parametrize(
    "args, names",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "eight"], "--steps"),
        (["--seconds", "0"], "--seconds"),
        (["--seconds", "-3"], "--seconds"),
        (["--seconds", "nan"], "--seconds"),
        (["--seconds", "inf"], "--seconds"),
        (["--seconds", "385"], "--seconds"),
        (["--seed", "-1"], "--seed"),
        (["--seed", "1.5"], "--seed"),
        (["--cfg", "-2"], "--cfg"),
        (["--apg", "1.5"], "--apg"),
        (["--init-noise-level", "0"], "--init-noise-level"),
        (["--num-outputs", "0"], "--num-outputs"),
        (["--dit", "large"], "--dit"),
        (["--decoder", "same-xl"], "--decoder"),
        (["--dit-dtype", "fp8"], "--dit-dtype"),
        (["--format", "aac"], "--format"),
        (["--out", "song.m4a"], "--out"),
        (["--out", "song.mp3", "--format", "ogg"], "--format"),
        (["--out", "song.wav", "--format", "flac"], "--format"),
        (["--loudness", "3"], "--loudness"),
        (["--loudness", "-14", "--seconds", "0.2"], "--loudness"),
        (["--inpaint-range", "4"], "--inpaint-range"),
        (["--inpaint-range", "3,2"], "--inpaint-range"),
        (["--inpaint-range", "-1,1"], "--inpaint-range"),
        (["--inpaint-range", "0.5,1"], "--init-audio"),
        (["--weights-dir", "/nonexistent/weights"], "--weights-dir"),
        (["--frobnicate"], "--frobnicate"),
    ],
)
def test_bad_flag_values(sa3, work, args, names):
    code, out, err = sa3("--prompt", "x", "--dit", "sm-music", *args)
    assert code == 2
    assert names in one_error_line(err)
    assert out == "" and not (work / "output").exists()


def test_inpaint_range_beyond_the_length(generate, work, init_wav):
    code, _, err = generate("--prompt", "x", "--init-audio", init_wav(2.0), "--seconds", "2",
                            "--inpaint-range", "1.5,2.5")
    assert code == 2 and "ends after --seconds 2" in one_error_line(err)


def test_bad_init_audio(generate, work):
    (work / "notes.txt").write_text("not audio")
    sf.write(work / "empty.wav", np.zeros((0, 2), np.float32), SAMPLE_RATE)
    sf.write(work / "surround.wav", np.zeros((4410, 6), np.float32), SAMPLE_RATE)
    for name, reason in (("missing.wav", "no such file"), ("notes.txt", "not a readable audio file"),
                         ("empty.wav", "no audio samples"), ("surround.wav", "6 channels")):
        code, out, err = generate("--prompt", "x", "--init-audio", name)
        line = one_error_line(err)
        assert code == 2 and name in line and reason in line
    assert files_in(work / "output") == []


@pytest.fixture
def weights_copy(bundle, work) -> Path:
    """A weights folder linking the bundle's files, to break one of them."""
    folder = work / "weights"
    folder.mkdir()
    for f in bundle.iterdir():
        (folder / f.name).symlink_to(f)
    return folder


def test_missing_or_corrupt_weight_files(sa3, work, weights_copy, bundle):
    dit = weights_copy / hub.MODELS["sm-music"].dit_file
    args = ["--prompt", "x", "--dit", "sm-music", "--seconds", "1", "--steps", "1", "--weights-dir", weights_copy]

    dit.unlink()
    code, _, err = sa3(*args)
    assert code == 2 and dit.name in one_error_line(err) and "sa3 download" in err

    dit.write_bytes((bundle / dit.name).read_bytes()[:200_000])  # truncated download
    code, _, err = sa3(*args)
    assert code == 2 and dit.name in one_error_line(err) and "download it again" in err

    arrays = dict(np.load(bundle / dit.name))
    del arrays["transformer.layers.1.to_local_embed.seq.2.bias"]
    dit.unlink()
    np.savez(dit, **arrays)
    code, _, err = sa3(*args)
    line = one_error_line(err)
    assert code == 2 and dit.name in line and "missing key 'transformer.layers.1.to_local_embed.seq.2.bias'" in line
    assert files_in(work / "output") == []


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output_fails_before_generating(generate, work, where):
    # Tests run as root, who ignores permission bits: use places no one can create files in.
    if where == "under-a-file":
        (work / "afile").write_text("x")
        out = work / "afile" / "x.wav"
    else:
        out = Path("/proc/sa3-test-output.wav")
    code, _, err = generate("--prompt", "x", "--out", out)
    line = one_error_line(err)
    assert code == 2 and str(out) in line and "choose another --out" in line


def test_info_on_foreign_or_missing_files(sa3, work):
    sf.write(work / "plain.wav", np.zeros((100, 2)), SAMPLE_RATE)
    code, _, err = sa3("info", work / "plain.wav")
    assert code == 2 and "no sa3-mlx settings" in one_error_line(err)
    code, _, err = sa3("info", work / "nothing.wav")
    assert code == 2 and "no such file" in one_error_line(err)


# ---- the other commands, help and README ---------------------------------------------------------------


def test_doctor_reports_backend_blas_and_weights(sa3, bundle):
    code, out, err = sa3("doctor", "--weights-dir", bundle, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["backend"] in ("cpu", "metal", "cuda") and report["device"] and report["platform"]
    assert report["fp32_matmul_gflops"] > 0
    if "cpu" in report["device"]:
        assert report["blas"]
        from sa3_mlx.kernels import onednn

        assert report["bf16 path"].startswith("oneDNN" if onednn.available() else "not available")
        # Large freed buffers are kept for reuse (glibc); SA3_REUSE_MEMORY=0 turns it off.
        assert report["memory reuse"] == ("on" if sys.platform == "linux" else "not needed on this platform")
    for f in bundle.iterdir():
        assert report["weights"][f.name] == {"path": str(f), "bytes": f.stat().st_size}


def test_an_openblas_core_type_below_the_cpu_is_reported_not_changed(sa3, monkeypatch):
    from sa3_mlx.backend import blas_core_note

    avx512 = "processor : 0\nflags : fpu sse avx2 fma avx512f avx512bw\n"
    avx2 = "processor : 0\nflags : fpu sse avx2 fma\n"
    note = blas_core_note({"OPENBLAS_CORETYPE": "Haswell"}, avx512)
    assert note and "OPENBLAS_CORETYPE=Haswell" in note and "AVX2" in note
    assert blas_core_note({"OPENBLAS_CORETYPE": "zen"}, avx512)
    for env, cpu in (({}, avx512), ({"OPENBLAS_CORETYPE": "SkylakeX"}, avx512),
                     ({"OPENBLAS_CORETYPE": "COOPERLAKE"}, avx512), ({"OPENBLAS_CORETYPE": "Haswell"}, avx2)):
        assert blas_core_note(env, cpu) is None
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    code, out, err = sa3("doctor", "--json")
    assert code == 0, err
    report = json.loads(out)
    if "cpu" in report["device"] and report["blas"].startswith("/") and blas_core_note() is not None:
        assert report["blas note"] == blas_core_note()
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"  # the user's setting stays


def test_download_fetches_a_models_files_into_the_cache(bundle, tmp_path):
    files = {f"{hub.REPO_FOLDER}/{f.name}": f.read_bytes() for f in bundle.iterdir()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with HubStandIn(hub.REPO_ID, files) as standin:
        env.update(HF_ENDPOINT=standin.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1")
        proc = subprocess.run([sys.executable, "-m", "sa3_mlx", "download", "sm-music"], env=env,
                              capture_output=True, text=True, timeout=120)
        bad = subprocess.run([sys.executable, "-m", "sa3_mlx", "download", "large"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    paths = [Path(line) for line in proc.stdout.splitlines()]
    assert [p.name for p in paths] == hub.files_for("sm-music", encoder=True)
    assert all(p.read_bytes() == (bundle / p.name).read_bytes() for p in paths)
    assert bad.returncode == 2 and "invalid choice: 'large'" in one_error_line(bad.stderr)


def test_help_has_examples_and_the_readme_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "--inpaint-range 4,6" in help_text and "--loudness" in help_text
    readme = (REPO / "README.md").read_text()
    flags = [s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")]
    flags += ["--no-free-models"]
    missing = [f for f in flags if f != "--help" and f"`{f}" not in readme and f"/ {f}" not in readme]
    assert not missing, f"README does not document {missing}"
    for command in ("sa3 download", "sa3 doctor", "sa3 info"):
        assert command in readme


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("dit", ["sm-music", "medium"])
def test_half_precision_runs_end_to_end(generate, work, init_wav, dtype, dit):
    """What GPUs run by default (fp16 DiT, fp16 SAME-L) and bf16 also run on MLX's CPU device, guidance and
    inpainting included; under scripts/test.sh --gpu-path this is the GPU code path too."""
    code, out, err = generate("--prompt", "drum fill", "--dit", dit, "--dit-dtype", dtype, "--codec-dtype", dtype,
                              "--cfg", "2", "--init-audio", init_wav(1.5), "--inpaint-range", "0.2,0.6",
                              "--format", "wav32f")
    assert code == 0, err
    audio = read(work / out.strip())
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
