"""``sa3 [generate]``: text-to-audio, audio-to-audio and inpainting from the command line."""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

from .. import __version__, hub
from ..audio import FORMATS, SAMPLE_RATE, read_audio, write_audio
from .display import Display
from .picker import pick

MAX_SECONDS = 384.0  # the seconds conditioner's range; beyond it the duration embedding saturates
DTYPES = ("fp32", "fp16", "bf16")

EXAMPLES = """\
examples:
  sa3 --prompt "lofi house loop 120 BPM" --seconds 10
  sa3 --prompt "glass shattering on stone" --dit sm-sfx --seconds 4 --num-outputs 4
  sa3 --prompt "epic orchestral buildup" --dit medium --seconds 60 --cfg 3 --negative-prompt "vocals"
  sa3 --prompt "jazz trio, brushed drums" --init-audio in.wav --init-noise-level 0.7
  sa3 --prompt "drum fill" --init-audio loop.wav --inpaint-range 4,6 --inpaint-range 12,14
  sa3 --prompt "ambient pad continues" --init-audio intro.wav --seconds 40   (continuation)
  sa3 download all          sa3 doctor          sa3 info output/some_file.wav
"""


class UsageError(Exception):
    """A bad flag value: reported as one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected START,END in seconds (e.g. 4,7.5), got {text!r}")
    start, end = (_finite_float(p.strip()) for p in parts)
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"needs 0 <= START < END (got {text!r})")
    return start, end


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sa3",
        description="Stable Audio 3 in MLX: text-to-audio, audio-to-audio and inpainting.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", help='text prompt (asked for when omitted; "" = unconditional)')
    g.add_argument("--negative-prompt", help="what to steer away from (used when --cfg is not 1)")
    g.add_argument("--seconds", type=_finite_float, default=30.0, help="length in seconds (default 30, max 384)")
    g.add_argument("--num-outputs", type=_positive_int, default=1, metavar="N",
                   help="N variations in one batched run, seeds s, s+1, ... (default 1)")
    g = p.add_argument_group("model")
    g.add_argument("--dit", choices=list(hub.MODELS), help="generator (picker when omitted)")
    g.add_argument("--decoder", choices=list(hub.CODECS), help="audio codec (default: the DiT's own)")
    g.add_argument("--dit-dtype", choices=DTYPES, help="DiT compute dtype (default fp32 on CPU, fp16 on GPU)")
    g.add_argument("--weights-dir", type=Path, help="local folder with the weight files (flat or with MLX/)")
    g.add_argument("--free-models", action=argparse.BooleanOptionalAction, default=True,
                   help="free each model after its last use to lower peak memory (default on)")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=_positive_int, default=8, help="sampling steps (default 8, what the models are distilled for)")
    g.add_argument("--seed", type=int, help="random seed (random and printed when omitted)")
    g.add_argument("--cfg", type=_finite_float, default=1.0, help="classifier-free guidance scale; 1 = off (default)")
    g.add_argument("--apg", type=_finite_float, default=1.0,
                   help="adaptive projected guidance, 0 = vanilla CFG .. 1 = full projection (default 1)")
    g = p.add_argument_group("audio input")
    g.add_argument("--init-audio", type=Path, help="audio file to start from (any format soundfile reads)")
    g.add_argument("--init-noise-level", type=_finite_float,
                   help="starting noise level sigma_max >= 0.01 (default 1.0; 0.9 for audio-to-audio)")
    g.add_argument("--inpaint-range", type=_range, action="append", default=[], metavar="START,END",
                   help="seconds to regenerate, the rest is kept exactly (repeatable; needs --init-audio)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="output file (relative paths go to output/; auto-named when omitted)")
    g.add_argument("--format", choices=list(FORMATS), default="wav16", help="wav16 (default), wav24, wav32f or flac")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    g.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    g.add_argument("--play", action="store_true", help="play the result when done")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "untitled"


def output_paths(args, seeds: list[int]) -> list[Path]:
    suffix = FORMATS[args.format][2]
    if args.out is not None:
        base = args.out if args.out.is_absolute() else Path("output") / args.out
        if base.suffix.lower() not in (".wav", ".flac"):
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
    for seed in seeds:
        stem = f"{_slug(args.prompt)}_{seed}"
        path, n = Path("output") / f"{stem}{suffix}", 2
        while path.exists():  # never overwrite an earlier result silently
            path, n = Path("output") / f"{stem}-{n}{suffix}", n + 1
        paths.append(path)
    return paths


def validate(args) -> None:
    if not 0 < args.seconds <= MAX_SECONDS:
        raise UsageError(f"--seconds must be in (0, {MAX_SECONDS:g}] (got {args.seconds:g})")
    if args.init_noise_level is not None and args.init_noise_level < 0.01:
        raise UsageError(f"--init-noise-level must be >= 0.01 (got {args.init_noise_level:g}); the model is undefined near 0")
    if args.inpaint_range and args.init_audio is None:
        raise UsageError("--inpaint-range needs --init-audio (the audio to inpaint into)")
    for start, end in args.inpaint_range:
        if end > args.seconds:
            raise UsageError(f"--inpaint-range {start:g},{end:g} ends after --seconds {args.seconds:g}")
    if args.decoder and args.dit and args.decoder != hub.MODELS[args.dit].codec:
        raise UsageError(
            f"--decoder {args.decoder} does not match --dit {args.dit} (trained with {hub.MODELS[args.dit].codec})"
        )


def resolve_interactive(args) -> None:
    if args.dit is None:
        args.dit = pick("Choose a model:", list(hub.MODELS), "sm-music")
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


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    resolve_interactive(args)
    validate(args)

    import mlx.core as mx

    from ..pipeline import Pipeline

    interactive = sys.stdout.isatty() and not args.json
    display = Display(interactive)
    dtype = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}.get(args.dit_dtype)
    pipe = Pipeline(args.dit, args.decoder, weights_dir=args.weights_dir, dit_dtype=dtype, progress=interactive)

    init_audio = None
    if args.init_audio is not None:
        init_audio = read_audio(args.init_audio)
    seeds = [args.seed + i for i in range(args.num_outputs)]
    paths = output_paths(args, seeds)

    pipe.fetch(encoder=init_audio is not None)  # downloads happen before the clock starts
    plan = pipe.plan(args.prompt, seconds=args.seconds, init_audio=init_audio, inpaint=args.inpaint_range,
                     init_noise_level=args.init_noise_level)
    for warning in plan.warnings:
        display.warn(warning)
    display.banner(
        f"sa3-mlx {__version__}  {plan.mode}",
        [("prompt", repr(args.prompt))]
        + ([("negative", repr(args.negative_prompt))] if args.negative_prompt is not None else [])
        + [
            ("model", f"{args.dit}  decoder {pipe.codec_name}  dit dtype {pipe.dtype_name}"),
            ("length", f"{args.seconds:g} s  ({plan.latents} latents)   steps {args.steps}   seed {args.seed}"),
            ("guidance", f"cfg {args.cfg:g}" + (f"  apg {args.apg:g}" if args.cfg != 1 else "  (off)")),
            ("noise level", f"{plan.init_noise_level:g}"),
        ]
        + ([("init audio", str(args.init_audio))] if args.init_audio else [])
        + ([("regenerate", ", ".join(f"{a:g}-{b:g} s" for a, b in plan.inpaint))] if plan.inpaint else [])
        + ([("outputs", f"{len(paths)}")] if len(paths) > 1 else []),
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
            on_step=on_step, free_models=args.free_models,
        )
    finally:
        display.stop_sampling()

    saved = []
    for i, (path, audio) in enumerate(zip(paths, result.audio)):
        meta = dict(result.settings, seed=seeds[i], batch=1, version=__version__,
                    init_audio=str(args.init_audio) if args.init_audio else None)
        peak = float(abs(audio).max())
        if peak > 1.0 and args.format != "wav32f":
            display.warn(f"{path.name}: peak {peak:.2f} exceeds full scale and is clipped in {args.format} "
                         "(use --format wav32f to keep it)")
        saved.append(write_audio(path, audio, SAMPLE_RATE, args.format, meta, overwrite=args.overwrite))
    wall = time.perf_counter() - started
    peak_bytes = max((s.peak_bytes for s in result.stages), default=0)

    display.memory_table(result.stages)
    display.done(wall, args.seconds * len(saved), peak_bytes, args.seed, [str(p) for p in saved])
    if args.json:
        summary = dict(
            outputs=[str(p) for p in saved], seeds=seeds, settings=result.settings, wall_seconds=round(wall, 4),
            peak_memory_bytes=peak_bytes,
            stages=[dict(name=s.name, seconds=round(s.seconds, 4), peak_memory_bytes=s.peak_bytes) for s in result.stages],
        )
        print(json.dumps(summary))
    elif not interactive:
        for path in saved:
            print(path)
    if args.play:
        from .tools import play

        for path in saved:
            play(path, display)
    return 0
