"""The generation settings: one table that every front end is generated from.

Each :class:`Field` says a setting's type, default (a value, None, or
:data:`MODEL_DEFAULT`: the model's recommendation), bounds, choices, help text and
which front ends show it. From :data:`FIELDS`, and only from it, come

* the CLI's options and their checks (``sa3_mlx.cli.generate``),
* the studio's JSON parsing, its form's options and the OpenAPI schema (``sa3_mlx.studio``),
* :class:`GenerationSettings`, the frozen value the pipeline runs,
* the metadata written into every output and the ``sa3 info`` command that reproduces it.

A bad value raises :class:`SettingsError`, whose message names the setting the way
the front end spells it (``--seconds`` on the command line, ``seconds`` in JSON):
both front ends accept and refuse exactly the same values, with the same words.
Nothing here imports MLX, so every check runs before any model is loaded.

Adding a setting: one entry in :data:`FIELDS` (plus a cross-field rule in
:func:`validate` if it has one), then its use in the core.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hub, prompt_weights
from .audio import FORMATS, MIN_LOUDNESS_SECONDS

MAX_SECONDS = 384.0  # the seconds conditioner's range; beyond it the duration embedding saturates
MAX_SEED = 2**63 - 1  # MLX keys take unsigned 64-bit seeds; the step-noise key is seed + 1
RANDOM_SEED_RANGE = 2**31 - 1  # what a drawn seed is taken from (short enough to type)
MIN_NOISE_LEVEL = 0.01  # below this the schedule collapses and the model is undefined
SAMPLERS = ("pingpong", "euler", "rk4", "dpmpp")  # keys of sampling.SAMPLERS (not imported here: that loads MLX)
# The samplers each diffusion objective takes: what upstream's app offers per model (its sampling
# code would run any of them; the distilled rf_denoiser models are made for pingpong, and pingpong's
# full re-noising is no solver of a base model's flow).
OBJECTIVE_SAMPLERS = {"rf_denoiser": ("pingpong",), "rectified_flow": ("euler", "rk4", "dpmpp")}
DTYPES = ("fp32", "fp16", "bf16")
QUANTIZE_BITS = ("8", "4")  # MLX affine quantization of the DiT's block linears (sa3_mlx.quantize)
QUANTIZE_GROUP_SIZES = ("32", "64", "128")  # what mx.quantize takes; 64 is its default
LOUDNESS_RANGE = (-70.0, 0.0)  # LUFS: below -70 BS.1770 gates everything out; 0 is full scale
MAX_INPAINT_RANGES = 32
MAX_PROMPT_CHARS = 10_000  # far beyond the 256 tokens the text encoder reads
MAX_LORA_STRENGTH = 10.0  # past this a merged fp16 weight overflows on real checkpoints
# The L2 norm over all of a clip's latents grows with its length (about 22 for 16 latents of the tiny
# reference model, ~16x that at 384 s): room for every length, and finite.
MAX_CFG_NORM_THRESHOLD = 10_000.0

# Upstream's schedule shifts (``sampling_distribution_shift_options``): type -> keyword defaults.
SHIFT_DEFAULTS = {
    "none": {},
    "logsnr": {"anchor_length": 2000, "anchor_logsnr": -6.2, "rate": 1.0, "logsnr_end": 2.0},
    "flux": {"min_length": 256, "max_length": 4096, "alpha_min": 1.0, "alpha_max": 1.0},
    "full": {"base_shift": 0.5, "max_shift": 1.15, "max_length": 4096, "min_length": 256, "use_sine": False},
}
# What --shift / "shift" takes: "model" (the model's own) or a type, with the parameters upstream's app
# has sliders for, within the sliders' ranges: name -> (int or float, minimum, maximum).
SHIFT_TYPES = ("model", *SHIFT_DEFAULTS)
_LENGTH = ("int", 1, 10_000)
SHIFT_PARAMETERS = {
    "model": {},
    "none": {},
    "logsnr": {"anchor_length": ("int", 100, 10_000), "anchor_logsnr": ("float", -12.0, 0.0),
               "rate": ("float", -2.0, 2.0), "logsnr_end": ("float", -2.0, 6.0)},
    "flux": {"min_length": _LENGTH, "max_length": _LENGTH, "alpha_min": ("float", 0.1, 20.0),
             "alpha_max": ("float", 0.1, 20.0)},
    "full": {"base_shift": ("float", 0.0, 5.0), "max_shift": ("float", 0.0, 5.0), "min_length": _LENGTH,
             "max_length": _LENGTH},
}

MODEL_DEFAULT = "model's default"  # a default that the model source decides (steps, cfg, sampler)
FRONT_ENDS = ("cli", "api")


class SettingsError(ValueError):
    """A setting outside what is accepted. ``template`` holds ``{field}`` placeholders that
    each front end spells its own way (:meth:`message`); ``str()`` is the API spelling."""

    def __init__(self, field: str, template: str):
        self.field = field
        self.template = template
        super().__init__(self.message(api_name))

    def message(self, spell: Callable[[str], str]) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: spell(m.group(1)), self.template)


@dataclass(frozen=True)
class Field:
    """One setting. ``kind``: text, int, float, choice, bool, ranges (``[start, end]`` pairs),
    interval (one ``[low, high]`` pair within ``[minimum, maximum]``), shift (``TYPE[:KEY=VALUE,...]``
    text, see :data:`SHIFT_PARAMETERS`), loras (``FILE[:STRENGTH]`` specs) or audio (a path; in the API
    an upload or a job output)."""

    name: str
    kind: str
    default: Any = None
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple = ()
    required: bool = False
    fronts: tuple[str, ...] = FRONT_ENDS
    flag: str | None = None  # the CLI spelling; default --name-with-dashes
    metavar: str | None = None
    group: str = "sampling"  # the CLI help section
    api_default: Any = None  # when the studio's default differs (it keeps models loaded)
    max_items: int | None = None
    max_chars: int | None = None
    nullable: bool = True  # None (JSON null) means "the default"
    weighted: bool = False  # text that may hold (phrase:weight) groups (sa3_mlx.prompt_weights)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def default_for(self, front: str) -> Any:
        if front == "api" and self.api_default is not None:
            return self.api_default
        return self.default

    def bounds_text(self, minimum=None, maximum=None) -> str:
        lo = self.minimum if minimum is None else minimum
        hi = self.maximum if maximum is None else maximum
        if self.kind == "int":
            return f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}"
        if lo is not None and hi is not None:
            left, right = "(" if self.exclusive_minimum else "[", ")" if self.exclusive_maximum else "]"
            return f"in {left}{lo:g}, {hi:g}{right}"
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {lo:g}"
        return f"{'<' if self.exclusive_maximum else '<='} {hi:g}"


FIELDS: tuple[Field, ...] = (
    Field("prompt", "text", required=True, group="what to generate", max_chars=MAX_PROMPT_CHARS, nullable=False,
          weighted=True,
          help='what to generate ("" = unconditional; asked for on the command line when omitted); '
               '(phrase:W) weights a phrase, W in [-10, 10] (1 = as written, 0 = empty, >1 = stronger); '
               r'\( and \) are literal parentheses'),
    Field("negative_prompt", "text", group="what to generate", max_chars=MAX_PROMPT_CHARS, weighted=True,
          help="what to steer away from (used when cfg is not 1); takes (phrase:W) weights as the prompt"),
    Field("seconds", "float", 30.0, minimum=0.0, maximum=MAX_SECONDS, exclusive_minimum=True,
          group="what to generate", nullable=False, help=f"length in seconds (default 30, at most {MAX_SECONDS:g})"),
    Field("num_outputs", "int", 1, minimum=1, maximum=16, metavar="N", group="what to generate", nullable=False,
          help="N variations in one batched run, seeds s, s+1, ... (default 1)"),
    Field("model", "choice", "sm-music", choices=tuple(hub.MODELS), flag="--dit", group="model",
          help="generator: " + ", ".join(f"{m} ({s.description})" for m, s in hub.MODELS.items())
               + " (on the command line a picker asks when neither --dit nor --model is given)"),
    Field("release", "text", fronts=("cli",), flag="--model", metavar="REPO_OR_PATH", group="model",
          help="an original PyTorch release instead of --dit: a Hugging Face repo "
               "(stabilityai/stable-audio-3-{small-music,small-sfx,medium}[-base]) or a local folder with "
               "model_config.json (or one written by sa3 convert)"),
    Field("loras", "loras", (), flag="--lora", metavar="FILE[:STRENGTH][@LO-HI][;OPTION...]",
          group="model",
          minimum=-MAX_LORA_STRENGTH, maximum=MAX_LORA_STRENGTH, max_items=16,
          help="LoRA/DoRA adapter (upstream .safetensors) merged into the DiT, strength default 1 "
               f"(|strength| <= {MAX_LORA_STRENGTH:g}); @LO-HI: active only at noise levels sigma in [LO, HI] "
               "(0 <= LO <= HI <= 1; e.g. @0.4-1 for the early steps); options ;cond=S (the conditioner's own "
               "strength) and ;skip=GLOB|GLOB (modules left out, e.g. ;skip=layers.0.|layers.1.); repeatable, "
               "stacked in the order given. In the studio's API a list of the same specs with a NAME from "
               "the server's --lora-dir in place of FILE"),
    Field("decoder", "choice", choices=tuple(hub.CODECS), group="model",
          help="audio codec (default: the generator's own; another one works, with a warning)"),
    Field("dit_dtype", "choice", choices=DTYPES, group="model",
          help="DiT compute precision (default fp32 on a CPU, fp16 on a GPU)"),
    Field("codec_dtype", "choice", choices=DTYPES, group="model",
          help="codec compute precision (default fp32; fp16 for SAME-L on a GPU)"),
    Field("quantize", "choice", choices=QUANTIZE_BITS, fronts=("cli",), metavar="BITS", group="model",
          help="quantize the DiT's transformer-block linear layers to 8 or 4 bits at load time (MLX affine "
               "quantization; a file written by sa3 convert --quantize is read as it is); default off. "
               "The studio takes it as a server flag"),
    Field("quantize_group_size", "choice", choices=QUANTIZE_GROUP_SIZES, fronts=("cli",), metavar="N",
          group="model", help="weights per quantization scale and bias (default 64, MLX's)"),
    Field("free_models", "bool", True, api_default=False, group="model", nullable=False,
          help="free each model after its last use to lower peak memory (default on; the studio keeps them)"),
    Field("steps", "int", MODEL_DEFAULT, minimum=1, maximum=1000,
          help="sampling steps (default: the model's; 8 for the distilled models, 50 for the -base models)"),
    Field("sampler", "choice", MODEL_DEFAULT, choices=SAMPLERS,
          help="pingpong for the distilled rf_denoiser models; euler, rk4 (4 model evaluations a step) or dpmpp "
               "(DPM-Solver++ 2M) for the rectified_flow -base models (default: the model's; pingpong, euler)"),
    Field("seed", "int", minimum=0, maximum=MAX_SEED,
          help=f"random seed, 0 to {MAX_SEED} (random when omitted); variation i uses seed + i, "
               "wrapping past the maximum"),
    Field("cfg", "float", MODEL_DEFAULT, minimum=0.0, maximum=50.0,
          help="classifier-free guidance scale; 1 = off (default: the model's; 1 for the distilled "
               "models, 7 for the -base models)"),
    Field("apg", "float", 1.0, minimum=0.0, maximum=1.0, nullable=False,
          help="adaptive projected guidance, 0 = vanilla CFG .. 1 = full projection (default 1)"),
    Field("cfg_rescale", "float", 0.0, minimum=0.0, maximum=1.0, metavar="PHI", nullable=False,
          help="CFG rescale (upstream scale_phi): blend PHI of the guided velocity rescaled to the conditional "
               "one's spread over the channels; 0 = off (default)"),
    Field("cfg_norm_threshold", "float", 0.0, minimum=0.0, maximum=MAX_CFG_NORM_THRESHOLD, metavar="NORM",
          nullable=False, help="cap the L2 norm of each output's guidance direction (conditional minus "
                               "unconditional denoised latents) at NORM, before APG; 0 = off (default)"),
    Field("cfg_interval", "interval", (0.0, 1.0), minimum=0.0, maximum=1.0, metavar="LO,HI", nullable=False,
          help="guide only at noise levels in [LO, HI]; the other steps run the conditional model alone "
               "(default 0,1: every step)"),
    Field("shift", "shift", "model", choices=SHIFT_TYPES, metavar="TYPE[:KEY=VALUE,...]", nullable=False,
          max_chars=200,
          help="the schedule's distribution shift: model (default: the model's own), none (linear), logsnr "
               "[anchor_length, anchor_logsnr, rate, logsnr_end], flux [min_length, max_length, alpha_min, "
               "alpha_max] or full [base_shift, max_shift, min_length, max_length], e.g. "
               "flux:alpha_min=2,alpha_max=2 or logsnr:rate=0; parameters left out take upstream's defaults"),
    Field("headroom", "float", 0.0, minimum=0.0, maximum=60.0, metavar="SECONDS", nullable=False,
          help="sample SECONDS more latents and hide them from the attention, as upstream generate() "
               "(its default is 6); 0 = off (default)"),
    Field("init_audio", "audio", group="audio input",
          help="audio to start from: a file (any format libsndfile reads, any rate, mono or stereo); in the "
               'API {"upload": ID} or {"job": ID, "output": N}'),
    Field("init_noise_level", "float", minimum=MIN_NOISE_LEVEL, maximum=1.0, group="audio input",
          help=f"starting noise level sigma_max in [{MIN_NOISE_LEVEL:g}, 1] (default 1.0; 0.9 for audio-to-audio)"),
    Field("inpaint", "ranges", (), flag="--inpaint-range", metavar="START,END", group="audio input",
          max_items=MAX_INPAINT_RANGES,
          help="seconds to regenerate, the rest is kept exactly (repeatable; needs init audio)"),
    Field("format", "choice", choices=tuple(FORMATS), group="output",
          help="wav16 (default; else the format an --out name's suffix says), wav24, wav32f (32-bit float), flac, "
               "mp3 (320 kbps CBR, settings in the ID3 comment), ogg (Vorbis) or opus (48 kHz), where the local "
               "libsndfile encodes them"),
    Field("loudness", "float", minimum=LOUDNESS_RANGE[0], maximum=LOUDNESS_RANGE[1], exclusive_maximum=True,
          metavar="LUFS", group="output",
          help="normalise to this integrated loudness (ITU-R BS.1770, e.g. -14) with a -1 dBTP true-peak "
               "limiter (off by default)"),
)
FIELD = {f.name: f for f in FIELDS}


def cli_name(name: str) -> str:
    return FIELD[name].cli_flag if name in FIELD else name


def api_name(name: str) -> str:
    return name


def fields_for(front: str) -> list[Field]:
    return [f for f in FIELDS if front in f.fronts]


GenerationSettings = dataclasses.make_dataclass(
    "GenerationSettings",
    [(f.name, Any, dataclasses.field(default=f.default)) for f in FIELDS],
    frozen=True,
    namespace={
        "__doc__": "Every generation setting, checked (see :data:`FIELDS`). ``MODEL_DEFAULT`` and None "
                   "stand for defaults the model or the front end fills in (:meth:`Pipeline.resolve`).",
        "replace": lambda self, **changes: dataclasses.replace(self, **changes),
        "as_dict": lambda self: {f.name: getattr(self, f.name) for f in FIELDS},
        "variation_seed": lambda self, i: variation_seed(self.seed, i),
        "model_name": property(lambda self: self.release or self.model),
    },
)
GenerationSettings.__module__ = __name__


# What may differ between the items of one batched run (``Pipeline.generate_many``): the rest, the
# "settings shape", must be equal (the same model, length, schedule, guidance; no audio input).
BATCH_VARYING = ("prompt", "negative_prompt", "seed", "num_outputs", "format", "loudness")


def batch_shape(s) -> tuple:
    """The settings that items of one batched run share (every field but :data:`BATCH_VARYING`)."""
    return tuple((f.name, getattr(s, f.name)) for f in FIELDS if f.name not in BATCH_VARYING)


def variation_seed(seed: int, index: int) -> int:
    """The seed of variation ``index``: ``seed + index``, wrapped into ``0..MAX_SEED``."""
    return (seed + index) % (MAX_SEED + 1)


def draw_seed() -> int:
    return random.randint(0, RANDOM_SEED_RANGE)


# ---- parsing one value -------------------------------------------------------------------------


def _fail(field: Field, detail: str) -> SettingsError:
    return SettingsError(field.name, "{" + field.name + "} " + detail)


def check_text(field: Field, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(field, "is not valid UTF-8 text") from None
    if field.max_chars is not None and len(value) > field.max_chars:
        raise _fail(field, f"is {len(value)} characters; at most {field.max_chars} are accepted")
    if field.weighted:
        try:
            prompt_weights.parse(value)
        except prompt_weights.PromptSyntaxError as e:
            raise _fail(field, str(e)) from None
    return value


def check_number(field: Field, value: float, bounds: Mapping | None = None) -> float:
    lo = (bounds or {}).get("minimum", field.minimum)
    hi = (bounds or {}).get("maximum", field.maximum)
    below = lo is not None and (value <= lo if field.exclusive_minimum else value < lo)
    above = hi is not None and (value >= hi if field.exclusive_maximum else value > hi)
    if below or above:
        shown = f"{value}" if field.kind == "int" else f"{value:g}"
        raise _fail(field, f"must be {field.bounds_text(lo, hi)} (got {shown})")
    return value


def _parse_float_text(field: Field, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _fail(field, f"expects a number (got {text!r})") from None
    if not math.isfinite(value):
        raise _fail(field, f"expects a finite number (got {text!r})")
    return value


def _parse_int_text(field: Field, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _fail(field, f"expects a whole number (got {text!r})") from None


def parse_range_text(field: Field, text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise _fail(field, f"expects START,END in seconds, e.g. 4,7.5 (got {text!r})")
    return tuple(_parse_float_text(field, p.strip()) for p in parts)


def parse_interval_text(field: Field, text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise _fail(field, f"expects LO,HI, e.g. 0.2,0.8 (got {text!r})")
    return tuple(_parse_float_text(field, p.strip()) for p in parts)


def parse_shift(field: Field, text: str) -> tuple[str, dict]:
    """``TYPE[:KEY=VALUE,...]`` -> (type, the parameters given), every parameter checked."""
    kind, sep, tail = text.partition(":")
    if kind not in SHIFT_PARAMETERS:
        raise _fail(field, f"must be one of {', '.join(SHIFT_TYPES)}, optionally with parameters, e.g. "
                           f"flux:alpha_min=2,alpha_max=2 (got {text!r})")
    known = SHIFT_PARAMETERS[kind]
    params: dict = {}
    if not sep:
        return kind, params
    if not known:
        raise _fail(field, f"{kind} takes no parameters (got {text!r})")
    for item in tail.split(","):
        key, eq, raw = item.partition("=")
        if not eq or not key or not raw:
            raise _fail(field, f"{kind}: expects KEY=VALUE parameters separated by commas (got {item!r})")
        if key not in known:
            raise _fail(field, f"{kind} has no parameter {key!r} (its parameters: {', '.join(known)})")
        if key in params:
            raise _fail(field, f"{kind}: {key} is given twice")
        number, lo, hi = known[key]
        if number == "int":
            try:
                value = int(raw)
            except ValueError:
                raise _fail(field, f"{kind}: {key} expects a whole number (got {raw!r})") from None
        else:
            try:
                value = float(raw)
            except ValueError:
                raise _fail(field, f"{kind}: {key} expects a number (got {raw!r})") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise _fail(field, f"{kind}: {key} must be in [{lo:g}, {hi:g}] (got {raw})")
        params[key] = value
    merged = {**SHIFT_DEFAULTS[kind], **params}
    if "min_length" in merged and not merged["min_length"] < merged["max_length"]:
        raise _fail(field, f"{kind}: min_length must be below max_length (got {merged['min_length']} and "
                           f"{merged['max_length']})")
    return kind, params


def shift_text(kind: str, params: Mapping) -> str:
    """The canonical spelling of a shift: the parameters in upstream's order, numbers as Python writes them."""
    order = [k for k in SHIFT_PARAMETERS[kind] if k in params]
    return kind + (":" + ",".join(f"{k}={params[k]!r}" for k in order) if order else "")


