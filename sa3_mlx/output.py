"""From a generation result to files on disk: loudness, levels, naming, metadata, atomic writes.

The CLI, the studio and batch runs share this step: every output is normalised (when
asked), measured, tagged with the settings that reproduce it (``sa3 info``) and written
all or nothing (:func:`sa3_mlx.audio.write_audio_files`). Warnings come back as text for
the front end to show its own way.

Adding an output format: an entry in :data:`sa3_mlx.audio.FORMATS` (soundfile container,
subtype, suffix); the settings table takes its choices from there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .audio import (
    FORMATS,
    SAMPLE_RATE,
    TRUE_PEAK_CEILING_DB,
    AudioError,
    check_writable,
    format_problem,
    normalize_loudness,
    sample_peak,
    to_db,
    write_audio_files,
)
from .settings import to_metadata

SUFFIX_FORMATS = {".wav": "wav16", ".flac": "flac", ".mp3": "mp3", ".ogg": "ogg", ".opus": "opus"}
UNWRITABLE_SUFFIXES = {".oga", ".m4a", ".aac", ".aif", ".aiff", ".wma"}
_SUFFIXES = ", ".join(SUFFIX_FORMATS)
DEFAULT_FOLDER = Path("output")


class OutputError(ValueError):
    """An output path or format that cannot be used; the message says which and why."""


@dataclass
class Output:
    path: Path
    seed: int
    levels: dict  # peak_dbfs, and with loudness: loudness_lufs, true_peak_dbtp (None for silence)
    audio: np.ndarray  # [2, samples] as written (after loudness normalisation)


@dataclass
class Written:
    outputs: list[Output]
    warnings: list[str] = field(default_factory=list)
    loudness_seconds: float = 0.0
    write_seconds: float = 0.0


def resolve_format(fmt: str | None, out: Path | None, folder: Path = DEFAULT_FOLDER) -> str:
    """``fmt``, or the one ``out``'s suffix names (.wav -> wav16, .flac -> flac); a clash is an error.

    ``out`` may be a folder that exists (the outputs go inside it, auto-named); a name with any other
    suffix, or an existing file that is not a regular file (``/dev/null``), is refused."""
    target = None if out is None else (out if out.is_absolute() else folder / out)
    if target is not None and target.is_dir():
        out = None
    elif target is not None and target.exists() and not target.is_file():
        raise OutputError(f"--out {out}: not a regular file (give a file name, or a folder to write into)")
    suffix = out.suffix.lower() if out is not None else ""
    if suffix in UNWRITABLE_SUFFIXES:
        raise OutputError(f"--out {out}: sa3 writes WAV, FLAC, MP3, OGG or Opus; end the name in {_SUFFIXES} "
                          "(see --format)")
    if suffix and suffix not in SUFFIX_FORMATS:
        raise OutputError(f"--out {out}: unknown suffix {suffix!r}; end the name in {_SUFFIXES}, or leave the "
                          "suffix out (it is then added)")
    if fmt is None:
        fmt = SUFFIX_FORMATS.get(suffix, "wav16")
    elif suffix in SUFFIX_FORMATS and FORMATS[fmt][2] != suffix:
        raise OutputError(f"--out {out} ends in {suffix} but --format {fmt} writes {FORMATS[fmt][2]} files")
    problem = format_problem(fmt)
    if problem:
        raise OutputError(f"--format {problem}")
    return fmt


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "untitled"


def output_paths(fmt: str, seeds: list[int], prompt: str, out: Path | None = None, overwrite: bool = False,
                 folder: Path = DEFAULT_FOLDER) -> list[Path]:
    """Where the outputs go. ``out``: that file (relative to ``folder`` unless absolute), numbered
    ``NAME_1``, ``NAME_2``, ... for several; else ``folder/<prompt slug>_<seed>``, stepping aside as
    ``-2``, ``-3``, ... instead of replacing an earlier result."""
    suffix = FORMATS[fmt][2]
    target = None if out is None else (out if out.is_absolute() else folder / out)
    if target is not None and target.is_dir():  # a folder: auto-named files inside it
        out, folder = None, target
    if out is not None:
        base = target
        if base.suffix.lower() not in SUFFIX_FORMATS:
            base = base.with_name(base.name + suffix)
        if len(seeds) == 1:
            paths = [base]
        else:
            paths = [base.with_name(f"{base.stem}_{i + 1}{base.suffix}") for i in range(len(seeds))]
        if not overwrite:
            for path in paths:
                if path.exists():
                    raise OutputError(f"{path} already exists (choose another --out, or pass --overwrite)")
        return paths
    paths = []
    for s in seeds:
        stem = f"{slug(prompt)}_{s}"
        path, n = folder / f"{stem}{suffix}", 2
        while path.exists() or path in paths:  # never overwrite an earlier result silently
            path, n = folder / f"{stem}-{n}{suffix}", n + 1
        paths.append(path)
    return paths


def check_paths(paths: list[Path]) -> None:
    """Fail now, not after a long generation, when a path's folder cannot take a new file."""
    for path in paths:
        try:
            check_writable(path)
        except AudioError as e:
            raise OutputError(str(e)) from None


