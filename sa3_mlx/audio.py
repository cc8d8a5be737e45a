"""Reading and writing audio files: any format soundfile reads in, WAV/FLAC out.

Input is decoded by libsndfile (WAV of any bit depth, float, FLAC, OGG/Vorbis,
Opus, AIFF, ...) and resampled to 44.1 kHz with soxr; no ffmpeg process. Output is
written to a temporary file beside the target and renamed into place, so a crash,
Ctrl-C or a full disk never leaves a half-written file, and the generation
settings travel inside the file's metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
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
}


class AudioError(ValueError):
    """An audio file that cannot be read or written; the message names it and the reason."""


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to float32 ``[2, samples]`` at ``sample_rate``.

    Mono is duplicated to both channels. More than two channels is refused: a
    downmix of surround layouts needs to know the layout, which files rarely say.
    """
    import soundfile as sf
    import soxr

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    channels = data.shape[1]
    if channels > CHANNELS:
        raise AudioError(
            f"{path}: has {channels} channels; only mono or stereo input is supported "
            "(mix it down to stereo first)"
        )
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if rate != sample_rate:
        data = soxr.resample(data, rate, sample_rate, quality="HQ").astype(np.float32)
    if channels == 1:
        data = np.repeat(data, CHANNELS, axis=1)
    return np.ascontiguousarray(data.T)


def fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Trim or zero-pad ``[channels, samples]`` audio to exactly ``n_samples``."""
    audio = audio[:, :n_samples]
    return np.pad(audio, ((0, 0), (0, n_samples - audio.shape[1])))


def write_audio(
    path: str | Path,
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    fmt: str = "wav16",
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``[channels, samples]`` float audio atomically; returns the final path.

    Integer formats clip at full scale (the caller reports the peak beforehand);
    ``wav32f`` keeps values beyond it. ``metadata`` is stored as JSON in the
    file's comment tag, so ``read_metadata`` gives the settings back.
    """
    import soundfile as sf

    if fmt not in FORMATS:
        raise AudioError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    container, subtype, _ = FORMATS[fmt]
    path = Path(path)
    if path.exists() and not overwrite:
        raise AudioError(f"{path}: already exists (choose another --out, or pass --overwrite)")
    if not np.isfinite(audio).all():
        raise AudioError("refusing to write audio with NaN or infinite samples")
    data = np.asarray(audio, dtype=np.float32).T
    if subtype != "FLOAT":
        data = np.clip(data, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        with sf.SoundFile(tmp, "w", sample_rate, data.shape[1], subtype=subtype, format=container) as f:
            if metadata is not None:
                f.comment = json.dumps({METADATA_TAG: metadata}, separators=(",", ":"), ensure_ascii=False)
                f.software = f"{METADATA_TAG} {metadata.get('version', '')}".strip()
                if metadata.get("prompt"):
                    f.title = str(metadata["prompt"])[:200]
            f.write(data)
        if not overwrite and path.exists():
            raise AudioError(f"{path}: appeared while writing; not overwriting it")
        os.replace(tmp, path)
    except OSError as e:
        raise AudioError(f"{path}: could not be written ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | Path) -> dict | None:
    """The settings stored by :func:`write_audio`, or None when the file has none."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            comment = f.comment
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    try:
        return json.loads(comment)[METADATA_TAG]
    except (ValueError, KeyError, TypeError):
        return None