def shift_options(text: str) -> dict | None:
    """The schedule shift a (checked) ``shift`` setting asks for: None for ``model`` (the model's own),
    else upstream's ``{"type": ..., **parameters}``."""
    kind, params = parse_shift(FIELD["shift"], text)
    return None if kind == "model" else {"type": kind, **params}


def check_sampler(sampler: str, objective: str, model: str) -> None:
    """Refuse a sampler that the model's diffusion objective does not take (:data:`OBJECTIVE_SAMPLERS`)."""
    allowed = OBJECTIVE_SAMPLERS.get(objective, SAMPLERS)
    if sampler not in allowed:
        choices = allowed[0] if len(allowed) == 1 else ", ".join(allowed[:-1]) + " or " + allowed[-1]
        raise SettingsError("sampler", f"{{sampler}} {sampler} does not suit {model}: {objective} models take "
                                       f"{choices}")


_LORA_INTERVAL = re.compile(r"@([0-9.eE+-]+)-([0-9.eE+-]+)$")


def lora_options(text: str) -> tuple[str, dict]:
    """``SPEC;cond=S;skip=GLOB|GLOB`` -> (SPEC, {"cond": S, "skip": (GLOB, ...)}): the conditioner's own
    strength and the modules (upstream paths, matched anywhere: ``layers.1.`` matches one block) where the
    adapter is left out. Raises ValueError with the reason for a malformed option."""
    head, sep, tail = text.partition(";")
    options: dict = {}
    if not sep:
        return text, options
    for item in tail.split(";"):
        key, eq, value = item.partition("=")
        if key not in ("cond", "skip") or not eq or not value:
            raise ValueError(f"options after ';' are cond=STRENGTH and skip=GLOB[|GLOB...] (got {item!r})")
        if key in options:
            raise ValueError(f"{key} is given twice")
        if key == "cond":
            try:
                options["cond"] = float(value)
            except ValueError:
                raise ValueError(f"cond expects a number (got {value!r})") from None
        else:
            globs = tuple(value.split("|"))
            if not all(globs):
                raise ValueError(f"skip has an empty pattern (got {value!r})")
            options["skip"] = globs
    return head, options


