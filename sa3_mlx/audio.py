"""Reading and writing audio files, and loudness: any format soundfile reads in; WAV, FLAC, MP3, OGG/Vorbis and
Opus out (the lossy ones where the local libsndfile encodes them: MP3 needs libsndfile 1.1 or later).

Input is decoded by libsndfile (WAV of any bit depth, float, FLAC, OGG/Vorbis,
Opus, AIFF, ...) and resampled to 44.1 kHz with soxr; no ffmpeg process. Output is
encoded in memory, written to a temporary file beside the target and renamed into
place, so a crash, Ctrl-C or a full disk never leaves a half-written file, and
the generation settings travel inside the file's metadata.

Loudness follows ITU-R BS.1770 (integrated, gated loudness via pyloudnorm; true
peak from a 4x oversampled signal).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 44100
CHANNELS = 2
METADATA_TAG = "sa3-mlx"

# --format name -> (soundfile format, subtype, file suffix)
FORMATS = {
    "wav16": ("WAV", "PCM_16", ".wav"),
    "wav24": ("WAV", "PCM_24", ".wav"),
    "wav32f": ("WAV", "FLOAT", ".wav"),
    "flac": ("FLAC", "PCM_24", ".flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", ".mp3"),
    "ogg": ("OGG", "VORBIS", ".ogg"),
    "opus": ("OGG", "OPUS", ".opus"),
}
# The lossy formats' encoder settings: MP3 at a constant 320 kbps, Vorbis and Opus at their best VBR quality.
LOSSY = {
    "mp3": {"compression_level": 0.0, "bitrate_mode": "CONSTANT"},
    "ogg": {"compression_level": 0.0},
    "opus": {"compression_level": 0.0},
}
# Formats that cannot hold 44.1 kHz: the audio is resampled (soxr) to this rate when written; reading resamples back.
FORMAT_RATES = {"opus": 48000}
# Formats whose tags libsndfile writes as Latin-1 (MP3's ID3v2 frames): their metadata JSON is kept ASCII.
ASCII_TAGS = {"mp3"}

TRUE_PEAK_CEILING_DB = -1.0  # the usual streaming ceiling (EBU R128 / AES TD1004)
TRUE_PEAK_OVERSAMPLING = 4  # BS.1770-4 Annex 2
LIMITER_HALF_WINDOW_S = 0.01  # gain ramps over 10 ms before and after each peak
MIN_LOUDNESS_SECONDS = 0.4  # one BS.1770 gating block
MAX_READ_SECONDS = 400.0  # the longest input any model takes (384 s) and a little more, to tell "longer"
RATE_RANGE = (1000, 768000)  # Hz: what real audio files use; outside it a header is broken or hostile


class AudioError(ValueError):
    """An audio file that cannot be read or written; the message names it and the reason."""


# ---- reading -------------------------------------------------------------------------


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_READ_SECONDS) -> np.ndarray:
    """Decode ``path`` to float32 ``[2, samples]`` at ``sample_rate``.

    Mono is duplicated to both channels. More than two channels is refused: a
    downmix of surround layouts needs to know the layout, which files rarely say.
    Only the first ``max_seconds`` are read (no model takes more), judged from the
    header's frame count and rate before anything is decoded, so a file whose header
    claims a tiny rate cannot make the decode or the resampling explode; rates outside
    ``RATE_RANGE`` are refused. Memory is bounded by ``max_seconds`` of audio.
    """
    import soundfile as sf
    import soxr

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if not path.is_file():
        raise AudioError(f"{path}: not a file")
    try:
        with sf.SoundFile(str(path)) as f:
            rate, channels = f.samplerate, f.channels
            low, high = RATE_RANGE
            if not low <= rate <= high:
                raise AudioError(f"{path}: sample rate {rate} Hz is outside {low}..{high} Hz (a damaged or "
                                 "hostile header?)")
            if channels > CHANNELS:
                raise AudioError(
                    f"{path}: has {channels} channels; only mono or stereo input is supported "
                    "(mix it down to stereo first)"
                )
            data = f.read(frames=int(math.ceil(max_seconds * rate)), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, TypeError, OSError, ValueError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if rate != sample_rate:
        data = soxr.resample(data, rate, sample_rate, quality="HQ").astype(np.float32)
    if channels == 1:
        data = np.repeat(data, CHANNELS, axis=1)
    return np.ascontiguousarray(data.T)


# ---- pictures ------------------------------------------------------------------------------


def spectrogram(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, frames: int = 160, bins: int = 48,
                floor_db: float = -80.0) -> dict:
    """A small picture of ``[channels, samples]`` audio for a page: ``{"width": frames, "height": bins,
    "data": base64 bytes}``, one byte (0 = ``floor_db`` below the loudest cell or quieter .. 255 = it) per
    cell, rows from the lowest band up. The mono mix's Hann-windowed 2048-point spectrum, averaged into
    ``bins`` log-spaced bands from 40 Hz to 16 kHz, at ``frames`` times spread over the clip."""
    import base64

    mono = np.asarray(audio, dtype=np.float32).mean(axis=0)
    n_fft = 2048
    if mono.size < n_fft:
        mono = np.pad(mono, (0, n_fft - mono.size))
    starts = np.linspace(0, mono.size - n_fft, frames).astype(int)
    window = np.hanning(n_fft).astype(np.float32)
    power = np.abs(np.fft.rfft(np.stack([mono[s:s + n_fft] for s in starts]) * window, axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = np.geomspace(40.0, min(16000.0, sample_rate / 2), bins + 1)
    index = np.clip(np.searchsorted(edges, freqs) - 1, -1, bins)
    bands = np.zeros((frames, bins), np.float64)
    for b in range(bins):
        chosen = index == b
        if not chosen.any():  # a band narrower than a bin: its nearest bin
            chosen = np.zeros_like(chosen)
            chosen[np.argmin(np.abs(freqs - np.sqrt(edges[b] * edges[b + 1])))] = True
        bands[:, b] = power[:, chosen].mean(axis=1)
    db = 10 * np.log10(np.maximum(bands, 1e-20))
    db -= db.max()
    cells = np.clip((db - floor_db) / -floor_db * 255, 0, 255).astype(np.uint8).T  # [bins, frames], lowest first
    return {"width": frames, "height": bins, "data": base64.b64encode(np.ascontiguousarray(cells).tobytes()).decode()}


# ---- levels and loudness ----------------------------------------------------------------


def to_db(linear: float) -> float:
    return 20.0 * math.log10(linear) if linear > 0 else -math.inf


def sample_peak(audio: np.ndarray) -> float:
    """Largest absolute sample value (1.0 = full scale)."""
    return float(np.abs(audio).max()) if audio.size else 0.0


def _peak_envelope(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Per sample, the largest absolute value of the 4x oversampled signal around it (all channels).

    ``audio`` is ``[channels, samples]``; the result is ``[samples]`` float64.
    """
    import soxr

    n = audio.shape[1]
    factor = TRUE_PEAK_OVERSAMPLING
    up = soxr.resample(audio.T.astype(np.float64), sample_rate, sample_rate * factor, quality="VHQ")
    up = np.abs(up).max(axis=1)[: n * factor]
    up = np.pad(up, (0, n * factor - up.shape[0]))
    return np.maximum(up.reshape(n, factor).max(axis=1), np.abs(audio).max(axis=0))


