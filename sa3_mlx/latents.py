"""The codec on its own: audio -> latents (``sa3 encode-audio``) and latents -> audio (``sa3 decode-latents``).

Latents are ``[256, T]`` float32 arrays in a ``.npy`` file, one latent per 4096 samples (the audio is
completed with silence to a whole latent, as the pipeline's own init-audio encoding does). Encoding is
one whole-sequence encoder call (the encoder's own, as ``Pipeline.encode_init``); decoding is the exact
chunked decode of :func:`sa3_mlx.codec.decode`, as a generation's. Both write atomically: a temporary
file beside the target, renamed into place, never replacing a file unless asked.

The ``.npy`` file does not record which codec made it: decode with the codec that encoded (SAME-S and
SAME-L latents are different spaces; the shape cannot tell them apart).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from . import codec
from .audio import MAX_READ_SECONDS, SAMPLE_RATE, AudioError, honour_umask, read_audio, write_audio

MAX_LATENTS = int(np.ceil(400.0 * SAMPLE_RATE / codec.SAMPLES_PER_LATENT))  # what read_audio reads at most, encoded


class LatentsError(ValueError):
    """A latents file that cannot be read or written; the message names it and the reason."""


def read_latents(path: str | Path) -> np.ndarray:
    """``[256, T]`` float32 latents from a ``.npy`` file (``[1, 256, T]`` is taken too)."""
    path = Path(path)
    if not path.is_file():
        raise LatentsError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            if magic != b"\x93NUMPY":
                raise LatentsError(f"{path}: not a .npy array file (give latents written by sa3 encode-audio)")
            f.seek(0)
            data = np.load(f, allow_pickle=False)
    except LatentsError:
        raise
    except (ValueError, OSError, EOFError) as e:
        reason = "it holds Python objects, not numbers" if "pickle" in str(e) else f"{e}"
        raise LatentsError(f"{path}: not a readable .npy array ({reason})") from None
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2 or data.shape[0] != codec.LATENT_CHANNELS or data.shape[1] < 1:
        raise LatentsError(f"{path}: latents must be [{codec.LATENT_CHANNELS}, T] with T >= 1 (got shape "
                           f"{list(data.shape)})")
    if data.shape[1] > MAX_LATENTS:
        raise LatentsError(f"{path}: {data.shape[1]} latents is more than the {MAX_LATENTS} (400 s) accepted")
    if not np.issubdtype(data.dtype, np.floating):
        raise LatentsError(f"{path}: latents must be floating point numbers (got {data.dtype})")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise LatentsError(f"{path}: contains NaN or infinite values")
    return data


def write_latents(path: str | Path, latents: np.ndarray, overwrite: bool = False) -> Path:
    """Write ``[256, T]`` latents as ``.npy`` atomically (all or nothing; an existing file only with ``overwrite``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LatentsError(f"{path}: already exists (choose another --out, or pass --overwrite)")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(latents, dtype=np.float32), allow_pickle=False)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise LatentsError(f"{path}: appeared while writing; not overwriting it") from None
            except OSError:
                if path.exists():
                    raise LatentsError(f"{path}: appeared while writing; not overwriting it") from None
                os.replace(tmp, path)
    except OSError as e:
        raise LatentsError(f"{path}: could not be written ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def encode_file(pipeline, source: str | Path, out: str | Path, overwrite: bool = False) -> tuple[Path, np.ndarray, int]:
    """Encode an audio file (any format and rate libsndfile reads) with ``pipeline``'s codec encoder;
    returns ``(written path, latents [256, T], samples of the 44.1 kHz input)``."""
    out = Path(out)
    if out.exists() and not overwrite:  # fail before the encoder loads
        raise LatentsError(f"{out}: already exists (choose another --out, or pass --overwrite)")
    audio = read_audio(source)  # reads MAX_READ_SECONDS at most, and a little more than any model takes
    if audio.shape[1] >= int(MAX_READ_SECONDS * SAMPLE_RATE):
        raise LatentsError(f"{source}: longer than {MAX_READ_SECONDS:g} s, more than any model takes; cut it "
                           "into parts first")
    latents = pipeline.encode_audio(audio)
    return write_latents(out, latents, overwrite), latents, audio.shape[1]


def decode_file(pipeline, source: str | Path, out: str | Path, fmt: str, seconds: float | None = None,
                overwrite: bool = False) -> tuple[Path, np.ndarray, dict, list[str]]:
    """Decode a ``.npy`` latents file with ``pipeline``'s codec decoder to an audio file of format ``fmt``
    (trimmed to ``seconds`` when given); returns ``(written path, audio [2, samples], levels, warnings)``
    (a warning, not silent clipping, when the audio exceeds full scale in a format that clips)."""
    from .output import finish

    out = Path(out)
    if out.exists() and not overwrite:
        raise AudioError(f"{out}: already exists (choose another --out, or pass --overwrite)")
    latents = read_latents(source)
    if seconds is not None:
        full = latents.shape[1] * codec.SAMPLES_PER_LATENT / SAMPLE_RATE
        if not 0 < seconds <= full:
            raise LatentsError(f"--seconds {seconds:g} must be in (0, {full:g}]: {source} holds {latents.shape[1]} "
                               f"latents ({full:g} s)")
    audio = pipeline.decode_latents(latents)
    if seconds is not None:
        audio = audio[:, :int(round(seconds * SAMPLE_RATE))]
    audio, levels, warnings = finish(audio, fmt, None, out.name)
    return write_audio(out, audio, SAMPLE_RATE, fmt, None, overwrite), audio, levels, warnings


__all__ = ["LatentsError", "read_latents", "write_latents", "encode_file", "decode_file", "MAX_LATENTS"]