def lora_interval(text: str) -> tuple[str, tuple[float, float] | None]:
    """``SPEC@LO-HI`` -> (SPEC, (LO, HI)): the noise levels at which a LoRA is active; (SPEC, None) when the
    spec ends in no interval (always active)."""
    text = text.partition(";")[0]
    m = _LORA_INTERVAL.search(text)
    if not m:
        return text, None
    try:
        return text[:m.start()], (float(m.group(1)), float(m.group(2)))
    except ValueError:
        return text, None


def parse_lora_spec(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH][@LO-HI]``: the strength is the text after the last colon when it is a number
    (the interval, see :func:`lora_interval`, is left out here)."""
    text, _ = lora_interval(text)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def from_text(field: Field, text) -> Any:
    """A command-line word (or a list of them, for repeatable settings) -> the typed value."""
    if field.kind in ("text", "audio"):
        return check_text(field, text)
    if field.kind == "float":
        return _parse_float_text(field, text)
    if field.kind == "int":
        return _parse_int_text(field, text)
    if field.kind == "ranges":
        return tuple(parse_range_text(field, t) for t in text)
    if field.kind == "interval":
        return parse_interval_text(field, text)
    if field.kind == "shift":
        return check_text(field, text)  # checked and spelled canonically by validate(), as JSON's
    if field.kind == "loras":
        return tuple(check_text(field, t) for t in text)
    return text  # choice, bool: argparse gives them typed


def _json_number(field: Field, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, f"must be a finite number (got {value!r})")
    return float(value)


def from_json(field: Field, value) -> Any:
    """A JSON value -> the typed value (None: the default)."""
    if value is None:
        if not field.nullable:
            raise _fail(field, "must not be null")
        return None
    kind = field.kind
    if kind == "text":
        if not isinstance(value, str):
            raise _fail(field, f"must be a string (got {type(value).__name__})")
        return check_text(field, value)
    if kind == "float":
        return _json_number(field, value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(field, f"must be a whole number (got {value!r})")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(field, f"must be true or false (got {value!r})")
        return value
    if kind == "choice":
        if not isinstance(value, str):
            raise _fail(field, f"must be one of {', '.join(field.choices)} (got {value!r})")
        return value
    if kind == "ranges":
        if not isinstance(value, list):
            raise _fail(field, "must be a list of [start, end] pairs in seconds")
        pairs = []
        for item in value:
            if not isinstance(item, list) or len(item) != 2:
                raise _fail(field, f"ranges must be [start, end] pairs of numbers (got {item!r})")
            pairs.append(tuple(_json_number(field, x) for x in item))
        return tuple(pairs)
    if kind == "interval":
        if not isinstance(value, list) or len(value) != 2:
            raise _fail(field, f"must be a [low, high] pair of numbers (got {value!r})")
        return tuple(_json_number(field, x) for x in value)
    if kind == "shift":
        if not isinstance(value, str):
            raise _fail(field, f'must be a string such as "flux:alpha_min=2" (got {type(value).__name__})')
        return check_text(field, value)
    if kind == "audio":
        return _audio_reference(field, value)
    if kind == "loras":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(field, "must be a list of adapter specs (strings)")
        return tuple(check_text(field, v) for v in value)
    raise _fail(field, "is not accepted here")


ID_PATTERN = re.compile(r"[0-9a-f]{16}")  # studio job and upload ids


def _audio_reference(field: Field, value) -> str:
    """``{"upload": ID}`` or ``{"job": ID, "output": N}`` -> ``upload:ID`` / ``job:ID:N``: ids only, never paths."""
    shape = 'must be {"upload": ID} or {"job": ID, "output": N} with a 16-hex-digit id'
    if not isinstance(value, dict):
        raise _fail(field, shape)
    if set(value) == {"upload"} and isinstance(value["upload"], str) and ID_PATTERN.fullmatch(value["upload"]):
        return f"upload:{value['upload']}"
    if set(value) <= {"job", "output"} and isinstance(value.get("job"), str) and ID_PATTERN.fullmatch(value["job"]):
        output = value.get("output", 0)
        if isinstance(output, bool) or not isinstance(output, int) or not 0 <= output < 1000:
            raise _fail(field, f"output must be a whole number in [0, 999] (got {output!r})")
        return f"job:{value['job']}:{output}"
    raise _fail(field, shape)


def audio_reference(text: str) -> dict:
    """The inverse of the API's init_audio form: ``upload:ID`` -> ``{"upload": ID}``, ``job:ID:N`` -> ..."""
    kind, _, rest = text.partition(":")
    if kind == "upload":
        return {"upload": rest}
    job, _, output = rest.partition(":")
    return {"job": job, "output": int(output)}


