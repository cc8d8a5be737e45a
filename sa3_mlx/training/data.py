"""The data side of training: audio files, captions, and the latent cache (``sa3 encode``).

* Files: every audio file under a folder (recursively) that soundfile reads, any rate
  (resampled with soxr by :func:`sa3_mlx.audio.read_audio`), mono or stereo.
* Captions, per file, in this order: a JSON sidecar ``NAME.json`` (``prompt`` and/or tags),
  a ``.txt`` sidecar (the whole text is the prompt), the file's embedded tags (read with
  ``mutagen``: title, artist, album, genre, BPM, ...), else the file name. Tags become
  ``"Genre: ..., BPM: ..."`` pieces, shuffled at every step (:func:`caption_text`).
* Latents: the model's own SAME encoder (fp32) over the whole file, stored once per file
  content in the cache (default ``FOLDER/.sa3-cache/<model>``) as ``<sha256>.npz`` with a
  JSON sidecar (duration, seconds_total, the latent-resolution padding mask as a valid
  length, caption and its source). Re-running encodes only new or changed files.

A file that cannot be used (unreadable, silent, empty) gives a warning naming it and is
skipped; a folder without any usable file is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_NAME = ".sa3-cache"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64",
                  ".rf64", ".m4a")
SILENCE_PEAK = 1e-4  # -80 dBFS
TAG_FIELDS = (("title", "Title"), ("artist", "Artist"), ("album", "Album"), ("genre", "Genre"), ("bpm", "BPM"),
              ("mood", "Mood"), ("key", "Key"), ("instrument", "Instruments"), ("instruments", "Instruments"),
              ("comment", "Description"), ("description", "Description"))
CACHE_VERSION = 1


class DataError(ValueError):
    """A data folder that gives nothing to train on."""


@dataclass
class Caption:
    source: str  # json | txt | tags | filename
    prompt: str | None = None  # fixed text, first
    pieces: list[str] = field(default_factory=list)  # "Genre: rock" ..., after it in a new order at each use

    def to_json(self) -> dict:
        return {"source": self.source, "prompt": self.prompt, "pieces": self.pieces}

    @classmethod
    def from_json(cls, d: dict) -> "Caption":
        return cls(d["source"], d.get("prompt"), list(d.get("pieces") or []))


def caption_text(caption: Caption, rng: np.random.Generator, trigger: str | None = None,
                 trigger_prob: float = 1.0, tag_keep: float = 1.0) -> str:
    """The prompt for one step: the fixed prompt, then the tag pieces in a random order (each kept
    with probability ``tag_keep``, at least one); the trigger word first with probability ``trigger_prob``."""
    parts = [caption.prompt] if caption.prompt else []
    if caption.pieces:
        order = rng.permutation(len(caption.pieces))
        if tag_keep < 1.0:
            kept = rng.random(len(order)) < tag_keep
            kept[int(rng.integers(len(order)))] = True
            order = order[kept]
        parts += [caption.pieces[i] for i in order]
    text = ", ".join(parts)
    if trigger and rng.random() < trigger_prob:
        text = f"{trigger}, {text}" if text else trigger
    return text


def _pieces(tags: dict) -> list[str]:
    out, seen = [], set()
    for key, label in TAG_FIELDS:
        value = tags.get(key)
        if value is None or label in seen:
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value if str(v).strip())
        value = " ".join(str(value).split())
        if value:
            out.append(f"{label}: {value}")
            seen.add(label)
    return out


def read_caption(path: Path, warn: Callable[[str], None] = print) -> Caption:
    """The caption of ``path``: JSON sidecar > .txt sidecar > embedded tags > file name."""
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            tags = {str(k).lower(): v for k, v in data.items() if k != "prompt"}
            prompt = data.get("prompt")
            pieces = _pieces(tags)
            if isinstance(prompt, str) and prompt.strip():
                return Caption("json", " ".join(prompt.split()), pieces)
            if pieces:
                return Caption("json", None, pieces)
            warn(f"{side}: no 'prompt' and no known tags; using the next caption source")
        except (ValueError, UnicodeDecodeError) as e:
            warn(f"{side}: not a readable JSON caption ({e}); using the next caption source")
    side = path.with_suffix(".txt")
    if side.is_file():
        try:
            text = " ".join(side.read_text(encoding="utf-8").split())
            if text:
                return Caption("txt", text)
        except UnicodeDecodeError as e:
            warn(f"{side}: not UTF-8 text ({e}); using the next caption source")
    try:
        import mutagen

        tagged = mutagen.File(str(path), easy=True)
        if tagged is not None and tagged.tags:
            pieces = _pieces({str(k).lower(): v for k, v in dict(tagged.tags).items()})
            if pieces:
                return Caption("tags", None, pieces)
    except Exception:  # mutagen raises its own error types per format; any of them: no tags
        pass
    name = " ".join(path.stem.replace("_", " ").replace("-", " ").split())
    return Caption("filename", name)


def find_audio(folder: Path) -> list[Path]:
    """Audio files under ``folder`` (recursively, sorted), the cache and hidden folders left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):
            continue
        if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES:
            out.append(p)
    return out


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """The cache folder name of a model: its folder name and a hash of its encoder weights' identity."""
    root = Path(model.root)
    h = hashlib.sha256(str(root.resolve()).encode())
    for f in sorted(root.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{root.name}-{h.hexdigest()[:12]}"


@dataclass
class Item:
    """One encoded file."""

    path: str
    key: str  # sha256 of the file
    latents_file: str
    length: int  # latents
    valid: int  # valid latents (the rest is the codec's silence padding of the last latent)
    seconds: float
    caption: Caption

    def latents(self) -> np.ndarray:
        with np.load(self.latents_file) as f:
            return f["latents"]


def _write_npz(path: Path, **arrays) -> None:
    from .checkpoint import atomic_write

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def encode_folder(folder: str | Path, model, cache: str | Path | None = None, warn: Callable[[str], None] = print,
                  progress: Callable[[int, int, str], None] | None = None, encoder=None) -> list[Item]:
    """Encode every usable file of ``folder`` (cached), returning the items in file order.

    ``model``: an :class:`sa3_mlx.upstream.UpstreamModel`. ``progress(done, total, name)`` is
    called after each file. The encoder is loaded (fp32) only when a file needs encoding.
    """
    import mlx.core as mx

    from .. import codec
    from ..audio import AudioError, read_audio

    folder = Path(folder)
    files = find_audio(folder)
    if not files:
        raise DataError(f"{folder}: no audio files found (looked for {', '.join(AUDIO_SUFFIXES)}, recursively)")
    cache = cache_dir(folder, model, cache)
    cache.mkdir(parents=True, exist_ok=True)
    rate = int(model.sample_rate)
    training = model.training_seconds
    items = []
    for n, path in enumerate(files, 1):
        try:
            key = file_hash(path)
            caption = read_caption(path, warn)
            meta_file, lat_file = cache / f"{key}.json", cache / f"{key}.npz"
            meta = None
            if meta_file.is_file() and lat_file.is_file():
                try:
                    meta = json.loads(meta_file.read_text())
                    if meta.get("version") != CACHE_VERSION:
                        meta = None
                    else:  # a damaged cache file is encoded again, never a failure mid-run
                        with np.load(lat_file) as f:
                            if f["latents"].shape != (codec.LATENT_CHANNELS, int(meta["length"])):
                                meta = None
                except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile):
                    warn(f"{path}: its cached latents are damaged; encoding it again")
                    meta = None
            if meta is None:
                try:
                    audio = read_audio(path, rate)
                except AudioError as e:
                    warn(f"skipped: {e}")
                    continue
                samples = audio.shape[1]
                if float(np.abs(audio).max()) < SILENCE_PEAK:
                    warn(f"skipped: {path}: silent (peak below {20 * math.log10(SILENCE_PEAK):.0f} dBFS)")
                    continue
                if training and samples > training * rate:
                    warn(f"{path}: {samples / rate:.1f} s is longer than the model's training length "
                         f"({training:.1f} s); random crops of it are used")
                if encoder is None:
                    encoder = model.load_codec("encoder", mx.float32)
                latents = codec.encode(encoder, mx.array(audio[None]))[0]
                latents = np.array(latents.astype(mx.float32))
                if not np.isfinite(latents).all():
                    warn(f"skipped: {path}: the encoder gave non-finite latents")
                    continue
                valid = int(math.ceil(samples / codec.SAMPLES_PER_LATENT))
                _write_npz(lat_file, latents=latents)
                meta = {"version": CACHE_VERSION, "source": str(path), "duration": samples / rate,
                        "seconds_total": samples / rate, "length": int(latents.shape[1]), "valid": valid,
                        "padding_mask": [1] * valid + [0] * (int(latents.shape[1]) - valid),
                        "caption_source": caption.source, "encoded": time.time()}
                from .checkpoint import atomic_write

                atomic_write(meta_file, lambda tmp, m=meta: tmp.write_text(json.dumps(m)))
            items.append(Item(str(path), key, str(lat_file), int(meta["length"]), int(meta["valid"]),
                              float(meta["seconds_total"]), caption))
        except OSError as e:
            warn(f"skipped: {path}: {e.strerror or e}")
        finally:
            if progress is not None:
                progress(n, len(files), path.name)
    if not items:
        raise DataError(f"{folder}: none of the {len(files)} audio file(s) could be used (see the warnings above)")
    if not (cache / SILENCE_FILE).is_file():
        if encoder is None:
            encoder = model.load_codec("encoder", mx.float32)
        # The latent of digital silence (what the padded tail of a short clip encodes to upstream),
        # from the middle of a silent stretch, away from the edges.
        silent = codec.encode(encoder, mx.zeros((1, 2, 16 * codec.SAMPLES_PER_LATENT)))[0]
        _write_npz(cache / SILENCE_FILE, latent=np.array(silent[:, 8].astype(mx.float32)))
    return items


SILENCE_FILE = "silence.npz"


def cache_dir(folder: str | Path, model, cache: str | Path | None = None) -> Path:
    """Where the latents of ``folder`` encoded by ``model`` are kept."""
    return (Path(cache) if cache is not None else Path(folder) / CACHE_NAME) / model_fingerprint(model)


def silence_latent(folder: str | Path, model, cache: str | Path | None = None) -> np.ndarray:
    with np.load(cache_dir(folder, model, cache) / SILENCE_FILE) as f:
        return f["latent"]
