"""Audio in and out: any readable file to 44.1 kHz stereo, atomic writing with metadata, loudness."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from sa3_mlx import audio as audio_module

from sa3_mlx.audio import (
    SAMPLE_RATE,
    AudioError,
    integrated_loudness,
    limit_true_peak,
    normalize_loudness,
    read_audio,
    read_metadata,
    sample_peak,
    to_db,
    true_peak,
    write_audio,
    write_audio_files,
)


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def noise(seconds: float, rms: float, seed: int = 0) -> np.ndarray:
    """Stereo band-limited noise ``[2, samples]`` at 44.1 kHz."""
    rng = np.random.default_rng(seed)
    white = rng.normal(0.0, 1.0, (2, int(seconds * SAMPLE_RATE)))
    smooth = np.apply_along_axis(lambda x: np.convolve(x, np.ones(4) / 4, mode="same"), 1, white)
    return (smooth / smooth.std() * rms).astype(np.float32)


def independent_true_peak_db(audio: np.ndarray) -> float:
    """A second 4x true-peak meter (polyphase FIR instead of soxr) to check ours against."""
    return to_db(float(np.abs(resample_poly(audio.T.astype(np.float64), 4, 1, axis=0)).max()))


# ---- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "container, subtype, rate, channels",
    [
        ("WAV", "PCM_16", 44100, 2),
        ("WAV", "PCM_24", 48000, 1),
        ("WAV", "PCM_32", 22050, 2),
        ("WAV", "FLOAT", 16000, 1),
        ("FLAC", "PCM_16", 96000, 2),
        ("OGG", "VORBIS", 32000, 2),
    ],
)
def test_read_any_format_and_rate_to_stereo_44k(tmp_path, container, subtype, rate, channels):
    seconds = 1.5
    tone = sine(440.0, seconds, rate)
    data = np.stack([tone, 0.5 * tone], axis=1)[:, :channels]
    path = tmp_path / f"in.{container.lower()}"
    sf.write(path, data, rate, subtype=subtype, format=container)

    audio = read_audio(path)
    assert audio.dtype == np.float32 and audio.shape[0] == 2
    assert abs(audio.shape[1] - seconds * SAMPLE_RATE) <= 2
    # The tone survives decoding and resampling: same level, same pitch (zero crossings per second).
    middle = audio[:, 4410:-4410]
    assert abs(np.abs(middle[0]).max() - 0.5) < 0.02
    crossings = np.count_nonzero(np.diff(np.signbit(middle[0]))) / (middle.shape[1] / SAMPLE_RATE)
    assert abs(crossings - 2 * 440.0) < 5
    if channels == 1:
        np.testing.assert_array_equal(audio[0], audio[1])  # mono is duplicated
    else:
        assert abs(np.abs(middle[1]).max() - 0.25) < 0.02


def test_read_refuses_what_it_cannot_use(tmp_path):
    surround = tmp_path / "surround.wav"
    sf.write(surround, np.zeros((4410, 6), np.float32), SAMPLE_RATE)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 2), np.float32), SAMPLE_RATE)
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    bad_float = tmp_path / "nan.wav"
    sf.write(bad_float, np.full((100, 2), np.nan, np.float32), SAMPLE_RATE, subtype="FLOAT")
    cases = {
        surround: "6 channels",
        empty: "no audio samples",
        text: "not a readable audio file",
        bad_float: "NaN",
        tmp_path / "missing.wav": "no such file",
        tmp_path: "not a file",
    }
    for path, reason in cases.items():
        with pytest.raises(AudioError, match=reason) as info:
            read_audio(path)
        assert str(path) in str(info.value)


# ---- writing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, subtype, container", [("wav16", "PCM_16", "WAV"), ("wav24", "PCM_24", "WAV"),
                                                     ("wav32f", "FLOAT", "WAV"), ("flac", "PCM_24", "FLAC")])
def test_write_formats_with_metadata(tmp_path, fmt, subtype, container):
    audio = np.stack([sine(220.0, 0.5, SAMPLE_RATE, 1.5), sine(330.0, 0.5, SAMPLE_RATE, 0.25)])
    meta = {"prompt": "glass ☂ shattering", "seed": 7, "inpaint": [[1.0, 2.5]], "version": "0.1.0"}
    path = write_audio(tmp_path / f"out.{container.lower()}", audio, SAMPLE_RATE, fmt, meta)

    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.channels, info.frames) == (
        container, subtype, SAMPLE_RATE, 2, audio.shape[1])
    assert read_metadata(path) == meta
    data, _ = sf.read(str(path), dtype="float32")
    if fmt == "wav32f":
        np.testing.assert_array_equal(data.T, audio)  # float keeps values beyond full scale
    else:
        assert np.abs(data).max() <= 1.0  # integer formats clip (the CLI warns first)
        np.testing.assert_allclose(data[:, 1], audio[1], atol=1e-4)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left beside it


@pytest.mark.parametrize("fmt, subtype, container, rate", [("mp3", "MPEG_LAYER_III", "MP3", SAMPLE_RATE),
                                                           ("ogg", "VORBIS", "OGG", SAMPLE_RATE),
                                                           ("opus", "OPUS", "OGG", 48000)])
def test_write_lossy_formats_with_metadata(tmp_path, fmt, subtype, container, rate):
    """MP3 (the settings in the ID3v2 comment, ASCII JSON so that any text survives), OGG/Vorbis and Opus (48 kHz)."""
    assert audio_module.format_problem(fmt) is None, "this libsndfile should encode " + fmt
    audio = np.stack([sine(220.0, 0.5, SAMPLE_RATE, 1.5), sine(330.0, 0.5, SAMPLE_RATE, 0.25)])
    meta = {"prompt": "glass ☂ shattering (é:1.5)", "seed": 7, "inpaint": [[1.0, 2.5]], "version": "0.1.0"}
    path = write_audio(tmp_path / f"out{audio_module.FORMATS[fmt][2]}", audio, SAMPLE_RATE, fmt, meta)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (container, subtype, rate, 2)
    assert read_metadata(path) == meta
    if fmt == "mp3":
        head = path.read_bytes()[:4096]
        assert head.startswith(b"ID3") and b"COMM" in head and b'"sa3-mlx"' in head
        assert info.frames == audio.shape[1]
    back = read_audio(path)  # resampled to 44.1 kHz where the file is not
    assert back.shape[0] == 2 and abs(back.shape[1] - audio.shape[1]) <= 0.1 * SAMPLE_RATE
    # A lossy copy of the tone: its level is the tone's (within a dB).
    n = min(back.shape[1], audio.shape[1])
    rms = lambda x: float(np.sqrt(np.mean(np.square(x[:, n // 4:n - n // 4]))))  # noqa: E731
    assert abs(20 * np.log10(rms(back) / rms(np.clip(audio, -1, 1)))) < 1.0  # lossy formats clip too
    assert list(tmp_path.iterdir()) == [path]


def test_a_format_the_local_libsndfile_lacks_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "available_subtypes", lambda container=None: {})
    problem = audio_module.format_problem("mp3")
    assert problem.startswith("mp3 output needs a libsndfile that encodes MP3/MPEG_LAYER_III; this one (")
    assert "1.1 or later" in problem
    with pytest.raises(AudioError, match="mp3 output needs"):
        write_audio(tmp_path / "x.mp3", np.zeros((2, 100), np.float32), SAMPLE_RATE, "mp3", None)
    assert list(tmp_path.iterdir()) == []


def test_write_never_replaces_silently_and_is_all_or_nothing(tmp_path):
    audio = np.zeros((2, 1000), np.float32)
    first = write_audio(tmp_path / "a.wav", audio)
    before = first.read_bytes()
    with pytest.raises(AudioError, match="already exists"):
        write_audio(first, audio + 0.1)
    assert first.read_bytes() == before
    write_audio(first, audio + 0.1, overwrite=True)
    assert first.read_bytes() != before

    # The second file cannot be written (its folder is a file): the first is not left behind either.
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    with pytest.raises(AudioError, match="could not be written"):
        write_audio_files([(tmp_path / "b.wav", audio, None), (blocker / "c.wav", audio, None)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "blocker"]


def test_metadata_absent_in_foreign_files(tmp_path):
    path = tmp_path / "plain.wav"
    sf.write(path, np.zeros((100, 2)), SAMPLE_RATE)
    assert read_metadata(path) is None


# ---- loudness ----------------------------------------------------------------------------------


def test_true_peak_sees_between_samples():
    # A quarter-sample-rate tone at 45 degrees: every sample sits at 0.707 of the real peak.
    tone = sine(SAMPLE_RATE / 4, 1.0, SAMPLE_RATE, amplitude=0.9, phase=np.pi / 4)
    audio = np.stack([tone, tone])
    assert sample_peak(audio) == pytest.approx(0.9 * np.sqrt(0.5), rel=1e-3)
    assert true_peak(audio) == pytest.approx(0.9, rel=0.02)  # (the abrupt start rings a little)


def test_normalize_reaches_the_target_when_the_limiter_is_idle():
    quiet = noise(3.0, rms=0.01)
    result = normalize_loudness(quiet, -23.0)
    assert result.limiter_db == 0.0
    assert abs(integrated_loudness(result.audio) - (-23.0)) < 0.5
    assert result.output_lufs == pytest.approx(-23.0, abs=0.5)
    assert result.gain_db == pytest.approx(-23.0 - result.input_lufs)
    assert result.true_peak_db < -1.0


def test_limiter_keeps_true_peak_under_minus_one_dbtp():
    # Loud noise plus inter-sample-peaky bursts, pushed to -6 LUFS: far past full scale before limiting.
    audio = noise(3.0, rms=0.05, seed=1)
    burst = sine(SAMPLE_RATE / 4, 0.05, SAMPLE_RATE, amplitude=0.6, phase=np.pi / 4)
    for start in (20000, 70000, 110000):
        audio[:, start : start + burst.size] += burst
    result = normalize_loudness(audio, -6.0)
    assert result.limiter_db > 3.0
    assert to_db(true_peak(result.audio)) <= -1.0
    assert result.true_peak_db <= -1.0
    assert independent_true_peak_db(result.audio) <= -0.95
    assert sample_peak(result.audio) < 1.0  # nothing clips
    # Limiting costs loudness (here several LU), it never adds any.
    assert result.input_lufs < result.output_lufs <= -6.0 + 0.5


def test_limiter_leaves_quiet_audio_alone_and_gain_is_linked_across_channels():
    quiet = noise(1.0, rms=0.05)
    limited, reduction = limit_true_peak(quiet)
    assert reduction == 0.0 and limited is quiet
    loud = np.stack([sine(100.0, 1.0, SAMPLE_RATE, 2.0), sine(100.0, 1.0, SAMPLE_RATE, 0.5)])
    limited, reduction = limit_true_peak(loud)
    assert reduction == pytest.approx(to_db(2.0) + 1.0, abs=0.1)
    np.testing.assert_allclose(limited[0] / 4.0, limited[1], atol=1e-6)  # one gain for both channels


def test_loudness_of_silence_and_of_too_short_audio():
    silent = np.zeros((2, SAMPLE_RATE), np.float32)
    result = normalize_loudness(silent, -14.0)
    assert result.input_lufs == -np.inf and result.audio is not None
    np.testing.assert_array_equal(result.audio, silent)
    with pytest.raises(AudioError, match="too short"):
        normalize_loudness(np.ones((2, 1000), np.float32) * 0.1, -14.0)