# ---- checking a whole request ------------------------------------------------------------------


def _check_value(field: Field, value, bounds: Mapping | None) -> Any:
    """Bounds and choices of one typed, non-default value."""
    kind = field.kind
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(field, f"must be a finite number (got {value!r})")
        return check_number(field, float(value), bounds)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(field, f"must be a whole number (got {value!r})")
        return check_number(field, value, bounds)
    if kind == "choice" and value not in field.choices:
        raise _fail(field, f"must be one of {', '.join(field.choices)} (got {value!r})")
    if kind in ("text", "audio"):
        if not isinstance(value, str):
            raise _fail(field, f"must be a string (got {type(value).__name__})")
        return check_text(field, value)
    if kind == "bool" and not isinstance(value, bool):
        raise _fail(field, f"must be true or false (got {value!r})")
    if kind == "ranges":
        value = tuple((float(a), float(b)) for a, b in value)
        limit = (bounds or {}).get("max_items", field.max_items)
        if len(value) > limit:
            raise _fail(field, f"takes at most {limit} ranges (got {len(value)})")
        for start, end in value:
            if not 0 <= start < end:
                raise _fail(field, f"range {start:g},{end:g} needs 0 <= START < END")
    if kind == "interval":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise _fail(field, f"must be a [low, high] pair of numbers (got {value!r})")
        for x in value:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise _fail(field, f"must be a pair of finite numbers (got {x!r})")
        lo, hi = (float(x) for x in value)
        if not field.minimum <= lo <= hi <= field.maximum:
            raise _fail(field, f"{lo:g},{hi:g} needs {field.minimum:g} <= LO <= HI <= {field.maximum:g}")
        return lo, hi
    if kind == "shift":
        if not isinstance(value, str):
            raise _fail(field, f"must be a string (got {type(value).__name__})")
        return shift_text(*parse_shift(field, check_text(field, value)))
    if kind == "loras":
        if len(value) > field.max_items:
            raise _fail(field, f"takes at most {field.max_items} adapters (got {len(value)})")
        for spec in value:
            path, strength = parse_lora_spec(spec)
            if not math.isfinite(strength) or abs(strength) > field.maximum:
                raise SettingsError(field.name, "{" + field.name + "} " + f"{spec}: the strength must be a finite "
                                    f"number in [{field.minimum:g}, {field.maximum:g}]")
            try:
                _, options = lora_options(spec)
            except ValueError as e:
                raise SettingsError(field.name, "{" + field.name + "} " + f"{spec}: {e}") from None
            cond = options.get("cond")
            if cond is not None and (not math.isfinite(cond) or abs(cond) > field.maximum):
                raise SettingsError(field.name, "{" + field.name + "} " + f"{spec}: the cond strength must be a "
                                    f"finite number in [{field.minimum:g}, {field.maximum:g}]")
            _, interval = lora_interval(spec)
            if interval is not None and not (math.isfinite(interval[0]) and math.isfinite(interval[1])
                                             and 0.0 <= interval[0] <= interval[1] <= 1.0):
                raise SettingsError(field.name, "{" + field.name + "} " + f"{spec}: the noise levels after '@' "
                                    "need 0 <= LO <= HI <= 1")
    return value


