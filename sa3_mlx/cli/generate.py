"""``sa3 [generate]``: text-to-audio, audio-to-audio, inpainting and continuation from the command line."""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__, hub
from ..audio import (
    FORMATS,
    MIN_LOUDNESS_SECONDS,
    SAMPLE_RATE,
    TRUE_PEAK_CEILING_DB,
    check_writable,
    normalize_loudness,
    read_audio,
    sample_peak,
    to_db,
    write_audio_files,
)
from .display import Display
from .parsing import Parser, UsageError, finite_float, positive_int, seconds_range, seed
from .picker import pick

MAX_SECONDS = 384.0  # the seconds conditioner's range; beyond it the duration embedding saturates
DTYPES = ("fp32", "fp16", "bf16")
SUFFIX_FORMATS = {".wav": "wav16", ".flac": "flac"}
UNWRITABLE_SUFFIXES = {".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma"}
SAMPLER_CHOICES = ("pingpong", "euler")  # sampling.SAMPLERS (not imported here: that loads MLX)
LOUDNESS_RANGE = (-70.0, 0.0)  # LUFS: below -70 BS.1770 gates everything out; 0 is full scale

EXAMPLES = """\
examples:
  sa3 --prompt "lofi house loop 120 BPM" --seconds 10
  sa3 --prompt "glass shattering on stone" --dit sm-sfx --seconds 4 --num-outputs 4
  sa3 --prompt "epic orchestral buildup" --dit medium --seconds 60 --cfg 3 --negative-prompt "vocals"
  sa3 --prompt "jazz trio, brushed drums" --init-audio in.wav --init-noise-level 0.7      (audio-to-audio)
  sa3 --prompt "drum fill" --init-audio loop.wav --inpaint-range 4,6 --inpaint-range 12,14  (inpainting)
  sa3 --prompt "ambient pad, evolving" --init-audio intro.wav --seconds 40                 (continuation)
  sa3 --prompt "techno kick" --seconds 8 --loudness -14 --format flac --out kick.flac
  sa3 --prompt "lofi beat" --model stabilityai/stable-audio-3-small-music --lora style.safetensors:0.8
  sa3 --prompt "lofi beat" --model ./stable-audio-3-small-music-base        (base model: 50 steps, cfg 7)
  sa3 convert stabilityai/stable-audio-3-small-music converted/            (-> official MLX files)
  sa3 download all          sa3 doctor          sa3 info output/some_file.wav
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="sa3",
        description="Stable Audio 3 in MLX: text-to-audio, audio-to-audio, inpainting and continuation. "
        "Other commands: sa3 download, sa3 doctor, sa3 info FILE, sa3 convert REPO_OR_PATH OUT_DIR, "
        "sa3 studio, sa3 bench.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sa3-mlx {__version__}")
    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", help='text prompt (asked for when omitted; "" = unconditional)')
    g.add_argument("--negative-prompt", help="what to steer away from (used when --cfg is not 1)")
    g.add_argument("--seconds", type=finite_float, default=30.0,
                   help=f"length in seconds (default 30, at most {MAX_SECONDS:g})")
    g.add_argument("--num-outputs", type=positive_int, default=1, metavar="N",
                   help="N variations in one batched run, seeds s, s+1, ... (default 1)")
    g = p.add_argument_group("model")
    g.add_argument("--dit", choices=list(hub.MODELS), help="generator (a picker asks when omitted)")
    g.add_argument("--model", metavar="REPO_OR_PATH",
                   help="an original PyTorch release instead of --dit: a Hugging Face repo "
                        "(stabilityai/stable-audio-3-{small-music,small-sfx,medium}[-base]) or a local folder "
                        "with model_config.json, model.safetensors and t5gemma-b-b-ul2/")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA/DoRA adapter (upstream .safetensors) merged into the DiT, strength default 1; "
                        "repeatable, stacked in the order given")
    g.add_argument("--decoder", choices=list(hub.CODECS),
                   help="audio codec (default: the DiT's own; asked together with the DiT when --dit is omitted)")
    g.add_argument("--dit-dtype", choices=DTYPES, help="DiT compute dtype (default fp32 on CPU, fp16 on GPU)")
    g.add_argument("--codec-dtype", choices=DTYPES,
                   help="codec compute dtype (default fp32; fp16 for SAME-L on GPU)")
    g.add_argument("--weights-dir", type=Path, help="local folder with the weight files (flat or with MLX/)")
    g.add_argument("--free-models", action=argparse.BooleanOptionalAction, default=True,
                   help="free each model after its last use to lower peak memory (default on)")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=positive_int,
                   help="sampling steps (default: the model's; 8 for the distilled models, which they are "
                        "distilled for, 50 for the -base models)")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES,
                   help="default: the model's (pingpong for the distilled rf_denoiser models, euler for the "
                        "rectified_flow -base models)")
    g.add_argument("--headroom", type=finite_float, default=0.0, metavar="SECONDS",
                   help="sample SECONDS more latents and mask them in the attention, as upstream generate() "
                        "(its default is 6); 0 = off (default)")
    g.add_argument("--seed", type=seed, help="random seed (random and printed when omitted)")
    g.add_argument("--cfg", type=finite_float,
                   help="classifier-free guidance scale >= 0; 1 = off (default: the model's; 1 for the "
                        "distilled models, 7 for the -base models)")
    g.add_argument("--apg", type=finite_float, default=1.0,
                   help="adaptive projected guidance, 0 = vanilla CFG .. 1 = full projection (default 1)")
    g = p.add_argument_group("audio input")
    g.add_argument("--init-audio", type=Path,
                   help="audio file to start from (any format soundfile reads, any sample rate, mono or stereo)")
    g.add_argument("--init-noise-level", type=finite_float,
                   help="starting noise level sigma_max >= 0.01 (default 1.0; 0.9 for audio-to-audio)")
    g.add_argument("--inpaint-range", type=seconds_range, action="append", default=[], metavar="START,END",
                   help="seconds to regenerate, the rest is kept exactly (repeatable; needs --init-audio)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path,
                   help="output file (relative paths go to output/; auto-named from prompt and seed when omitted)")
    g.add_argument("--format", choices=list(FORMATS),
                   help="wav16 (default; flac for a .flac --out), wav24, wav32f (32-bit float) or flac")
    g.add_argument("--loudness", type=finite_float, metavar="LUFS",
                   help=f"normalise to this integrated loudness (ITU-R BS.1770), limiting true peaks to "
                        f"{TRUE_PEAK_CEILING_DB:g} dBTP (off by default)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    g.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    g.add_argument("--play", action="store_true", help="play the result when done")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "untitled"


def resolve_format(fmt: str | None, out: Path | None) -> str:
    """``--format``, or the one ``--out``'s suffix names; a clash between the two is an error."""
    suffix = out.suffix.lower() if out is not None else ""
    if suffix in UNWRITABLE_SUFFIXES:
        raise UsageError(f"--out {out}: sa3 writes WAV or FLAC; end the name in .wav or .flac (see --format)")
    if fmt is None:
        return SUFFIX_FORMATS.get(suffix, "wav16")
    if suffix in SUFFIX_FORMATS and FORMATS[fmt][2] != suffix:
        raise UsageError(f"--out {out} ends in {suffix} but --format {fmt} writes {FORMATS[fmt][2]} files")
    return fmt