def true_peak(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """BS.1770 true peak (linear) of ``[channels, samples]`` audio: the peak of the 4x oversampled signal."""
    if audio.size == 0:
        return 0.0
    return float(_peak_envelope(audio, sample_rate).max())


def limit_true_peak(
    audio: np.ndarray, ceiling_db: float = TRUE_PEAK_CEILING_DB, sample_rate: int = SAMPLE_RATE
) -> tuple[np.ndarray, float]:
    """Lower the gain around peaks so the true peak stays at or below ``ceiling_db`` dBTP.

    Returns the limited audio and the largest gain reduction in dB (0 when the
    limiter did not engage). The gain is a look-ahead limiter's: per sample the
    gain that would bring its oversampled peak to the ceiling, held for a window
    (a running minimum) and then averaged over the same window, so the gain ramps
    down smoothly before a peak, never exceeds what any sample needs, and ramps
    back up after it. Both channels get the same gain (the stereo image stays).
    """
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    ceiling = 10.0 ** (ceiling_db / 20.0)
    envelope = _peak_envelope(audio, sample_rate)
    needed = np.minimum(1.0, ceiling / np.maximum(envelope, 1e-12))
    if needed.min() >= 1.0:
        return audio, 0.0
    width = 2 * int(round(LIMITER_HALF_WINDOW_S * sample_rate)) + 1
    held = minimum_filter1d(needed, size=width, mode="nearest")
    # Every value averaged here is <= needed[n]: each held value covers n in its window.
    gain = np.minimum(uniform_filter1d(held, size=width, mode="nearest"), needed)
    limited = (audio * gain[None, :]).astype(np.float32)
    # Resampling a gain-modulated signal can overshoot by a hair: trim what is left.
    peak = true_peak(limited, sample_rate)
    if peak > ceiling:
        limited = (limited * (ceiling / peak * 0.9995)).astype(np.float32)
    return limited, -to_db(float(gain.min()))


def integrated_loudness(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """BS.1770 integrated (gated) loudness of ``[channels, samples]`` audio in LUFS (-inf for silence)."""
    import pyloudnorm

    if audio.shape[1] < MIN_LOUDNESS_SECONDS * sample_rate:
        raise AudioError(
            f"audio of {audio.shape[1] / sample_rate:.2f} s is too short to measure loudness "
            f"(BS.1770 needs at least {MIN_LOUDNESS_SECONDS} s)"
        )
    with np.errstate(divide="ignore"):
        return float(pyloudnorm.Meter(sample_rate).integrated_loudness(audio.T.astype(np.float64)))


@dataclass
class LoudnessResult:
    audio: np.ndarray  # [channels, samples] float32
    input_lufs: float  # measured before (-inf: silent, left unchanged)
    output_lufs: float  # measured after gain and limiter
    gain_db: float  # the normalising gain
    limiter_db: float  # the limiter's largest gain reduction (0: not engaged)
    true_peak_db: float  # of the result, dBTP


def normalize_loudness(
    audio: np.ndarray,
    target_lufs: float,
    sample_rate: int = SAMPLE_RATE,
    ceiling_db: float = TRUE_PEAK_CEILING_DB,
) -> LoudnessResult:
    """Bring ``audio`` to ``target_lufs`` integrated loudness, then limit true peaks to ``ceiling_db``.

    When the gain would push peaks past the ceiling the limiter lowers them, so
    the result can end up slightly below the target; it never clips. Silent audio
    is returned unchanged (there is no loudness to scale).
    """
    audio = np.asarray(audio, dtype=np.float32)
    measured = integrated_loudness(audio, sample_rate)
    if not math.isfinite(measured):
        peak = to_db(true_peak(audio, sample_rate))
        return LoudnessResult(audio, measured, measured, 0.0, 0.0, peak)
    gain_db = target_lufs - measured
    gained = (audio * 10.0 ** (gain_db / 20.0)).astype(np.float32)
    limited, reduction = limit_true_peak(gained, ceiling_db, sample_rate)
    return LoudnessResult(
        limited, measured, integrated_loudness(limited, sample_rate), gain_db, reduction,
        to_db(true_peak(limited, sample_rate)),
    )


# ---- writing ---------------------------------------------------------------------------------


def check_writable(path: str | Path) -> None:
    """Fail now, not after a long generation, when ``path``'s folder cannot take a new file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AudioError(f"{path}: cannot write there ({e.strerror or e}); choose another --out") from None


def format_problem(fmt: str) -> str | None:
    """Why the local libsndfile cannot write ``fmt`` (None when it can)."""
    import soundfile as sf

    container, subtype, _ = FORMATS[fmt]
    if container in sf.available_formats() and subtype in sf.available_subtypes(container):
        return None
    need = " (MPEG Layer III needs libsndfile 1.1 or later)" if fmt == "mp3" else ""
    return (f"{fmt} output needs a libsndfile that encodes {container}/{subtype}; this one "
            f"({sf.__libsndfile_version__}) does not{need}: choose another format, e.g. flac")


def encode_audio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, fmt: str = "wav16", metadata: dict | None = None) -> bytes:
    """The bytes of a ``fmt`` file holding ``[channels, samples]`` float audio and ``metadata``.

    Integer and lossy formats clip at full scale (the caller reports the peak beforehand);
    ``wav32f`` keeps values beyond it. ``metadata`` is stored as JSON in the
    file's comment tag (for MP3 the ID3v2 COMM frame, ASCII JSON), so ``read_metadata``
    gives the settings back. Opus is written at 48 kHz (:data:`FORMAT_RATES`).
    """
    import soundfile as sf

    if fmt not in FORMATS:
        raise AudioError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    problem = format_problem(fmt)
    if problem:
        raise AudioError(problem)
    container, subtype, _ = FORMATS[fmt]
    if not np.isfinite(audio).all():
        raise AudioError("refusing to write audio with NaN or infinite samples")
    data = np.asarray(audio, dtype=np.float32).T
    rate = FORMAT_RATES.get(fmt, sample_rate)
    if rate != sample_rate:
        import soxr

        data = soxr.resample(data, sample_rate, rate, quality="VHQ").astype(np.float32)
    if subtype != "FLOAT":
        data = np.clip(data, -1.0, 1.0)
    ascii_only = fmt in ASCII_TAGS
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, data.shape[1], subtype=subtype, format=container,
                      **LOSSY.get(fmt, {})) as f:
        if metadata is not None:
            f.comment = json.dumps({METADATA_TAG: metadata}, separators=(",", ":"), ensure_ascii=ascii_only)
            f.software = f"{METADATA_TAG} {metadata.get('version', '')}".strip()
            if metadata.get("prompt"):
                title = str(metadata["prompt"])[:200]
                f.title = title.encode("ascii", "replace").decode() if ascii_only else title
        f.write(data)
    return buffer.getvalue()


def write_audio_files(
    outputs: list[tuple[str | Path, np.ndarray, dict | None]],
    sample_rate: int = SAMPLE_RATE,
    fmt: str = "wav16",
    overwrite: bool = False,
) -> list[Path]:
    """Write several ``(path, audio, metadata)`` files all or nothing; returns the paths.

    Every file is encoded in memory and written in full to a temporary file
    beside its target first (so a full disk or Ctrl-C leaves nothing behind),
    then all are renamed into place. An existing file is replaced only with
    ``overwrite``.
    """
    targets = [Path(path) for path, _, _ in outputs]
    for path in targets:
        if path.exists() and not overwrite:
            raise AudioError(f"{path}: already exists (choose another --out, or pass --overwrite)")
    temporaries: list[str] = []
    placed: list[Path] = []
    mode = 0o666 & ~_umask()
    try:
        for path, (_, audio, metadata) in zip(targets, outputs):
            data = encode_audio(audio, sample_rate, fmt, metadata)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
                temporaries.append(tmp)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fchmod(f.fileno(), mode)  # mkstemp makes 0600; a new file should honour the umask
                    os.fsync(f.fileno())
            except OSError as e:
                raise AudioError(f"{path}: could not be written ({e.strerror or e})") from None
        for path, tmp in zip(targets, temporaries):
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic, and never replaces a file that appeared meanwhile
                except FileExistsError:
                    raise AudioError(f"{path}: appeared while writing; not overwriting it") from None
                except OSError:  # a file system without hard links: check, then rename
                    if path.exists():
                        raise AudioError(f"{path}: appeared while writing; not overwriting it") from None
                    os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path in placed:  # all outputs or none: take back what this call put in place
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return targets


_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read once (from /proc where it can be read without changing it: setting it
    to read it would race with other threads creating files)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status") as f:
                _UMASK = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def honour_umask(path: str | Path) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode a new file gets under the umask."""
    os.chmod(path, 0o666 & ~_umask())


def write_audio(
    path: str | Path,
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    fmt: str = "wav16",
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``[channels, samples]`` float audio atomically (see :func:`write_audio_files`)."""
    return write_audio_files([(path, audio, metadata)], sample_rate, fmt, overwrite)[0]


def read_metadata(path: str | Path) -> dict | None:
    """The settings stored by :func:`write_audio`, or None when the file has none."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        with sf.SoundFile(str(path)) as f:
            comment = f.comment
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    try:
        return json.loads(comment)[METADATA_TAG]
    except (ValueError, KeyError, TypeError):
        return None