def validate(values: Mapping[str, Any], bounds: Mapping[str, Mapping] | None = None) -> "GenerationSettings":
    """Checked :class:`GenerationSettings` from typed ``values`` (missing or None = the default).

    ``bounds`` narrows fields' limits (``{"seconds": {"maximum": 60}}``: a server's policy).
    Raises :class:`SettingsError` naming the first bad setting.
    """
    bounds = bounds or {}
    values = dict(values)
    if values.get("release") is not None:
        if values.get("model") is not None or values.get("decoder") is not None:
            raise SettingsError("release", "{release} brings its own DiT and codec; leave out {model} and {decoder}")
        values["model"] = None
    out = {}
    for f in FIELDS:
        value = values.get(f.name)
        if f.name == "model" and values.get("release") is not None:
            out[f.name] = None
            continue
        if value is None or value == MODEL_DEFAULT:
            if f.required:
                raise SettingsError(f.name, "{" + f.name + "} is required" + (
                    ' ("" for unconditional)' if f.name == "prompt" else ""))
            value = f.default
        else:
            value = _check_value(f, value, bounds.get(f.name))
        out[f.name] = value
    s = GenerationSettings(**out)
    _cross_checks(s)
    return s


def _cross_checks(s) -> None:
    if s.quantize_group_size is not None and s.quantize is None:
        raise SettingsError("quantize_group_size", "{quantize_group_size} needs {quantize} (the bits)")
    for start, end in s.inpaint:
        if end > s.seconds:
            raise SettingsError("inpaint", f"{{inpaint}} {start:g},{end:g} ends after {{seconds}} {s.seconds:g}")
    if s.inpaint and s.init_audio is None:
        raise SettingsError("inpaint", "{inpaint} needs {init_audio} (the audio to inpaint into)")
    if s.loudness is not None and s.seconds < MIN_LOUDNESS_SECONDS:
        raise SettingsError("loudness", f"{{loudness}} needs {{seconds}} >= {MIN_LOUDNESS_SECONDS:g} "
                                        "(BS.1770 measures 0.4 s blocks)")


