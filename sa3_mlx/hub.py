"""Where weight files come from: a local folder, or the Hugging Face hub (cached).

The official MLX files live in ``stabilityai/stable-audio-3-optimized`` under
``MLX/``. Only the files a run needs are downloaded, into the standard HF cache
(``HF_HOME`` / ``HF_HUB_CACHE`` honoured), so other tools share them. ``HF_TOKEN`` or
``huggingface-cli login`` provide the token for the gated repo; ``HF_HUB_OFFLINE=1``
uses the cache only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ID = "stabilityai/stable-audio-3-optimized"
REPO_FOLDER = "MLX"


@dataclass(frozen=True)
class ModelSpec:
    """One generator: its DiT file and the codec it was trained with."""

    name: str
    dit_file: str
    codec: str  # "same-s" or "same-l"
    description: str


MODELS: dict[str, ModelSpec] = {
    "sm-music": ModelSpec("sm-music", "dit_sm-music_f16.npz", "same-s", "small DiT for music"),
    "sm-sfx": ModelSpec("sm-sfx", "dit_sm-sfx_f16.npz", "same-s", "small DiT for sound effects"),
    "medium": ModelSpec("medium", "dit_medium_f16.npz", "same-l", "medium DiT (differential attention)"),
}
CODECS = {"same-s": "same_s", "same-l": "same_l"}
T5GEMMA_FILE = "t5gemma_f16.npz"
# What `sa3 convert` writes beside the official-format files (read by sources.converted).
CONVERTED_MANIFEST = "sa3_model.json"
CONVERTED_TOKENIZER_DIR = "tokenizer"


def codec_family(codec: str) -> str:
    """``"same-s"`` -> ``"s"``, ``"same-l"`` -> ``"l"``."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (choose from {', '.join(CODECS)})")
    return codec.rsplit("-", 1)[1]


def codec_file(codec: str, role: str) -> str:
    """File name of a codec half: ``codec_file("same-s", "decoder") -> "same_s_decoder_f32.npz"``."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (choose from {', '.join(CODECS)})")
    if role not in ("encoder", "decoder"):
        raise ValueError(f"unknown codec role {role!r}")
    return f"{CODECS[codec]}_{role}_f32.npz"


def files_for(model: str, codec: str | None = None, encoder: bool = False) -> list[str]:
    """The files one run needs: text encoder, DiT, decoder and (audio input) encoder."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (choose from {', '.join(MODELS)})")
    codec = codec or MODELS[model].codec
    files = [T5GEMMA_FILE, MODELS[model].dit_file, codec_file(codec, "decoder")]
    if encoder:
        files.append(codec_file(codec, "encoder"))
    return files


class WeightsUnavailable(RuntimeError):
    """A weight file could not be found locally nor downloaded; the message says what to do."""


def local_file(weights_dir: str | Path, name: str) -> Path:
    """``name`` inside a local folder, flat or with the repo's ``MLX/`` sub-folder."""
    root = Path(weights_dir).expanduser()
    for candidate in (root / name, root / REPO_FOLDER / name):
        if candidate.is_file():
            return candidate
    raise WeightsUnavailable(
        f"{name} not found in {root} (looked in {root} and {root / REPO_FOLDER}); "
        f"download it with `sa3 download` or copy it there"
    )


def _endpoint_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


def hub_reachable() -> bool:
    """Whether the hub's host name resolves (offline mode counts as reachable: the library handles it)."""
    import socket

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        socket.getaddrinfo(_endpoint_host(), None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def quiet_hub_logs() -> None:
    """huggingface_hub logs every retry as a warning; our own error line says what went wrong."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


def hub_file(name: str, revision: str | None = None, progress: bool = True) -> Path:
    """Path of ``MLX/<name>`` in the local HF cache, downloading it first if needed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    filename = f"{REPO_FOLDER}/{name}"
    if not hub_reachable():
        # No name resolution at all: huggingface_hub would retry for ~25 s and then fall back
        # to the cache; do that at once.
        cached = cached_file(name)
        if cached is not None:
            return cached
        raise WeightsUnavailable(
            f"{filename} is not in the local Hugging Face cache and {_endpoint_host()} cannot be reached "
            "(no network or DNS): connect and run `sa3 download`, or pass --weights-dir with the files"
        )
    try:
        (enable_progress_bars if progress else disable_progress_bars)()
        quiet_hub_logs()
        return Path(hf_hub_download(REPO_ID, filename, revision=revision))
    except GatedRepoError:
        raise WeightsUnavailable(
            f"{REPO_ID} is gated: accept the licence at https://huggingface.co/{REPO_ID}, "
            "then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise WeightsUnavailable(
            f"{REPO_ID} is not accessible with the current credentials: accept the licence at "
            f"https://huggingface.co/{REPO_ID} and log in with `hf auth login` or set HF_TOKEN"
        ) from None
    # Before EntryNotFoundError: recent huggingface_hub makes it a subclass.
    except LocalEntryNotFoundError:
        raise WeightsUnavailable(
            f"{filename} is not in the local Hugging Face cache and cannot be downloaded "
            "(offline, HF_HUB_OFFLINE=1, or no network): connect and run `sa3 download`, "
            "or pass --weights-dir with the files"
        ) from None
    except EntryNotFoundError:
        raise WeightsUnavailable(f"{filename} does not exist in {REPO_ID}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise WeightsUnavailable(
                f"access to {REPO_ID} was refused ({status}): accept the licence at "
                f"https://huggingface.co/{REPO_ID} and log in with `hf auth login` or set HF_TOKEN"
            ) from None
        raise WeightsUnavailable(f"downloading {filename} failed: {e}") from None
    except OSError as e:  # disk full, permissions on the cache
        raise WeightsUnavailable(f"could not store {filename} in the Hugging Face cache: {e}") from None


def resolve(name: str, weights_dir: str | Path | None = None, progress: bool = True) -> Path:
    """A weight file's local path: from ``weights_dir`` when given, else the hub cache."""
    if weights_dir is not None:
        return local_file(weights_dir, name)
    return hub_file(name, progress=progress)


def cached_file(name: str) -> Path | None:
    """``MLX/<name>`` in the local HF cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(REPO_ID, f"{REPO_FOLDER}/{name}")
    return Path(found) if isinstance(found, str) else None
