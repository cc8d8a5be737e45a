"""``sa3 [generate]``: text-to-audio, audio-to-audio, inpainting and continuation from the command line.

Parse -> load -> generate -> save. Every generation option comes from the settings table
(:mod:`sa3_mlx.settings`), with its checks; this file adds only what is the command
line's own: where the output goes, the terminal display, asking for what was left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .. import __version__, hub, output
from ..audio import read_audio
from ..settings import FIELDS, SettingsError, cli_name, draw_seed, parse_lora_spec, validate
from .display import Display
from ..arguments import Parser, UsageError, add_setting_options, setting_values
from .picker import pick

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
  sa3 --prompt "lofi beat" --model ./stable-audio-3-small-music-base --sampler dpmpp --steps 30 \
      --cfg-rescale 0.7 --cfg-interval 0,0.9 --shift flux:alpha_min=3,alpha_max=3
  sa3 --prompt "lofi house, (warm rhodes:1.5), (vinyl crackle:0.4)" --out lofi.mp3   (weights, MP3)
  sa3 --prompts-file prompts.jsonl --dit sm-sfx --seconds 4 --out sfx/      (a list, resumable)
  sa3 --prompt "lofi beat" --model ./stable-audio-3-small-music --lora style.safetensors:0.8@0.4-1
  sa3 encode-audio loop.flac --out loop.npy     sa3 decode-latents loop.npy --out back.wav
  sa3 convert stabilityai/stable-audio-3-small-music converted/            (-> official MLX files)
  sa3 download all          sa3 doctor          sa3 info output/some_file.wav
"""

GROUPS = ("what to generate", "model", "sampling", "audio input", "output")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="sa3",
        description="Stable Audio 3 in MLX: text-to-audio, audio-to-audio, inpainting and continuation. "
        "Other commands: sa3 download, sa3 doctor, sa3 info FILE, sa3 convert REPO_OR_PATH OUT_DIR, "
        "sa3 encode-audio IN --out LATENTS.npy, sa3 decode-latents LATENTS.npy --out OUT.wav, sa3 encode FOLDER, sa3 train FOLDER (LoRA training), sa3 batch FILE (many clips, resumable; Ray clusters), sa3 studio, sa3 bench.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sa3-mlx {__version__}")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    add_setting_options(groups.__getitem__)
    groups["what to generate"].add_argument(
        "--prompts-file", type=Path, metavar="FILE",
        help="generate a list in one process, models loaded once: one prompt a line, or JSONL with any settings "
             "per item (their API names, plus an optional id); the other flags are every item's defaults. "
             "Outputs go to the --out folder (default output/) as ID.ext, with manifest.jsonl; items whose "
             "outputs exist are skipped")
    g = groups["model"]
    g.add_argument("--weights-dir", type=Path, help="local folder with the weight files (flat or with MLX/)")
    g = groups["output"]
    g.add_argument("--out", type=Path,
                   help="output file (relative paths go to output/; auto-named from prompt and seed when omitted)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    g.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    g.add_argument("--play", action="store_true", help="play the result when done")
    return p


def parse_settings(args: argparse.Namespace, prompt_placeholder: str | None = None):
    """The checked settings of parsed arguments; a bad value is a :class:`UsageError` naming its flag."""
    try:
        values = setting_values(args)
        if values.get("prompt") is None and prompt_placeholder is not None:
            values["prompt"] = prompt_placeholder
        return validate(values)
    except SettingsError as e:
        raise UsageError(e.message(cli_name)) from None


def check_paths(args) -> None:
    """Every check of the command line's own arguments that needs no model."""
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir}: no such folder")
    for spec in args.loras or []:
        path, _ = parse_lora_spec(spec)
        head, sep, tail = spec.rpartition(":")
        if path == spec and sep and Path(head).is_file():  # FILE:<not a number>
            raise UsageError(f"--lora {spec}: the strength after the colon must be a number (got {tail!r})")
        if Path(path).is_dir():
            raise UsageError(f"--lora {spec}: {path} is a folder; give the adapter's .safetensors file")
        if not Path(path).is_file():
            raise UsageError(f"--lora {spec}: no such file {path}")


def ask_prompt() -> str:
    if sys.stdin.isatty():
        sys.stderr.write("Prompt: ")
        sys.stderr.flush()
    try:
        line = sys.stdin.readline()
    except UnicodeDecodeError:
        raise UsageError("the prompt read from stdin is not valid UTF-8 text") from None
    if not line:
        raise UsageError("no --prompt given and nothing to read on stdin (pass --prompt, \"\" for unconditional)")
    return line.strip()