def from_request(data, bounds: Mapping[str, Mapping] | None = None) -> "GenerationSettings":
    """The studio's JSON body -> checked settings (API defaults; unknown names refused)."""
    if not isinstance(data, dict):
        raise SettingsError("prompt", "the request body must be a JSON object of settings")
    known = {f.name: f for f in fields_for("api")}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SettingsError(unknown[0], f"unknown setting {unknown[0]!r} (accepted: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        value = from_json(f, data[name]) if name in data else None
        values[name] = f.default_for("api") if value is None else value
    return validate(values, bounds)


# ---- metadata and the command that reproduces a file ------------------------------------------


def to_metadata(s) -> dict:
    """The settings as JSON-ready metadata (tuples as lists)."""
    out = {}
    for f in FIELDS:
        value = getattr(s, f.name)
        if f.kind == "ranges":
            value = [list(r) for r in value]
        elif f.kind in ("loras", "interval"):
            value = list(value)
        out[f.name] = None if value == MODEL_DEFAULT else value
    return out


def from_metadata(meta: Mapping) -> "GenerationSettings":
    """Settings stored by :func:`to_metadata` (files of older versions: what can be recovered)."""
    values = {}
    for f in FIELDS:
        value = meta.get(f.name)
        if value is None:
            continue
        if f.kind == "ranges":
            value = tuple(tuple(float(x) for x in r) for r in value)
        elif f.kind == "loras":
            value = tuple(value)
        elif f.kind == "interval" and isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    if "decoder" not in meta and meta.get("codec"):  # written before the settings table
        values["decoder"] = meta["codec"]
    if values.get("model") not in (None, *hub.MODELS):  # older files stored a release in "model"
        values["release"], values["model"] = values.pop("model"), None
    if isinstance(meta.get("loras"), list) and meta["loras"] and isinstance(meta["loras"][0], dict):
        values["loras"] = tuple(f"{x['file']}:{x['strength']!r}" for x in meta["loras"])
    values["num_outputs"] = 1  # a file is one output; its seed is its own
    if values.get("release"):
        values["model"] = values["decoder"] = None
    return validate(values)


def _word(f: Field, value) -> list[str]:
    flag = f.cli_flag
    if f.kind == "bool":
        return [flag if value else "--no-" + flag[2:]]
    if f.kind == "ranges":
        return [w for start, end in value for w in (flag, f"{start!r},{end!r}")]
    if f.kind == "interval":
        return [flag, f"{value[0]!r},{value[1]!r}"]
    if f.kind == "loras":
        return [w for spec in value for w in (flag, spec)]
    if isinstance(value, float):
        return [flag, repr(value)]
    return [flag, str(value)]


def reproduce_command(s) -> str:
    """The ``sa3`` command line that generates the same audio again (every setting that is not
    the default, spelled as the CLI takes it)."""
    words = ["sa3"]
    for f in fields_for("cli"):
        value = getattr(s, f.name)
        if value is None or value == MODEL_DEFAULT or (f.kind in ("ranges", "loras") and not value):
            continue
        if f.name == "model" and s.release is not None:
            continue
        if value == f.default and f.name not in ("prompt", "seconds", "model"):
            continue
        words += _word(f, value)
    return shlex.join(words)


def describe(front: str, limits: Mapping[str, Mapping] | None = None) -> list[dict]:
    """The fields of one front end as plain data (the studio's form reads it)."""
    limits = limits or {}
    out = []
    for f in fields_for(front):
        b = limits.get(f.name, {})
        out.append(dict(
            name=f.name, kind=f.kind, default=f.default_for(front), help=f.help, choices=list(f.choices),
            minimum=b.get("minimum", f.minimum), maximum=b.get("maximum", f.maximum),
            exclusive_minimum=f.exclusive_minimum, exclusive_maximum=f.exclusive_maximum,
            required=f.required, max_items=b.get("max_items", f.max_items), max_chars=f.max_chars,
        ))
    return out


# The shape of a shift (the names and the numbers' ranges are checked by parse_shift).
_SHIFT_PATTERN = r"^(model|none|(logsnr|flux|full)(:[a-z_]+=[^,=]+(,[a-z_]+=[^,=]+)*)?)$"


def json_schema(front: str = "api", limits: Mapping[str, Mapping] | None = None) -> dict:
    """The request schema (JSON Schema / OpenAPI 3.1) of the settings, every bound stated."""
    limits = limits or {}
    properties = {}
    for f in fields_for(front):
        b = limits.get(f.name, {})
        lo, hi = b.get("minimum", f.minimum), b.get("maximum", f.maximum)
        schema: dict = {"description": f.help}
        if f.kind in ("int", "float"):
            schema["type"] = "integer" if f.kind == "int" else "number"
            if lo is not None:
                schema["exclusiveMinimum" if f.exclusive_minimum else "minimum"] = lo
            if hi is not None:
                schema["exclusiveMaximum" if f.exclusive_maximum else "maximum"] = hi
        elif f.kind == "text":
            schema["type"] = "string"
            if f.max_chars:
                schema["maxLength"] = f.max_chars
        elif f.kind == "bool":
            schema["type"] = "boolean"
        elif f.kind == "choice":
            schema["enum"] = list(f.choices)
        elif f.kind == "ranges":
            schema.update(type="array", maxItems=b.get("max_items", f.max_items), items={
                "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number", "minimum": 0}})
        elif f.kind == "loras":
            schema.update(type="array", maxItems=f.max_items, items={
                "type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*(:[-+0-9.eE]+)?(@[0-9.]+-[0-9.]+)?(;.*)?$"})
        elif f.kind == "interval":
            schema.update(type="array", minItems=2, maxItems=2,
                          items={"type": "number", "minimum": lo, "maximum": hi})
            schema["description"] += " ([LO, HI] with LO <= HI)"
        elif f.kind == "shift":
            schema.update(type="string", pattern=_SHIFT_PATTERN, maxLength=f.max_chars)
        elif f.kind == "audio":
            schema["oneOf"] = [
                {"type": "object", "required": ["upload"], "additionalProperties": False,
                 "properties": {"upload": {"type": "string", "pattern": "^[0-9a-f]{16}$"}}},
                {"type": "object", "required": ["job"], "additionalProperties": False,
                 "properties": {"job": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                                "output": {"type": "integer", "minimum": 0, "maximum": 999, "default": 0}}},
            ]
        default = f.default_for(front)
        if default == MODEL_DEFAULT:
            schema["description"] += " (null: the model's default)"
        elif isinstance(default, tuple) and default:
            schema["default"] = list(default)
        elif default not in (None, ()):
            schema["default"] = default
        elif default == ():
            schema["default"] = []
        if f.nullable and not f.required:  # null: the default
            if "type" in schema:
                schema["type"] = [schema["type"], "null"]
            elif "enum" in schema:
                schema["enum"] = [*schema["enum"], None]
            else:
                schema["oneOf"] = [*schema["oneOf"], {"type": "null"}]
        properties[f.name] = schema
    return {"type": "object", "additionalProperties": False,
            "required": [f.name for f in fields_for(front) if f.required], "properties": properties}

