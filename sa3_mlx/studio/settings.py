"""A generation request's settings: checked field by field, with the CLI's rules and the server's bounds.

Every ``sa3 generate`` setting that is about the audio is accepted (the output
path, ``--overwrite``, ``--json`` and ``--play`` are the server's business). A bad
value raises :class:`BadRequest` with a message naming the field, answered as 400.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .. import hub
from ..audio import FORMATS, MIN_LOUDNESS_SECONDS
from ..cli.generate import DTYPES, LOUDNESS_RANGE, MAX_SECONDS
from ..cli.parsing import MAX_SEED
from ..pipeline import MIN_NOISE_LEVEL

ID_PATTERN = re.compile(r"[0-9a-f]{16}")  # job and upload ids: server-made, checked before any lookup
MAX_INPAINT_RANGES = 32


class BadRequest(ValueError):
    """A request the server refuses (400); the message says what is wrong."""


@dataclass
class Limits:
    """Bounds on what one request may ask for (set by ``sa3 studio`` flags)."""

    max_seconds: float = MAX_SECONDS
    max_steps: int = 100
    max_batch: int = 4
    max_prompt_chars: int = 2000
    max_upload_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 64 * 1024

    def public(self) -> dict:
        return dict(vars(self))


DEFAULTS = dict(
    prompt=None, negative_prompt=None, model="sm-music", decoder=None, seconds=30.0, steps=8, seed=None,
    cfg=1.0, apg=1.0, init_audio=None, init_noise_level=None, inpaint=[], num_outputs=1, format="wav16",
    loudness=None, dit_dtype=None, free_models=False,
)


def _number(data: dict, name: str) -> float | None:
    value = data[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number (got {value!r})")
    return float(value)


def _integer(data: dict, name: str) -> int | None:
    value = data[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be a whole number (got {value!r})")
    return value


def _text(data: dict, name: str, limits: Limits) -> str | None:
    value = data[name]
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string (got {type(value).__name__})")
    if len(value) > limits.max_prompt_chars:
        raise BadRequest(f"{name} is {len(value)} characters; at most {limits.max_prompt_chars} are accepted")
    return value


def _choice(data: dict, name: str, choices) -> str | None:
    value = data[name]
    if value is not None and value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    return value


def _init_audio(value) -> dict | None:
    """``{"upload": ID}`` or ``{"job": ID, "output": N}``: ids only, never paths."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest('init_audio must be {"upload": ID} or {"job": ID, "output": N}')
    if set(value) == {"upload"} and isinstance(value["upload"], str) and ID_PATTERN.fullmatch(value["upload"]):
        return {"upload": value["upload"]}
    if set(value) <= {"job", "output"} and isinstance(value.get("job"), str) and ID_PATTERN.fullmatch(value["job"]):
        output = value.get("output", 0)
        if isinstance(output, bool) or not isinstance(output, int) or output < 0:
            raise BadRequest(f"init_audio.output must be a whole number >= 0 (got {output!r})")
        return {"job": value["job"], "output": output}
    raise BadRequest('init_audio must be {"upload": ID} or {"job": ID, "output": N} with a 16-hex-digit id')


def _inpaint(value, seconds: float) -> list[list[float]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_INPAINT_RANGES:
        raise BadRequest(f"inpaint must be a list of at most {MAX_INPAINT_RANGES} [start, end] pairs in seconds")
    ranges = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in item)):
            raise BadRequest(f"inpaint ranges must be [start, end] pairs of numbers (got {item!r})")
        start, end = float(item[0]), float(item[1])
        if not 0 <= start < end <= seconds:
            raise BadRequest(f"inpaint range {start:g}-{end:g} s must satisfy 0 <= start < end <= seconds ({seconds:g})")
        ranges.append([start, end])
    return ranges


def parse_settings(data, limits: Limits) -> dict:
    """The checked settings of a job request (defaults filled in; the seed may still be None)."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object of settings")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise BadRequest(f"unknown setting {unknown[0]!r} (accepted: {', '.join(DEFAULTS)})")
    data = {**DEFAULTS, **data}
    s: dict = {}
    s["prompt"] = _text(data, "prompt", limits)
    if s["prompt"] is None:
        raise BadRequest('prompt is required ("" for unconditional)')
    s["negative_prompt"] = _text(data, "negative_prompt", limits)
    s["model"] = _choice(data, "model", list(hub.MODELS)) or "sm-music"
    s["decoder"] = _choice(data, "decoder", list(hub.CODECS))
    s["seconds"] = _number(data, "seconds")
    if s["seconds"] is None or not 0 < s["seconds"] <= limits.max_seconds:
        raise BadRequest(f"seconds must be in (0, {limits.max_seconds:g}] (got {data['seconds']!r})")
    s["steps"] = _integer(data, "steps")
    if s["steps"] is None or not 1 <= s["steps"] <= limits.max_steps:
        raise BadRequest(f"steps must be between 1 and {limits.max_steps} (got {data['steps']!r})")
    s["num_outputs"] = _integer(data, "num_outputs")
    if s["num_outputs"] is None or not 1 <= s["num_outputs"] <= limits.max_batch:
        raise BadRequest(f"num_outputs must be between 1 and {limits.max_batch} (got {data['num_outputs']!r})")
    s["seed"] = _integer(data, "seed")
    if s["seed"] is not None and not 0 <= s["seed"] <= MAX_SEED - s["num_outputs"]:
        raise BadRequest(f"seed must be between 0 and {MAX_SEED - s['num_outputs']} (got {s['seed']})")
    s["cfg"] = _number(data, "cfg")
    if s["cfg"] is None or s["cfg"] < 0:
        raise BadRequest(f"cfg must be >= 0; 1 turns guidance off (got {data['cfg']!r})")
    s["apg"] = _number(data, "apg")
    if s["apg"] is None or not 0 <= s["apg"] <= 1:
        raise BadRequest(f"apg must be between 0 (vanilla CFG) and 1 (full projection) (got {data['apg']!r})")
    s["init_audio"] = _init_audio(data["init_audio"])
    s["init_noise_level"] = _number(data, "init_noise_level")
    if s["init_noise_level"] is not None and s["init_noise_level"] < MIN_NOISE_LEVEL:
        raise BadRequest(f"init_noise_level must be >= {MIN_NOISE_LEVEL} (got {s['init_noise_level']:g})")
    s["inpaint"] = _inpaint(data["inpaint"], s["seconds"])
    if s["inpaint"] and s["init_audio"] is None:
        raise BadRequest("inpaint needs init_audio (the audio to inpaint into)")
    s["format"] = _choice(data, "format", list(FORMATS)) or "wav16"
    s["loudness"] = _number(data, "loudness")
    if s["loudness"] is not None:
        low, high = LOUDNESS_RANGE
        if not low <= s["loudness"] < high:
            raise BadRequest(f"loudness must be in [{low:g}, {high:g}) LUFS (got {s['loudness']:g}); -14 is typical")
        if s["seconds"] < MIN_LOUDNESS_SECONDS:
            raise BadRequest(f"loudness needs seconds >= {MIN_LOUDNESS_SECONDS:g} (BS.1770 measures 0.4 s blocks)")
    s["dit_dtype"] = _choice(data, "dit_dtype", DTYPES)
    if not isinstance(data["free_models"], bool):
        raise BadRequest(f"free_models must be true or false (got {data['free_models']!r})")
    s["free_models"] = data["free_models"]
    return s