def _db(value: float) -> float | None:
    """dB rounded for reports; None for silence (JSON has no -inf)."""
    return round(value, 2) if math.isfinite(value) else None


def finish(audio: np.ndarray, fmt: str, loudness: float | None, name: str) -> tuple[np.ndarray, dict, list[str]]:
    """Loudness (when asked) and the level report of one output, with warnings rather than silent clipping."""
    levels: dict = {}
    warnings = []
    if loudness is not None:
        result = normalize_loudness(audio, loudness, SAMPLE_RATE)
        if not math.isfinite(result.input_lufs):
            warnings.append(f"{name}: silent, loudness normalisation not applied")
        else:
            audio = result.audio
            if result.limiter_db > 0:
                warnings.append(
                    f"{name}: the limiter lowered peaks by up to {result.limiter_db:.1f} dB to stay under "
                    f"{TRUE_PEAK_CEILING_DB:g} dBTP; loudness {result.output_lufs:.1f} LUFS"
                )
        levels["loudness_lufs"] = _db(result.output_lufs)
        levels["true_peak_dbtp"] = _db(result.true_peak_db)
    peak = sample_peak(audio)
    levels["peak_dbfs"] = _db(to_db(peak))
    if peak > 1.0 and FORMATS[fmt][1] != "FLOAT":
        warnings.append(f"{name}: peak {to_db(peak):+.1f} dBFS exceeds full scale and is clipped in {fmt} "
                        "(use the wav32f format to keep it, or loudness normalisation)")
    return audio, levels, warnings


def metadata(result, index: int, fmt: str, **extra) -> dict:
    """What output ``index`` records: the settings of the single run that reproduces it (item i of a
    batch is seed + i alone), the format, and facts of the run (mode, latents, LoRA details)."""
    s = result.settings.replace(seed=result.settings.variation_seed(index), num_outputs=1, format=fmt)
    meta = to_metadata(s)
    meta.update(version=__version__, mode=result.plan.mode, latents=result.plan.latents, codec=result.codec, **extra)
    return meta


def write(result, paths: list[Path], fmt: str, loudness: float | None = None, overwrite: bool = False,
          **extra_metadata) -> Written:
    """Finish every output of ``result`` and write them all or none (see :func:`write_audio_files`)."""
    import time

    t0 = time.perf_counter()
    files, outputs, warnings = [], [], []
    for i, (path, audio) in enumerate(zip(paths, result.audio)):
        audio, levels, notes = finish(audio, fmt, loudness, path.name)
        warnings += notes
        files.append((path, audio, metadata(result, i, fmt, **extra_metadata)))
        outputs.append(Output(path, result.settings.variation_seed(i), levels, audio))
    t1 = time.perf_counter()
    write_audio_files(files, SAMPLE_RATE, fmt, overwrite=overwrite)
    return Written(outputs, warnings, t1 - t0, time.perf_counter() - t1)
