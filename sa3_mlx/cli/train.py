"""``sa3 encode`` and ``sa3 train``: argument parsing and the terminal display; the work is
:mod:`sa3_mlx.training`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..arguments import Parser, UsageError, finite_float, positive_int, whole_number

ENCODE_EXAMPLE = """example:
  sa3 encode my_songs/ --model stabilityai/stable-audio-3-small-music-base
"""
TRAIN_EXAMPLE = """examples:
  sa3 train my_songs/ --model stabilityai/stable-audio-3-small-music-base --adapter dora-rows --rank 16 \\
      --steps 2000 --out loras/my_style
  sa3 train my_songs/ --model stabilityai/stable-audio-3-small-music-base --resume loras/my_style --steps 4000
  sa3 --model stabilityai/stable-audio-3-small-music-base --lora loras/my_style/my_style-step=2000.safetensors \\
      --prompt "..."
"""


def _fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in 0..1 (got {value})")
    return value


def _non_negative(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _positive(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {value})")
    return value


_count = whole_number(0)


def _probs(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.1,0.8,0.1, got {text!r}") from None
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError("expected three non-negative numbers (random segments, full, causal)")
    return values


class _Console:
    def __init__(self, quiet: bool):
        from rich.console import Console

        self.enabled = sys.stderr.isatty() and not quiet
        self.console = Console(stderr=True, highlight=False)

    def warn(self, text: str) -> None:
        from rich.markup import escape

        if self.enabled:
            self.console.print(f"  [yellow]warning:[/yellow] {escape(text)}")
        else:
            print(f"warning: {text}", file=sys.stderr)

    def line(self, text: str) -> None:
        from rich.markup import escape

        if self.enabled:
            self.console.print(escape(text))
        else:
            print(text, file=sys.stderr)


def _encode_progress(console: _Console):
    if not console.enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("  [cyan]encoding[/cyan]"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                        TimeRemainingColumn(), TextColumn("{task.description}"), console=console.console,
                        transient=True)
    task = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("", total=total)
        progress.update(task, completed=done, description=name[:40])
        if done >= total:
            progress.stop()

    return update, progress


def encode(argv: list[str]) -> int:
    """``sa3 encode FOLDER --model REPO_OR_PATH [--cache DIR]``."""
    from .. import upstream
    from ..runtime import configure_process
    from ..training.data import cache_dir, encode_folder

    p = Parser(prog="sa3 encode", description="Encode a folder of audio (recursively) into latents with the "
               "model's own encoder, cached by file content, with captions from sidecars, tags or file names.",
               epilog=ENCODE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="folder of audio files (any rate, mono or stereo; searched recursively)")
    p.add_argument("--model", required=True, metavar="REPO_OR_PATH", help="the original release to encode for")
    p.add_argument("--cache", type=Path, metavar="DIR", help="where latents are kept (default FOLDER/.sa3-cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the encoded items as JSON")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        raise UsageError(f"{args.folder}: not a folder")
    configure_process()  # as every entry point (memory reuse, the CUDA kernel cache)
    console = _Console(args.quiet)
    model = upstream.load(args.model, progress=console.enabled)
    update, _ = _encode_progress(console)
    start = time.perf_counter()
    items = encode_folder(args.folder, model, args.cache, warn=console.warn, progress=update)
    where = cache_dir(args.folder, model, args.cache)
    if args.json:
        print(json.dumps({"cache": str(where), "items": [
            {"path": i.path, "latents": i.latents_file, "length": i.length, "valid": i.valid, "seconds": i.seconds,
             "caption": i.caption.to_json()} for i in items]}, indent=1))
    else:
        console.line(f"{len(items)} file(s) encoded in {time.perf_counter() - start:.1f} s; latents in {where}")
    return 0


def build_train_parser() -> Parser:
    from ..training import objective
    from ..training.adapters import ADAPTER_TYPES
    from ..training.run import PRECISIONS

    p = Parser(prog="sa3 train", description="Train a LoRA on a folder of audio (upstream's adapters, file format "
               "and training step). Ctrl-C saves a checkpoint; --resume continues exactly.",
               epilog=TRAIN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="folder of audio files (encoded first when latents are missing)")
    p.add_argument("--model", required=True, metavar="REPO_OR_PATH", help="the original release to train on "
                   "(the -base models are what upstream trains)")
    g = p.add_argument_group("adapter")
    g.add_argument("--adapter", default="dora-rows", choices=ADAPTER_TYPES, help="adapter type (default dora-rows)")
    g.add_argument("--rank", type=positive_int, default=16, help="rank (default 16)")
    g.add_argument("--alpha", type=_positive, help="alpha (default = rank); the update is scaled by alpha / rank")
    g.add_argument("--include", action="append", metavar="PATTERN", help="train only modules whose name contains "
                   "PATTERN (repeatable; [i-j] expands to numbers: 'transformer.layers.[0-11].')")
    g.add_argument("--exclude", action="append", metavar="PATTERN", help="leave out modules whose name contains "
                   "PATTERN (repeatable; wins over --include)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=2000, help="total optimizer steps (default 2000)")
    g.add_argument("--lr", type=_positive, default=1e-4, help="learning rate (default 1e-4)")
    g.add_argument("--batch-size", type=positive_int, default=1, help="items per step (default 1)")
    g.add_argument("--weight-decay", type=_non_negative, default=0.01, help="AdamW decoupled weight decay (0.01)")
    g.add_argument("--warmup", type=_count, default=0, metavar="STEPS", help="linear learning-rate warm-up steps")
    g.add_argument("--clip", type=_positive, metavar="NORM", help="clip gradients to this global norm (default off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial adapter and every random draw")
    g = p.add_argument_group("objective")
    g.add_argument("--crop", type=positive_int, metavar="LATENTS",
                   help="crop length in latents (default the model's training length; 1 latent = 4096 samples)")
    g.add_argument("--timestep-sampler", default="uniform", choices=objective.TIMESTEP_SAMPLERS,
                   help="training timestep distribution before the model's shift (default uniform)")
    g.add_argument("--cfg-dropout", type=_fraction, default=0.1, help="probability of dropping the prompt (0.1)")
    g.add_argument("--inpaint-probs", type=_probs, default=list(objective.INPAINT_PROBS), metavar="R,F,C",
                   help="probabilities of random-segment / full / causal inpaint masks (default 0.1,0.8,0.1)")
    g.add_argument("--mask-loss-weight", type=_non_negative, default=1.0,
                   help="weight of the loss on the provided (context) region (default 1)")
    g.add_argument("--silence-extension", type=_non_negative, default=4.0, metavar="SECONDS",
                   help="mean of the random extension of the valid length into the silent tail (default 4; 0 = off)")
    g.add_argument("--no-ot-coupling", action="store_true", help="pair noise and latents at random, not by OT")
    g.add_argument("--trigger", metavar="WORD", help="a trigger word put before every caption")
    g.add_argument("--trigger-prob", type=_fraction, default=1.0, help="probability of the trigger word (1)")
    g.add_argument("--tag-keep", type=_fraction, default=1.0, help="tag captions: keep each piece with this "
                   "probability, a random subset per step (1 = all, in a random order)")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, metavar="RUN_DIR", help="run folder (default loras/<folder name>)")
    g.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where its "
                   "last checkpoint left it (its saved settings are used; --steps may be raised)")
    g.add_argument("--save-every", type=_count, default=500, metavar="N", help="checkpoint every N steps (500; 0 = "
                   "only at the end)")
    g.add_argument("--plot-every", type=_count, default=100, metavar="N", help="write loss plots every N steps "
                   "(100; 0 = never)")
    g.add_argument("--demo-every", type=_count, default=0, metavar="N", help="generate the --demo-prompts with the "
                   "current LoRA every N steps and at the end, into RUN_DIR/demos/step=N/ (0 = never)")
    g.add_argument("--demo-prompts", metavar="FILE_OR_TEXT", help="a text file with one prompt per line, or "
                   "prompts separated by '|'")
    g.add_argument("--demo-seconds", type=_positive, default=10.0, help="length of each demo clip (10)")
    g.add_argument("--base-precision", default="fp32", choices=tuple(PRECISIONS),
                   help="precision of the frozen base weights (LoRA tensors are always fp32)")
    g.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the DiT blocks: "
                   "recompute activations in the backward pass (less memory, about one more forward pass of time)")
    g.add_argument("--fused", action="store_true", help="GPUs: each DiT block as one compiled function with "
                   "the backward pass written out block by block (less memory, like --checkpointing; with CUDA graphs on it "
                   "was faster for the small model's lora; its first use on a machine compiles kernels for minutes)")
    g.add_argument("--compiled-step", choices=("auto", "on", "off"), default="auto",
                   help="the forward and backward pass as one compiled graph (fused element-wise kernels): auto = on "
                        "GPUs (faster there: the step is bound by launching its operations), off on the CPU; the first "
                        "step traces it, and its first use on a machine compiles kernels for minutes (cached)")
    g.add_argument("--merged-weights", choices=("auto", "on", "off"), default="auto",
                   help="form each module kind's adapted weights once per step (one batched product) instead of "
                        "the factored products in every layer: auto = on on GPUs without --checkpointing (fewer "
                        "operations; more memory: the adapted weights and their gradients), off on the CPU")
    g.add_argument("--cache", type=Path, metavar="DIR", help="latent cache (default FOLDER/.sa3-cache)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    return p


def train(argv: list[str]) -> int:
    """``sa3 train FOLDER --model ... [flags]``."""
    from ..runtime import configure_process
    from ..training.run import TrainConfig
    from ..training.run import train as run_training

    args = build_train_parser().parse_args(argv)
    if not args.folder.is_dir():
        raise UsageError(f"{args.folder}: not a folder")
    if args.resume is not None and args.out is not None and args.out.resolve() != args.resume.resolve():
        raise UsageError("--resume RUN_DIR continues that folder; leave out --out (or give the same folder)")
    prompts = None
    if args.demo_prompts:
        source = Path(args.demo_prompts)
        text = source.read_text(encoding="utf-8") if source.is_file() else args.demo_prompts.replace("|", "\n")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError("--demo-prompts: no prompts given")
    config = TrainConfig(
        demo_every=args.demo_every, demo_prompts=prompts, demo_seconds=args.demo_seconds,
        data=str(args.folder), model=args.model,
        out=str(args.resume or args.out) if (args.resume or args.out) else None,
        adapter=args.adapter, rank=args.rank, alpha=args.alpha, include=args.include, exclude=args.exclude,
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed, save_every=args.save_every,
        crop=args.crop, timestep_sampler=args.timestep_sampler, cfg_dropout=args.cfg_dropout,
        mask_loss_weight=args.mask_loss_weight, inpaint_probs=args.inpaint_probs,
        silence_extension=args.silence_extension, ot_coupling=not args.no_ot_coupling,
        weight_decay=args.weight_decay, warmup_steps=args.warmup, clip_norm=args.clip,
        base_precision=args.base_precision, checkpointing=args.checkpointing, fused=args.fused,
        compiled_step={"auto": None, "on": True, "off": False}[args.compiled_step], trigger=args.trigger,
        merged_weights={"auto": None, "on": True, "off": False}[args.merged_weights],
        trigger_prob=args.trigger_prob, tag_keep=args.tag_keep,
        cache=str(args.cache) if args.cache else None, plot_every=args.plot_every)
    configure_process(training=True)
    console = _Console(args.quiet)
    update, _ = _encode_progress(console)
    bar = _TrainBar(console)
    try:
        result = run_training(config, resume=args.resume is not None, warn=console.warn, on_step=bar.step,
                              on_start=bar.start, encode_progress=update)
    except KeyboardInterrupt:
        bar.stop()
        last = getattr(run_training, "last_result", None)
        if last is not None and last.lora is not None:
            console.line(f"saved {last.lora} at step {last.steps}; continue with --resume {last.run_dir}")
        raise
    bar.stop()
    from .display import fmt_bytes

    summary = {"run_dir": str(result.run_dir), "lora": str(result.lora), "steps": result.steps,
               "seconds": round(result.seconds, 3), "it_per_s": round(result.it_per_s, 3),
               "peak_memory": result.peak_memory, "files": result.files, "trainable_parameters": result.trainable,
               "final_loss": result.log[-1]["loss"] if result.log else None}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        console.line(f"{result.steps} steps ({len(result.log)} this run) in {result.seconds:.1f} s, "
                     f"{result.it_per_s:.2f} it/s, peak memory {fmt_bytes(result.peak_memory)}, {result.files} file(s), "
                     f"{result.trainable:,} trainable parameters")
        print(result.lora)
    return 0


class _TrainBar:
    """The live bar: step, smoothed loss, it/s, ETA, memory."""

    def __init__(self, console: _Console):
        self.console = console
        self.progress = None
        self.task = None
        self.avg, self.n = 0.0, 0

    def start(self, trainer) -> None:
        c = self.console
        c.line(f"training {trainer.lora.config.adapter_type} r{trainer.lora.config.rank} on {len(trainer.items)} "
               f"file(s): {len(trainer.lora.targets)} modules, {trainer.lora.trainable_count():,} parameters, crop "
               f"{trainer.crop} latents -> {trainer.run_dir}")
        if trainer.step_fn.compiled or trainer.step_fn.fused:
            from ..runtime import KERNEL_CACHE, on_cuda

            c.line("  the first step traces the compiled step" + (
                   "; a machine's first run also builds its GPU kernels, which takes minutes (they are kept in "
                   f"{os.environ.get('MLX_PTX_CACHE_DIR', KERNEL_CACHE)})" if on_cuda() else ""))
        if not c.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("  [cyan]training[/cyan]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[mem]}"), console=c.console)
        self.progress.start()
        self.task = self.progress.add_task("", total=trainer.config.steps, completed=trainer.step, loss="-",
                                           rate="-", mem="")
        self._t0, self._s0 = time.perf_counter(), trainer.step

    def step(self, record) -> None:
        self.n += 1
        self.avg = 0.98 * self.avg + 0.02 * record.loss
        smoothed = self.avg / (1 - 0.98 ** self.n)
        if self.progress is None:
            return
        import mlx.core as mx

        from .display import fmt_bytes

        rate = (record.step - self._s0) / max(time.perf_counter() - self._t0, 1e-9)
        self.progress.update(self.task, completed=record.step, loss=f"{smoothed:.4f}", rate=f"{rate:.2f}",
                             mem=fmt_bytes(mx.get_active_memory()))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