def resolve_interactive(args) -> None:
    """Ask for what was left out: the model (and then the decoder), the prompt."""
    if args.model is None and args.release is None:
        args.model = pick("Choose a model:", list(hub.MODELS), "sm-music")
        if args.decoder is None:
            args.decoder = pick("Choose a decoder:", list(hub.CODECS), hub.MODELS[args.model].codec)
    if args.prompt is None:
        args.prompt = ask_prompt()


def _level_text(levels: dict) -> str:
    def fmt(value, unit):
        return f"{value:.1f} {unit}" if value is not None else f"-inf {unit}"

    text = f"peak {fmt(levels['peak_dbfs'], 'dBFS')}"
    if "loudness_lufs" in levels:
        text = f"{fmt(levels['loudness_lufs'], 'LUFS')}, true peak {fmt(levels['true_peak_dbtp'], 'dBTP')}, " + text
    return text


def _guidance_text(s) -> str:
    if s.cfg == 1:
        return "cfg 1  (off)"
    parts = [f"cfg {s.cfg:g}", f"apg {s.apg:g}"]
    if s.cfg_rescale:
        parts.append(f"rescale {s.cfg_rescale:g}")
    if s.cfg_norm_threshold:
        parts.append(f"norm threshold {s.cfg_norm_threshold:g}")
    if tuple(s.cfg_interval) != (0.0, 1.0):
        parts.append(f"at sigma {s.cfg_interval[0]:g}..{s.cfg_interval[1]:g}")
    return "  ".join(parts)


def _levels_text(sigmas, head: int = 4, tail: int = 2) -> str:
    """The noise levels, the middle left out when there are many."""
    shown = [f"{v:.3g}" for v in sigmas]
    if len(shown) > head + tail + 1:
        shown = shown[:head] + ["..."] + shown[-tail:]
    return " ".join(shown)


def _banner_rows(s, pipe, plan, paths) -> list[tuple[str, str]]:
    d = pipe.defaults
    rows = [("prompt", repr(s.prompt))]
    if s.negative_prompt is not None:
        rows.append(("negative", repr(s.negative_prompt)))
    rows.append(("model", f"{pipe.model_name}  decoder {pipe.codec_name}  "
                          f"dtypes: DiT {pipe.dtype_name}, codec {pipe.codec_dtype_name}"
                          + (f"  DiT blocks quantized {pipe.quantize}" if pipe.quantize else "")))
    rows += [("lora", f"{Path(f['file']).name} ({f['type']}, rank {f['rank']}) x {f['strength']:g}"
                      + (f"  at sigma {f['active'][0]:g}..{f['active'][1]:g}" if f["active"] else "")
                      + (f"  conditioner x {f['cond_strength']:g}" if f["cond_strength"] is not None else "")
                      + (f"  skipping {'|'.join(f['skip'])}" if f["skip"] else ""))
             for f in pipe.loras.describe()]
    rows += [
        ("length", f"{s.seconds:g} s  ({plan.latents} latents"
                   + (f", {plan.valid_latents} attended, headroom {s.headroom:g} s" if s.headroom else "")
                   + f")   steps {s.steps} ({s.sampler}; model default {d.steps})   seed {s.seed}"),
        ("guidance", _guidance_text(s)),
        ("schedule", f"{plan.shift_description}   sigmas {_levels_text(plan.sigmas)}"),
        ("noise level", f"{plan.init_noise_level:g}"),
    ]
    if s.init_audio:
        rows.append(("init audio", s.init_audio))
    if plan.inpaint:
        rows.append(("regenerate", ", ".join(f"{a:g}-{b:g} s" for a, b in plan.inpaint)))
    text = s.format + (f", loudness {s.loudness:g} LUFS" if s.loudness is not None else "")
    rows.append(("output", text + (f"   {len(paths)} files" if len(paths) > 1 else "")))
    return rows