def output_paths(args, seeds: list[int]) -> list[Path]:
    suffix = FORMATS[args.format][2]
    if args.out is not None:
        base = args.out if args.out.is_absolute() else Path("output") / args.out
        if base.suffix.lower() not in SUFFIX_FORMATS:
            base = base.with_name(base.name + suffix)
        if len(seeds) == 1:
            paths = [base]
        else:
            paths = [base.with_name(f"{base.stem}_{i + 1}{base.suffix}") for i in range(len(seeds))]
        if not args.overwrite:
            for path in paths:
                if path.exists():
                    raise UsageError(f"{path} already exists (choose another --out, or pass --overwrite)")
        return paths
    paths = []
    for s in seeds:
        stem = f"{_slug(args.prompt)}_{s}"
        path, n = Path("output") / f"{stem}{suffix}", 2
        while path.exists():  # never overwrite an earlier result silently
            path, n = Path("output") / f"{stem}-{n}{suffix}", n + 1
        paths.append(path)
    return paths


def validate(args) -> None:
    """Every check that needs no model: bad values fail before anything is asked or loaded."""
    if not 0 < args.seconds <= MAX_SECONDS:
        raise UsageError(f"--seconds must be in (0, {MAX_SECONDS:g}] (got {args.seconds:g})")
    if args.init_noise_level is not None and args.init_noise_level < 0.01:
        raise UsageError(f"--init-noise-level must be >= 0.01 (got {args.init_noise_level:g}); the model is undefined near 0")
    if args.cfg is not None and args.cfg < 0:
        raise UsageError(f"--cfg must be >= 0 (got {args.cfg:g}); 1 turns guidance off")
    if not args.headroom >= 0:
        raise UsageError(f"--headroom must be >= 0 seconds (got {args.headroom:g})")
    if args.model is not None and (args.dit is not None or args.decoder is not None):
        raise UsageError("--model brings its own DiT and codec; leave out --dit and --decoder")
    from ..lora import parse_spec as parse_lora_spec

    for spec in args.lora:
        path, strength = parse_lora_spec(spec)
        if not path.is_file():
            raise UsageError(f"--lora {spec}: no such file {path}")
        if not math.isfinite(strength):
            raise UsageError(f"--lora {spec}: the strength must be a finite number")
    if not 0 <= args.apg <= 1:
        raise UsageError(f"--apg must be between 0 (vanilla CFG) and 1 (full projection) (got {args.apg:g})")
    if args.inpaint_range and args.init_audio is None:
        raise UsageError("--inpaint-range needs --init-audio (the audio to inpaint into)")
    for start, end in args.inpaint_range:
        if end > args.seconds:
            raise UsageError(f"--inpaint-range {start:g},{end:g} ends after --seconds {args.seconds:g}")
    if args.loudness is not None:
        low, high = LOUDNESS_RANGE
        if not low <= args.loudness < high:
            raise UsageError(f"--loudness must be in [{low:g}, {high:g}) LUFS (got {args.loudness:g}); -14 is typical")
        if args.seconds < MIN_LOUDNESS_SECONDS:
            raise UsageError(f"--loudness needs --seconds >= {MIN_LOUDNESS_SECONDS:g} (BS.1770 measures 0.4 s blocks)")
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir}: no such folder")
    args.format = resolve_format(args.format, args.out)


