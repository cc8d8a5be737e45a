"""Hostile files and requests, signals, full disks, races: each case of the hardening issue, as a test."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sa3_mlx import audio as audio_module
from sa3_mlx.audio import SAMPLE_RATE, AudioError, read_audio, write_audio_files
from sa3_mlx.settings import validate
from sa3_mlx.studio.jobs import StorageError, Studio
from sa3_mlx.studio.settings import Limits
from tests.studio_server import StudioProcess
from tests.test_cli import one_error_line, run_in_terminal

REPO = Path(__file__).resolve().parents[1]


def header_claiming(path: Path, rate: int, frames: int = 2000) -> Path:
    """A small 16-bit stereo WAV whose header claims ``rate`` Hz (a memory bomb when resampled naively)."""
    sf.write(path, np.zeros((frames, 2), np.int16), rate, subtype="PCM_16")
    return path


# ---- 1. memory bombs -----------------------------------------------------------------------


def test_a_header_with_an_absurd_rate_is_refused_before_decoding(tmp_path):
    bomb = header_claiming(tmp_path / "bomb.wav", rate=1)  # 8 KB claiming 2000 s at 1 Hz
    started = time.perf_counter()
    with pytest.raises(AudioError, match="sample rate 1 Hz"):
        read_audio(bomb)
    assert time.perf_counter() - started < 1.0


def test_a_long_file_is_read_only_as_far_as_any_model_goes(tmp_path):
    """1000 Hz for 30 minutes: only the first 400 s are decoded and resampled (bounded memory)."""
    path = header_claiming(tmp_path / "long.wav", rate=1000, frames=1000 * 1800)
    audio = read_audio(path)
    assert audio.shape == (2, int(audio_module.MAX_READ_SECONDS * SAMPLE_RATE))


def test_the_studio_refuses_an_upload_bomb_at_once(tmp_path, bundle):
    server = StudioProcess(tmp_path / "out", bundle)
    try:
        data = header_claiming(tmp_path / "bomb.wav", rate=1).read_bytes()
        started = time.perf_counter()
        status, answer = server.json("POST", "/api/uploads", data)
        assert status == 400 and "sample rate 1 Hz" in answer["error"], answer
        assert time.perf_counter() - started < 5
    finally:
        server.stop()


def test_init_audio_bomb_on_the_command_line(generate, work):
    header_claiming(work / "bomb.wav", rate=1)
    code, _, err = generate("--prompt", "x", "--init-audio", "bomb.wav")
    assert code == 2 and "sample rate 1 Hz" in one_error_line(err)


# ---- 2. a submission that cannot be recorded leaves nothing behind -----------------------------


def test_a_job_the_history_cannot_record_is_never_queued(tmp_path, monkeypatch):
    studio = Studio(tmp_path / "out", limits=Limits())
    try:
        def full_disk(record):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(studio.history, "save", full_disk)
        with pytest.raises(StorageError, match="nothing was queued"):
            studio.submit(validate({"prompt": "x", "seconds": 1.0, "format": "wav16"}))
        assert studio.queue.qsize() == 0 and not studio.jobs
    finally:
        monkeypatch.undo()
        studio.close()


# ---- 3. all outputs or none, even when a file appears meanwhile -----------------------------


def test_a_file_appearing_mid_write_rolls_back_every_output(tmp_path, monkeypatch):
    a, b = tmp_path / "x_1.wav", tmp_path / "x_2.wav"
    real_link = os.link

    def racing_link(src, dst):
        if Path(dst) == b:
            b.write_bytes(b"someone else's file")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    tone = np.zeros((2, 4410), np.float32)
    with pytest.raises(AudioError, match="appeared while writing"):
        write_audio_files([(a, tone, None), (b, tone, None)])
    assert not a.exists() and b.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_2.wav"]  # no .part left


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    audio_module._UMASK = None
    try:
        path = write_audio_files([(tmp_path / "y.wav", np.zeros((2, 100), np.float32), None)])[0]
    finally:
        os.umask(old)
        audio_module._UMASK = None
    assert path.stat().st_mode & 0o777 == 0o644


# ---- 4. SIGTERM and SIGHUP behave like Ctrl-C ----------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_cli_stops_cleanly_on_sigterm_and_sighup(bundle, tmp_path, signum):
    """Sent while sampling (seen on the terminal, so the handlers are in place): one line, 128 + N, nothing left."""
    code, text = run_in_terminal(["--prompt", "long", "--dit", "sm-music", "--seconds", "60", "--steps", "1000",
                                  "--seed", "1", "--weights-dir", bundle], tmp_path, interrupt_when="/1000 steps",
                                 signum=signum)
    assert code == 128 + signum, text
    assert text.strip().splitlines()[-1].strip() == f"interrupted ({signal.Signals(signum).name})"
    output = tmp_path / "output"
    assert not output.exists() or not any(output.rglob("*"))


def test_studio_stops_cleanly_on_sigterm_and_records_its_jobs(tmp_path, bundle):
    server = StudioProcess(tmp_path / "out", bundle)
    running = server.submit(prompt="long", seconds=30, steps=500)
    queued = server.submit(prompt="next", seconds=1, steps=1)
    server.wait_for(running["id"], lambda job: job["status"] == "running")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    server.stop()
    import sqlite3

    rows = dict(sqlite3.connect(tmp_path / "out" / "history.sqlite3").execute("SELECT id, status FROM generations"))
    assert rows == {running["id"]: "cancelled", queued["id"]: "cancelled"}


# ---- 5. the studio's requests and start-up ------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle):
    studio = StudioProcess(tmp_path_factory.mktemp("hardening") / "out", bundle, "--upload-budget-mb", "64")
    yield studio
    studio.stop()


def test_deep_json_is_a_400_and_405_says_what_is_allowed(server):
    status, answer = server.json("POST", "/api/jobs", b"[" * 30000 + b"]" * 30000)
    assert status == 400 and "nests too deeply" in answer["error"]
    status, headers, _ = server.request("POST", "/api/health", b"x")
    assert status == 405 and set(headers["Allow"].replace(" ", "").split(",")) >= {"GET"}


def test_upload_to_a_full_disk_is_a_clear_507(tmp_path, monkeypatch):
    studio = Studio(tmp_path / "out", limits=Limits())
    try:
        import tempfile

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(tempfile, "mkstemp", full)
        with pytest.raises(StorageError, match="No space left on device"):
            studio.add_upload(b"RIFF" + b"\0" * 100)
    finally:
        monkeypatch.undo()
        studio.close()


def test_uploads_have_a_lifetime_and_a_budget(tmp_path):
    studio = Studio(tmp_path / "out", limits=Limits(), upload_hours=1.0, upload_budget_bytes=300_000)
    try:
        tone = (np.sin(np.arange(44100) / 10)[:, None] * np.ones((1, 2)) * 0.1).astype(np.float32)
        sf.write(tmp_path / "tone.wav", tone, 44100, subtype="PCM_16")  # ~176 KB
        data = (tmp_path / "tone.wav").read_bytes()
        first = studio.add_upload(data)["id"]
        second = studio.add_upload(data)["id"]  # over the budget together: the oldest goes
        names = {p.stem for p in studio.uploads_dir.glob("*.audio")}
        assert names == {second}
        old = studio.uploads_dir / f"{second}.audio"
        os.utime(old, (time.time() - 7200, time.time() - 7200))  # two hours old
        studio.prune_uploads()
        assert not old.exists() and first not in names
    finally:
        studio.close()


def run_studio(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sa3_mlx", "studio", "--no-browser", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_studio_start_up_errors_are_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    try:
        for args, words in ((["--port", "99999"], "must be 0..65535"),
                            (["--port", port], "Address already in use"),
                            (["--host", "no-such-host.invalid", "--api-key", "abcdefgh123"], "cannot be resolved"),
                            (["--port", "0", "--output-dir", "/proc/sa3-no-such-place"], "cannot open the studio's folder")):
            proc = run_studio(*args)
            assert proc.returncode == 2 and words in one_error_line(proc.stderr), (args, proc.stderr)
    finally:
        busy.close()


def test_every_loopback_address_is_served_as_loopback(tmp_path, bundle):
    server = StudioProcess(tmp_path / "out", bundle, host="127.0.0.2")
    try:
        assert server.url.startswith("http://127.0.0.2:")
        status, answer = server.json("GET", "/api/health")
        assert status == 200 and answer["status"] == "ok"
    finally:
        server.stop()


# ---- 6. sa3 info trusts no file ------------------------------------------------------------


def test_info_on_hostile_metadata(sa3, work):
    path = work / "list.wav"
    sf.write(path, np.zeros((100, 2)), SAMPLE_RATE)
    with sf.SoundFile(path, "r+") as f:
        f.comment = json.dumps({"sa3-mlx": [1, 2, 3]})
    code, _, err = sa3("info", path)
    assert code == 2 and "no sa3-mlx settings" in one_error_line(err)
    path = work / "escape.wav"
    sf.write(path, np.zeros((100, 2)), SAMPLE_RATE)
    with sf.SoundFile(path, "r+") as f:
        f.comment = json.dumps({"sa3-mlx": {"prompt": "\x1b[2J\x1b]0;pwned\x07 hi", "seconds": 1.0}})
    code, out, _ = sa3("info", path)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out


# ---- 7. --out does the obvious thing or says no --------------------------------------------


def test_out_folder_device_and_unknown_suffix(generate, work):
    (work / "renders").mkdir()
    code, out, err = generate("--prompt", "drum", "--out", str(work / "renders"))
    assert code == 0, err
    assert [p.name for p in (work / "renders").iterdir()] == ["drum_1.wav"]
    code, _, err = generate("--prompt", "drum", "--out", "/dev/null")
    assert code == 2 and "not a regular file" in one_error_line(err)
    code, _, err = generate("--prompt", "drum", "--out", "x.xyz")
    assert code == 2 and "unknown suffix '.xyz'" in one_error_line(err)
    assert not Path("/dev/null.wav").exists()


# ---- 8. errors that name their cause ---------------------------------------------------------


def test_lora_spec_errors_name_the_cause(generate, work):
    (work / "style.safetensors").write_bytes(b"x")
    (work / "adapters").mkdir()
    for spec, words in (("style.safetensors:abc", "must be a number (got 'abc')"),
                        ("style.safetensors:", "must be a number (got '')"),
                        ("adapters", "is a folder"),
                        ("missing.safetensors", "no such file")):
        code, _, err = generate("--prompt", "x", "--lora", spec)
        assert code == 2 and words in one_error_line(err), (spec, err)


def test_integer_tensors_in_a_weight_file_are_named(tmp_path, bundle):
    from sa3_mlx.models.dit import load_dit
    from sa3_mlx.weights import WeightError

    arrays = dict(np.load(bundle / "dit_sm-music_f16.npz"))
    arrays["preprocess_conv.weight"] = arrays["preprocess_conv.weight"].astype(np.int32)
    np.savez(tmp_path / "dit_sm-music_f16.npz", **arrays)
    with pytest.raises(WeightError, match=r"'preprocess_conv.weight' holds int32 values"):
        load_dit(tmp_path / "dit_sm-music_f16.npz")


def test_nan_weights_are_named_not_a_writer_error(sa3, work, bundle):
    folder = work / "weights"
    folder.mkdir()
    for f in bundle.iterdir():
        (folder / f.name).symlink_to(f)
    dit = folder / "dit_sm-music_f16.npz"
    arrays = dict(np.load(bundle / dit.name))
    arrays["transformer.project_out.weight"][:] = np.nan
    dit.unlink()
    np.savez(dit, **arrays)
    code, _, err = sa3("--prompt", "x", "--dit", "sm-music", "--seconds", "1", "--steps", "1", "--weights-dir", folder)
    assert code == 2 and "NaN or infinite latents" in one_error_line(err) and "sm-music" in err


def test_a_non_utf8_model_config_names_the_file(tmp_path):
    from sa3_mlx import upstream

    (tmp_path / "model_config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(upstream.UpstreamError, match=r"model_config.json: not UTF-8"):
        upstream.parse(tmp_path)


def test_bench_bad_flag_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "sa3_mlx", "bench", "--bogus"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in one_error_line(proc.stderr)


# ---- the fast BLAS does not depend on import order ----------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS choice is a Linux CPU matter")
def test_fast_blas_even_when_mlx_is_imported_first():
    """install.sh writes the .pth preload: a script importing mlx before sa3_mlx still gets the fast BLAS."""
    code = "import mlx.core; import sa3_mlx.backend as b; print(b.blas_status()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    assert out not in ("", "None"), "the preload did not load a BLAS (run ./install.sh, or python -m sa3_mlx.preload)"


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS choice is a Linux CPU matter")
def test_a_late_blas_choice_warns_once_with_the_fix():
    code = ("import mlx.core; import sa3_mlx.backend as b; b._loaded = None; b._warned = False; "
            "b.load_fast_blas(); b.load_fast_blas()")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    assert err.count("WARNING: mlx was imported before sa3_mlx") == 1 and "python -m sa3_mlx.preload" in err