def run_prompts_file(args) -> int:
    """``--prompts-file``: every item checked first, then generated (:mod:`sa3_mlx.batch`), a line per item."""
    from ..batch import load_items, run_items

    if args.prompt is not None:
        raise UsageError("--prompts-file gives the prompts; leave out --prompt")
    if args.play:
        raise UsageError("--play plays one result; it does not go with --prompts-file")
    check_paths(args)
    try:
        defaults = setting_values(args)
        validate({**defaults, "prompt": ""})
    except SettingsError as e:
        raise UsageError(e.message(cli_name)) from None
    folder = output.DEFAULT_FOLDER if args.out is None else args.out
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: with --prompts-file, --out is the folder the outputs go to")
    items = load_items(args.prompts_file, defaults)

    from ..pipeline import Pipeline
    from ..runtime import configure_process

    configure_process()
    interactive = sys.stderr.isatty()

    def make_pipeline(settings):
        return Pipeline.from_settings(settings, weights_dir=args.weights_dir, progress=interactive)

    display = Display(False)
    for k, result in enumerate(run_items(items, folder, make_pipeline, args.overwrite), start=1):
        head = f"[{k}/{len(items)}] {result.item.id}"
        if args.json:
            print(json.dumps(dict(id=result.item.id, line=result.item.line, skipped=result.skipped,
                                  paths=[str(p) for p in result.paths], outputs=result.outputs,
                                  wall_seconds=round(result.wall_seconds, 4))), flush=True)
        elif result.skipped:
            print(f"{head}  skipped, exists: {', '.join(str(p) for p in result.paths)}", flush=True)
        else:
            outs = "  ".join(f"{o['path']} (seed {o['seed']}, {_level_text(o)})" for o in result.outputs)
            print(f"{head}  {outs}  {result.wall_seconds:.2f} s", flush=True)
        for warning in result.warnings:
            display.warn(f"{result.item.id}: {warning}")
    return 0


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.prompts_file is not None:
        return run_prompts_file(args)
    parse_settings(args, prompt_placeholder="")  # every bad value fails before anything is asked
    check_paths(args)
    resolve_interactive(args)
    settings = parse_settings(args)
    random_seed = settings.seed is None
    try:
        fmt = output.resolve_format(settings.format, args.out)
    except output.OutputError as e:
        raise UsageError(str(e)) from None
    settings = settings.replace(seed=draw_seed() if random_seed else settings.seed, format=fmt)

    interactive = sys.stdout.isatty() and not args.json
    display = Display(interactive)
    seeds = [settings.variation_seed(i) for i in range(settings.num_outputs)]
    paths = output.output_paths(fmt, seeds, settings.prompt, args.out, args.overwrite)
    output.check_paths(paths)  # now, not after a long generation
    init_audio = read_audio(settings.init_audio) if settings.init_audio is not None else None

    from ..pipeline import Finished, Pipeline, StageEnded, StageStats, Step
    from ..runtime import configure_process

    configure_process()
    pipe = Pipeline.from_settings(settings, weights_dir=args.weights_dir, progress=interactive)
    plan = pipe.plan(settings, init_audio)
    pipe.fetch(encoder=init_audio is not None)  # downloads happen before the clock starts
    resolved = pipe.resolve(settings)
    for warning in plan.warnings:
        display.warn(warning)
    display.banner(f"sa3-mlx {__version__}  {plan.mode}", _banner_rows(resolved, pipe, plan, paths))

    started = time.perf_counter()
    result = None
    try:
        for event in pipe.run(settings, init_audio):
            if isinstance(event, Step):
                if event.done == 1:
                    display.start_sampling(event.total)
                display.step(event.done, event.total)
            elif isinstance(event, StageEnded):
                display.stage_done(event.stats)
            elif isinstance(event, Finished):
                result = event.result
    finally:
        display.stop_sampling()

    written = output.write(result, paths, fmt, settings.loudness, args.overwrite)
    for warning in written.warnings:
        display.warn(warning)
    if settings.loudness is not None:
        display.stage_done(StageStats("loudness", written.loudness_seconds, 0))
    display.stage_done(StageStats("writing", written.write_seconds, 0))
    wall = time.perf_counter() - started
    peak_bytes = max((s.peak_bytes for s in result.stages), default=0)
    audio_seconds = settings.seconds * len(written.outputs)

    display.memory_table(result.stages)
    display.done(wall, audio_seconds, peak_bytes, resolved.seed,
                 [(str(o.path), _level_text(o.levels)) for o in written.outputs])
    if args.json:
        summary = dict(
            outputs=[dict(path=str(o.path), seed=o.seed, **o.levels) for o in written.outputs],
            settings=output.metadata(result, 0, fmt) | {"seed": resolved.seed, "num_outputs": settings.num_outputs},
            format=fmt, loudness=settings.loudness,
            audio_seconds=audio_seconds, wall_seconds=round(wall, 4),
            realtime_factor=round(audio_seconds / wall, 3) if wall > 0 else None, peak_memory_bytes=peak_bytes,
            stages=[dict(name=s.name, seconds=round(s.seconds, 4), peak_memory_bytes=s.peak_bytes) for s in result.stages],
        )
        print(json.dumps(summary))
    elif not interactive:
        for o in written.outputs:
            print(o.path)
        if random_seed:  # the banner shows it on a terminal; here stdout stays paths only
            print(f"seed {resolved.seed}", file=sys.stderr)
    if args.play:
        from .tools import play

        for o in written.outputs:
            play(o.path, display)
    return 0


__all__ = ["build_parser", "run", "FIELDS"]