def resolve_interactive(args) -> None:
    """Ask for what was left out: the model (and then the decoder), the prompt; draw a seed."""
    if args.dit is None and args.model is None:
        args.dit = pick("Choose a model:", list(hub.MODELS), "sm-music")
        if args.decoder is None:
            args.decoder = pick("Choose a decoder:", list(hub.CODECS), hub.MODELS[args.dit].codec)
    if args.prompt is None:
        if sys.stdin.isatty():
            sys.stderr.write("Prompt: ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise UsageError("no --prompt given and nothing to read on stdin (pass --prompt, \"\" for unconditional)")
        args.prompt = line.strip()
    if args.seed is None:
        args.seed = random.randint(0, 2**31 - 1)


def _db(value: float) -> float | None:
    """dB rounded for reports; None for silence (JSON has no -inf)."""
    return round(value, 2) if math.isfinite(value) else None


def finish_output(audio: np.ndarray, args, name: str, display: Display) -> tuple[np.ndarray, dict]:
    """Loudness (when asked) and the level report of one output; warns rather than clip silently."""
    levels: dict = {}
    if args.loudness is not None:
        result = normalize_loudness(audio, args.loudness, SAMPLE_RATE)
        if not math.isfinite(result.input_lufs):
            display.warn(f"{name}: silent, --loudness not applied")
        else:
            audio = result.audio
            if result.limiter_db > 0:
                display.warn(
                    f"{name}: the limiter lowered peaks by up to {result.limiter_db:.1f} dB to stay under "
                    f"{TRUE_PEAK_CEILING_DB:g} dBTP; loudness {result.output_lufs:.1f} LUFS"
                )
        levels["loudness_lufs"] = _db(result.output_lufs)
        levels["true_peak_dbtp"] = _db(result.true_peak_db)
    peak = sample_peak(audio)
    levels["peak_dbfs"] = _db(to_db(peak))
    if peak > 1.0 and FORMATS[args.format][1] != "FLOAT":
        display.warn(f"{name}: peak {to_db(peak):+.1f} dBFS exceeds full scale and is clipped in {args.format} "
                     "(use --format wav32f to keep it, or --loudness to normalise)")
    return audio, levels


def _level_text(levels: dict) -> str:
    def fmt(value, unit):
        return f"{value:.1f} {unit}" if value is not None else f"-inf {unit}"

    text = f"peak {fmt(levels['peak_dbfs'], 'dBFS')}"
    if "loudness_lufs" in levels:
        text = f"{fmt(levels['loudness_lufs'], 'LUFS')}, true peak {fmt(levels['true_peak_dbtp'], 'dBTP')}, " + text
    return text


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    random_seed = args.seed is None
    resolve_interactive(args)

    interactive = sys.stdout.isatty() and not args.json
    display = Display(interactive)
    seeds = [args.seed + i for i in range(args.num_outputs)]
    paths = output_paths(args, seeds)
    for path in paths:
        check_writable(path)  # now, not after a long generation
    init_audio = read_audio(args.init_audio) if args.init_audio is not None else None

    import mlx.core as mx

    from ..pipeline import Pipeline, StageStats

    dtypes = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
    pipe = Pipeline(args.model or args.dit, args.decoder, weights_dir=args.weights_dir,
                    dit_dtype=dtypes.get(args.dit_dtype), codec_dtype=dtypes.get(args.codec_dtype),
                    progress=interactive, loras=args.lora)
    plan = pipe.plan(args.prompt, seconds=args.seconds, init_audio=init_audio, inpaint=args.inpaint_range,
                     init_noise_level=args.init_noise_level, headroom=args.headroom)
    pipe.fetch(encoder=init_audio is not None)  # downloads happen before the clock starts
    # The model's recommendations (distilled: 8 steps, no guidance; base: tens of steps with guidance).
    args.steps = args.steps or pipe.defaults.steps
    args.cfg = pipe.defaults.cfg if args.cfg is None else args.cfg
    args.sampler = args.sampler or pipe.defaults.sampler

    if args.model is None:
        trained_codec = hub.MODELS[args.dit].codec
        if pipe.codec_name != trained_codec:
            display.warn(f"--decoder {pipe.codec_name}: {args.dit} was trained with {trained_codec}; expect degraded audio")
    if args.negative_prompt is not None and args.cfg == 1:
        display.warn("--negative-prompt is ignored while --cfg is 1 (guidance off)")
    for warning in plan.warnings:
        display.warn(warning)
    output_text = args.format + (f", loudness {args.loudness:g} LUFS" if args.loudness is not None else "")
    display.banner(
        f"sa3-mlx {__version__}  {plan.mode}",
        [("prompt", repr(args.prompt))]
        + ([("negative", repr(args.negative_prompt))] if args.negative_prompt is not None else [])
        + [
            ("model", f"{args.model or args.dit}  decoder {pipe.codec_name}  "
                      f"dtypes: DiT {pipe.dtype_name}, codec {pipe.codec_dtype_name}"),
        ]
        + [("lora", f"{Path(f['file']).name} ({f['type']}, rank {f['rank']}) x {f['strength']:g}")
           for f in pipe.loras.describe()]
        + [
            ("length", f"{args.seconds:g} s  ({plan.latents} latents"
                       + (f", {plan.valid_latents} attended, headroom {args.headroom:g} s" if args.headroom else "")
                       + f")   steps {args.steps} ({args.sampler}; model default {pipe.defaults.steps})"
                       + f"   seed {args.seed}"),
            ("guidance", f"cfg {args.cfg:g}" + (f"  apg {args.apg:g}" if args.cfg != 1 else "  (off)")),
            ("noise level", f"{plan.init_noise_level:g}"),
        ]
        + ([("init audio", str(args.init_audio))] if args.init_audio else [])
        + ([("regenerate", ", ".join(f"{a:g}-{b:g} s" for a, b in plan.inpaint))] if plan.inpaint else [])
        + [("output", output_text + (f"   {len(paths)} files" if len(paths) > 1 else ""))],
    )

    started = time.perf_counter()
    pipe.on_stage = display.stage_done

    def on_step(done: int, total: int) -> None:
        if done == 1:
            display.start_sampling(total)
        display.step(done, total)

    try:
        result = pipe.generate(
            args.prompt, negative_prompt=args.negative_prompt, seconds=args.seconds, steps=args.steps,
            seed=args.seed, cfg=args.cfg, apg=args.apg, init_audio=init_audio,
            init_noise_level=args.init_noise_level, inpaint=args.inpaint_range, batch=args.num_outputs,
            on_step=on_step, free_models=args.free_models, headroom=args.headroom, sampler=args.sampler,
        )
    finally:
        display.stop_sampling()

    t0 = time.perf_counter()
    files, levels = [], []
    for i, (path, audio) in enumerate(zip(paths, result.audio)):
        audio, level = finish_output(audio, args, path.name, display)
        # Each file records the single run that reproduces it: item i of a batch is seed + i alone.
        meta = dict(result.settings, seed=seeds[i], batch=1, version=__version__, format=args.format,
                    loudness=args.loudness, init_audio=str(args.init_audio) if args.init_audio else None)
        files.append((path, audio, meta))
        levels.append(level)
    if args.loudness is not None:
        display.stage_done(StageStats("loudness", time.perf_counter() - t0, 0))
    t0 = time.perf_counter()
    saved = write_audio_files(files, SAMPLE_RATE, args.format, overwrite=args.overwrite)
    display.stage_done(StageStats("writing", time.perf_counter() - t0, 0))
    wall = time.perf_counter() - started
    peak_bytes = max((s.peak_bytes for s in result.stages), default=0)
    audio_seconds = args.seconds * len(saved)

    display.memory_table(result.stages)
    display.done(wall, audio_seconds, peak_bytes, args.seed,
                 [(str(p), _level_text(level)) for p, level in zip(saved, levels)])
    if args.json:
        summary = dict(
            outputs=[dict(path=str(p), seed=s, **level) for p, s, level in zip(saved, seeds, levels)],
            settings=result.settings, format=args.format, loudness=args.loudness,
            audio_seconds=audio_seconds, wall_seconds=round(wall, 4),
            realtime_factor=round(audio_seconds / wall, 3) if wall > 0 else None, peak_memory_bytes=peak_bytes,
            stages=[dict(name=s.name, seconds=round(s.seconds, 4), peak_memory_bytes=s.peak_bytes) for s in result.stages],
        )
        print(json.dumps(summary))
    elif not interactive:
        for path in saved:
            print(path)
        if random_seed:  # the banner shows it on a terminal; here stdout stays paths only
            print(f"seed {args.seed}", file=sys.stderr)
    if args.play:
        from .tools import play

        for path in saved:
            play(path, display)
    return 0
