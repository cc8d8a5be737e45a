"""``sa3 bench``: speed and memory of every model at the official runner's clip lengths.

Each cell (model x seconds) runs in its own process so its peak memory is its own;
weights are loaded before the clock starts. ``--random-weights`` builds the released
models' full-size architectures with random values in memory (speed does not
depend on the values), so the benchmark needs no download.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .settings import DTYPES

DEFAULT_SECONDS = (5, 30, 120, 380)
LONG_ONLY_FOR = "medium"  # the official matrix runs 380 s for the medium model only


QUANTIZE_WORDS = ("16", "8", "4")  # --quantize: 16 = the stored half-precision weights, unquantized


def random_pipeline(model: str, dit_dtype=None, codec_dtype=None, quantize=None):
    """A Pipeline of the released architecture with random weights, nothing read from disk."""
    from .pipeline import Pipeline
    from .sources.modules import random_source

    return Pipeline(source=random_source(model), dit_dtype=dit_dtype, codec_dtype=codec_dtype, progress=False,
                    quantize=quantize)


def bit_widths(text: str) -> list[int]:
    """``--quantize 16,8,4`` -> [16, 8, 4]; anything else is a UsageError (one line)."""
    from .arguments import UsageError

    words = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w not in QUANTIZE_WORDS]
    if not words or bad:
        raise UsageError(f"--quantize {text!r}: a comma-separated list of {', '.join(QUANTIZE_WORDS)} "
                         "(16 = unquantized)")
    return [int(w) for w in dict.fromkeys(words)]


# (fused blocks, compiled AdamW, compiled step); None = the device's default
COMPILE_MODES = {"auto": (False, None, None), "step": (False, True, True), "fused": (True, True, False),
                 "adamw": (False, True, False), "off": (False, False, False)}


def _modes(flag: str, text: str, modes: dict) -> list:
    """A comma-separated list of ``modes``' words -> their values; anything else is a UsageError (one line)."""
    from .arguments import UsageError

    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or any(w not in modes for w in words):
        raise UsageError(f"{flag} {text!r}: a comma-separated list of {', '.join(modes)}")
    return [modes[w] for w in words]


def compile_modes(text: str) -> list[tuple[bool, bool | None, bool | None]]:
    """``--fused step,fused,adamw,off`` -> (fused blocks, compiled AdamW, compiled step; None = the device's
    default) per mode."""
    return _modes("--compiled", text, COMPILE_MODES)


MERGED_MODES = {"auto": None, "on": True, "off": False}


def merged_weight_modes(text: str) -> list[bool | None]:
    """``--merged-weights on,off`` -> the TrainStep setting per mode (None = the device's default)."""
    return _modes("--merged-weights", text, MERGED_MODES)


def _runs_per_cell(args, gpu_repeat: int) -> tuple[int, int]:
    """``(warmup, repeat)``: the flags, else one untimed run and ``gpu_repeat`` timed ones on GPUs
    (the first run compiles kernels), none and one on the CPU."""
    import mlx.core as mx

    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    warmup = args.warmup if args.warmup is not None else (1 if on_gpu else 0)
    repeat = args.repeat if args.repeat is not None else (gpu_repeat if on_gpu else 1)
    return warmup, repeat


def _median_run(runs: list[tuple[float, object]]) -> tuple[float, object]:
    """The ``(wall seconds, result)`` with the median wall time."""
    return sorted(runs, key=lambda run: run[0])[len(runs) // 2]


def _quantization(bits: int | None, group_size: int | None):
    from .quantize import spec

    return None if bits in (None, 16) else spec(bits, group_size)


def run_cell(model: str, seconds: float, steps: int, random_weights: bool, weights_dir: str | None,
             dit_dtype: str | None, warmup: int, repeat: int = 1, codec_dtype: str | None = None,
             bits: int | None = None, group_size: int | None = None) -> dict:
    """One benchmark cell in this process; returns its measurements.

    With ``bits`` (16, 8 or 4: the ``--quantize`` mode) the run is the CLI's: nothing is loaded before
    it, each model is loaded when needed and freed after its last use (``free_models``), and the peak
    memory of every stage, loading included, is reported with the bytes of each model's tensors."""
    if bits is not None:
        return _run_memory_cell(model, seconds, steps, random_weights, weights_dir, dit_dtype, codec_dtype, bits,
                                group_size, warmup, repeat)
    import mlx.core as mx

    from .pipeline import DECODING, SAMPLING, TEXT_ENCODING, Pipeline, dtype_of
    from .runtime import configure_process
    from .sources.modules import BENCH_PROMPT

    configure_process()
    dtype, codec_dt = dtype_of(dit_dtype), dtype_of(codec_dtype)
    t0 = time.perf_counter()
    if random_weights:
        pipe = random_pipeline(model, dtype, codec_dt)
    else:
        pipe = Pipeline(model, weights_dir=weights_dir, dit_dtype=dtype, codec_dtype=codec_dt, progress=False)
        pipe.fetch()
    _ = pipe.text, pipe.dit, pipe.decoder
    mx.synchronize()
    load = time.perf_counter() - t0
    prompt = BENCH_PROMPT
    for _ in range(warmup):  # compiles kernels / warms caches on GPUs
        pipe.generate(prompt, seconds=seconds, steps=steps, seed=0)
    runs = []
    for i in range(repeat):  # the run with the median wall time is reported
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        result = pipe.generate(prompt, seconds=seconds, steps=steps, seed=1 + i)
        runs.append((time.perf_counter() - t0, result))
    wall, result = _median_run(runs)
    stages = {s.name: s for s in result.stages}
    sampling = stages[SAMPLING].seconds
    return dict(
        model=model, seconds=seconds, steps=steps, load_s=load, text_s=stages[TEXT_ENCODING].seconds,
        sampling_s=sampling, ms_per_step=1000 * sampling / steps, decode_s=stages[DECODING].seconds,
        wall_s=wall, realtime=seconds / wall, peak_bytes=max(s.peak_bytes for _, r in runs for s in r.stages),
        peak_rss_bytes=_peak_rss(),
        dit_dtype=pipe.dtype_name, codec_dtype=pipe.codec_dtype_name, latents=result.plan.latents, repeats=repeat,
    )


def _run_memory_cell(model, seconds, steps, random_weights, weights_dir, dit_dtype, codec_dtype, bits,
                     group_size, warmup: int = 0, repeat: int = 1) -> dict:
    import mlx.core as mx

    from .pipeline import SAMPLING, Pipeline, dtype_of
    from .runtime import configure_process
    from .sources.modules import BENCH_PROMPT

    configure_process()
    dtype, codec_dt, q = dtype_of(dit_dtype), dtype_of(codec_dtype), _quantization(bits, group_size)
    if random_weights:
        pipe = random_pipeline(model, dtype, codec_dt, q)
    else:
        pipe = Pipeline(model, weights_dir=weights_dir, dit_dtype=dtype, codec_dtype=codec_dt, progress=False,
                        quantize=q)
        pipe.fetch()
    # GPUs: the first ``warmup`` runs compile kernels and are not timed. Peaks are the largest of every
    # run's, those included (a later run finds the prompt's embedding cached and loads no text encoder).
    peaks: dict[str, int] = {}
    runs = []
    for i in range(warmup + repeat):
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        seed = 0 if i < warmup else 1 + i - warmup
        result = pipe.generate(BENCH_PROMPT, seconds=seconds, steps=steps, seed=seed, free_models=True)
        if i >= warmup:
            runs.append((time.perf_counter() - t0, result))
        for st in result.stages:
            peaks[st.name] = max(peaks.get(st.name, 0), st.peak_bytes)
    wall, result = _median_run(runs)
    stages = {s.name: s for s in result.stages}
    return dict(
        model=model, seconds=seconds, steps=steps, bits=bits, quantization=None if q is None else str(q),
        dit_dtype=pipe.dtype_name, codec_dtype=pipe.codec_dtype_name, wall_s=wall,
        ms_per_step=1000 * stages[SAMPLING].seconds / steps, weight_bytes=dict(pipe.weight_bytes),
        stage_peak_bytes=peaks,
        stage_seconds={s.name: round(s.seconds, 3) for s in result.stages},
        peak_bytes=max(peaks.values()), peak_rss_bytes=_peak_rss(), latents=result.plan.latents, warmup=warmup,
        repeats=repeat,
    )


def snr_db(reference, other) -> float:
    """``10 log10(|ref|^2 / |other - ref|^2)``, in dB (inf when equal)."""
    import numpy as np

    ref, diff = np.asarray(reference, np.float64), np.asarray(other, np.float64) - np.asarray(reference, np.float64)
    noise = float((diff * diff).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10(float((ref * ref).sum()) / noise))


def run_fidelity(model: str, seconds: float, steps: int, random_weights: bool, weights_dir: str | None,
                 dit_dtype: str | None, bits: list[int], group_size: int | None) -> list[dict]:
    """SNR of the quantized DiT's output (one forward at t = 0.5 from fixed noise and the bench prompt's
    conditioning) and of the whole pipeline's audio (same seed) against the unquantized DiT at the same
    dtype, per bit width, on the same weights (random ones are built from fixed seeds)."""
    import mlx.core as mx
    import numpy as np

    from . import kernels
    from .pipeline import Pipeline, dtype_of
    from .runtime import configure_process
    from .sampling import Guidance
    from .sources.modules import BENCH_PROMPT

    configure_process()

    def pipeline(q):
        if random_weights:
            return random_pipeline(model, dtype_of(dit_dtype), quantize=q)
        return Pipeline(model, weights_dir=weights_dir, dit_dtype=dtype_of(dit_dtype), progress=False, quantize=q)

    def measure(q):
        pipe = pipeline(q)
        cross, global_cond, _ = pipe.conditioning(BENCH_PROMPT, None, seconds, Guidance(scale=1.0))
        n_lat = pipe.plan(pipe.settings(BENCH_PROMPT, seconds=seconds)).latents
        x = mx.random.normal((1, 256, n_lat), key=mx.random.key(7))
        with kernels.use(pipe.kernels):
            v = np.array(pipe.dit(x, mx.array([0.5]), cross, global_cond).astype(mx.float32))
        pipe.free("text")
        t0 = time.perf_counter()
        audio = pipe.generate(BENCH_PROMPT, seconds=seconds, steps=steps, seed=1, free_models=True).audio
        return v, audio, time.perf_counter() - t0, pipe

    v_ref, audio_ref, _, ref = measure(None)
    rows = [dict(model=model, seconds=seconds, steps=steps, bits=16, dit_dtype=ref.dtype_name,
                 dit_snr_db=float("inf"), audio_snr_db=float("inf"))]
    for b in bits:
        if b == 16:
            continue
        q = _quantization(b, group_size)
        v, audio, _, _ = measure(q)
        rows.append(dict(model=model, seconds=seconds, steps=steps, bits=b, quantization=str(q),
                         dit_dtype=ref.dtype_name, dit_snr_db=snr_db(v_ref, v), audio_snr_db=snr_db(audio_ref, audio)))
    return rows


def run_cold(model: str, seconds: float, steps: int, weights_dir: str, dit_dtype: str | None = None) -> dict:
    """Process start to first audio written: ``sa3`` itself, weights read from ``weights_dir``.

    The process's wall time and peak resident memory come from the OS (``wait4``), the stages from
    the CLI's own JSON summary.
    """
    import tempfile

    from .sources.modules import BENCH_PROMPT

    with tempfile.TemporaryDirectory(prefix="sa3-bench-") as out:
        command = [sys.executable, "-m", "sa3_mlx", "--prompt", BENCH_PROMPT, "--dit", model,
                   "--seconds", repr(seconds), "--steps", str(steps), "--seed", "1", "--weights-dir", weights_dir,
                   "--json", "--out", str(Path(out) / "cold.wav")]
        if dit_dtype:
            command += ["--dit-dtype", dit_dtype]
        with open(Path(out) / "stdout", "w+b") as stdout, open(Path(out) / "stderr", "w+b") as stderr:
            t0 = time.perf_counter()
            proc = subprocess.Popen(command, stdout=stdout, stderr=stderr)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            stdout.seek(0)
            stderr.seek(0)
            printed, errors = stdout.read(), stderr.read()
    if proc.returncode != 0:
        raise RuntimeError((errors.decode(errors="replace").strip().splitlines() or ["failed"])[-1])
    summary = json.loads(printed)
    stages = {s["name"]: round(s["seconds"], 3) for s in summary["stages"]}
    peak_rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return dict(model=model, seconds=seconds, steps=steps, cold_wall_s=wall, stages=stages,
                load_s=sum(v for k, v in stages.items() if k.startswith("load")),
                peak_rss_bytes=peak_rss, peak_bytes=summary["peak_memory_bytes"])


def _peak_rss() -> int:
    """The process's peak resident memory in bytes: MLX's buffers plus numpy's and Python's
    (on a CPU, MLX's own count misses the arrays of the numpy fast paths)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: kB


def hardware() -> dict:
    import mlx.core as mx

    from .backend import blas_status, memory_reuse_status

    info = {"mlx": mx.__version__, "device": str(mx.default_device())}
    try:
        info.update({k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))})
    except Exception:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cpu"] = f"{cpu} ({os.cpu_count()} cores)"
    if mx.default_device().type == mx.DeviceType.cpu:
        info["blas"] = blas_status()[0] or "bundled reference BLAS"
        info["memory reuse"] = memory_reuse_status()
        if os.environ.get("OPENBLAS_CORETYPE"):  # it sets the product rate (see backend.blas_core_note)
            info["openblas coretype"] = os.environ["OPENBLAS_CORETYPE"]
    return info


def cold_main(args) -> int:
    """``sa3 bench --cold``: one fresh ``sa3`` process per cell."""
    from rich.console import Console

    from .pipeline import DECODING, LOAD_DIT, LOAD_TEXT, SAMPLING

    from .runtime import configure_process

    configure_process()  # the header then reports what the measured processes do
    from rich.table import Table

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lengths = [float(s) for s in args.seconds.split(",") if s.strip()]
    console = Console(stderr=args.json, highlight=False, width=None if sys.stdout.isatty() else 140)
    weights = args.weights_dir
    if weights is None:
        if not args.random_weights:
            console.print("[red]error:[/red] --cold needs --weights-dir DIR or --random-weights")
            return 2
        from .sources.modules import write_random_bundle

        console.print(f"  writing full-size random weights to {args.bundle_dir} (once) ...")
        weights = str(write_random_bundle(args.bundle_dir, tuple(models)))
    hw = hardware()
    console.print(f"[dim]{' | '.join(f'{k} {v}' for k, v in hw.items())}[/dim]")
    results = []
    for model in models:
        for seconds in lengths:
            console.print(f"  cold {model} {seconds:g} s ...", end="")
            try:
                results.append(run_cold(model, seconds, args.steps, weights, args.dit_dtype))
                console.print(f" {results[-1]['cold_wall_s']:.2f} s")
            except RuntimeError as e:
                console.print(f" [red]{e}[/red]")
                results.append(dict(model=model, seconds=seconds, error=str(e)))
    if args.json:
        print(json.dumps({"hardware": hw, "cold": results}, indent=2))
        return 0 if all("error" not in r for r in results) else 1
    table = Table(box=None, padding=(0, 1))
    for column in ("model", "seconds", "start to file", "loading", "load text", "load DiT", "sampling",
                   "decode", "peak RSS", "peak MLX"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["model"], f"{r['seconds']:g}", "[red]failed[/red]", *[""] * 7)
            continue
        st = r["stages"]
        table.add_row(r["model"], f"{r['seconds']:g}", f"{r['cold_wall_s']:.2f} s", f"{r['load_s']:.2f} s",
                      f"{st.get(LOAD_TEXT, 0):.2f} s", f"{st.get(LOAD_DIT, 0):.2f} s",
                      f"{st.get(SAMPLING, 0):.2f} s", f"{st.get(DECODING, 0):.2f} s",
                      f"{r['peak_rss_bytes'] / 1024**3:.2f} GB", f"{r['peak_bytes'] / 1024**3:.2f} GB")
    console.print(table)
    return 0 if all("error" not in r for r in results) else 1


def train_main(args) -> int:
    """``sa3 bench --train``: one row per model x adapter x crop, in this process."""
    import mlx.core as mx
    from rich.console import Console
    from rich.table import Table

    from .runtime import configure_process
    from .training.bench import bench_step

    fused_modes = compile_modes(args.fused)
    merged_modes = merged_weight_modes(args.merged_weights)
    configure_process(training=True)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    crops = [int(c) for c in args.crops.split(",") if c.strip()]
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    steps = args.repeat if args.repeat is not None else (10 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)  # GPU: the first steps of a process run slow
    hw = hardware()
    console = Console(stderr=args.json, highlight=False)
    console.print(f"[dim]{' | '.join(f'{k} {v}' for k, v in hw.items())}[/dim]")
    results = []
    for model in models:
        for adapter in adapters:
            for crop in crops:
                for (fused, compiled_optimizer, compiled_step), merged in itertools.product(fused_modes, merged_modes):
                    console.print(f"  training {model} {adapter} r{args.rank} crop {crop} ...", end="")
                    r = bench_step(model, crop, adapter, args.rank, steps=steps, warmup=max(warmup, 1),
                                   dtype=args.dit_dtype, checkpointing=args.checkpointing, fused=fused,
                                   compiled_optimizer=compiled_optimizer, compiled_step=compiled_step,
                                   merged_weights=merged)
                    results.append(r)
                    console.print(f" {r['ms_per_step']:.0f} ms/step (compiled step: {r['compiled_step']}, fused: "
                                  f"{r['fused']}, compiled AdamW: {r['compiled_optimizer']}, merged weights: "
                                  f"{r['merged_weights']}, first step {r['first_step_s']:.1f} s)")
    if args.json:
        print(json.dumps({"hardware": hw, "results": results}, indent=2))
        return 0
    table = Table(box=None, padding=(0, 1))
    for column in ("model", "adapter", "crop", "base", "compiled", "merged", "ms/step", "it/s", "first step",
                   "peak mem", "trainable"):
        table.add_column(column, justify="left" if column in ("model", "adapter") else "right")
    for r in results:
        compiled = "step" if r["compiled_step"] else "fused" if r["fused"] else \
            "adamw" if r["compiled_optimizer"] else "off"
        table.add_row(r["model"], r["adapter"], str(r["crop"]), r["base_precision"], compiled,
                      "yes" if r["merged_weights"] else "no",
                      f"{r['ms_per_step']:.0f}", f"{r['it_per_s']:.2f}", f"{r['first_step_s']:.1f} s",
                      f"{r['peak_bytes'] / 1024**3:.2f} GB", f"{r['trainable_parameters']:,}")
    console.print(table)
    return 0


def _cell_process(spec: dict, console, label: str, names: dict) -> dict:
    """One bench cell in a fresh process (its own peak memory, no warm caches): its result, or ``names``
    with the error its last line of stderr gives."""
    console.print(label, end="")
    proc = subprocess.run([sys.executable, "-m", "sa3_mlx", "bench", "--cell", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        console.print(f" [red]{error}[/red]")
        return dict(names, error=error)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cells(args) -> list[tuple[str, float]]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lengths = [float(s) for s in args.seconds.split(",") if s.strip()]
    return [(m, s) for m in models for s in lengths if s < 300 or m == LONG_ONLY_FOR or len(lengths) == 1]


def _header(args):
    from rich.console import Console

    console = Console(stderr=args.json, highlight=False, width=None if sys.stdout.isatty() else 160)
    hw = hardware()
    console.print(f"[dim]{' | '.join(f'{k} {v}' for k, v in hw.items())}[/dim]")
    return console, hw


def quantize_main(args) -> int:
    """``sa3 bench --quantize 16,8,4``: one process per model x length x bit width."""
    from rich.table import Table

    from .pipeline import DECODING, LOAD_DECODER, LOAD_DIT, LOAD_TEXT, SAMPLING, TEXT_ENCODING

    widths = bit_widths(args.quantize)
    console, hw = _header(args)
    warmup, repeat = _runs_per_cell(args, gpu_repeat=3)
    results = []
    for model, seconds in _cells(args):
        for bits in widths:
            spec = dict(model=model, seconds=seconds, steps=args.steps, random_weights=args.random_weights,
                        weights_dir=args.weights_dir, dit_dtype=args.dit_dtype, warmup=warmup, repeat=repeat,
                        codec_dtype=args.codec_dtype, bits=bits,
                        group_size=None if args.group_size is None else int(args.group_size))
            results.append(_cell_process(spec, console, f"  {model} {seconds:g} s, {bits} bits ...",
                                         dict(model=model, seconds=seconds, bits=bits)))
            if "error" in results[-1]:
                continue
            console.print(f" {results[-1]['wall_s']:.2f} s")
    if args.json:
        print(json.dumps({"hardware": hw, "quantize": results}, indent=2))
        return 0 if all("error" not in r for r in results) else 1

    def gb(n: int) -> str:
        return f"{n / 1e9:.2f}"

    table = Table(box=None, padding=(0, 1), title="memory in GB (10^9 bytes); peaks are MLX's, loading included")
    for column in ("model", "seconds", "DiT", "DiT weights", "all weights", "peak text", "peak DiT",
                   "peak decode", "peak", "peak RSS", "ms/step", "wall"):
        table.add_column(column, justify="left" if column in ("model", "DiT") else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["model"], f"{r['seconds']:g}", f"{r['bits']} bits", "[red]failed[/red]", *[""] * 8)
            continue
        st, w = r["stage_peak_bytes"], r["weight_bytes"]
        peak = lambda *names: gb(max(st.get(n, 0) for n in names))  # noqa: E731
        kind = r["dit_dtype"] if r["bits"] == 16 else f"q{r['bits']}"
        table.add_row(r["model"], f"{r['seconds']:g}", kind, gb(w.get("dit", 0)), gb(sum(w.values())),
                      peak(LOAD_TEXT, TEXT_ENCODING), peak(LOAD_DIT, SAMPLING), peak(LOAD_DECODER, DECODING),
                      gb(r["peak_bytes"]), gb(r["peak_rss_bytes"]), f"{r['ms_per_step']:.0f}", f"{r['wall_s']:.1f} s")
    console.print(table)
    return 0 if all("error" not in r for r in results) else 1


def fidelity_main(args) -> int:
    """``sa3 bench --fidelity``: SNR per bit width against the unquantized DiT, in this process."""
    from rich.table import Table

    widths = bit_widths(args.quantize or "8,4")
    console, hw = _header(args)
    rows = []
    for model, seconds in _cells(args):
        console.print(f"  fidelity {model} {seconds:g} s ...")
        rows += run_fidelity(model, seconds, args.steps, args.random_weights, args.weights_dir, args.dit_dtype,
                             widths, None if args.group_size is None else int(args.group_size))
    weights = "random full-size weights (not real ones: real weights have outliers)" if args.random_weights \
        else "the real weights"
    if args.json:
        print(json.dumps({"hardware": hw, "weights": weights, "fidelity": rows}, indent=2))
        return 0
    table = Table(box=None, padding=(0, 1), title=f"SNR against the unquantized DiT, {weights}")
    for column in ("model", "seconds", "DiT", "DiT output SNR", "audio SNR"):
        table.add_column(column, justify="left" if column in ("model", "DiT") else "right")
    for r in rows:
        if r["bits"] == 16:
            continue
        table.add_row(r["model"], f"{r['seconds']:g}", f"q{r['bits']} vs {r['dit_dtype']}",
                      f"{r['dit_snr_db']:.1f} dB", f"{r['audio_snr_db']:.1f} dB")
    console.print(table)
    return 0


def main(argv: list[str]) -> int:
    from .arguments import Parser, positive_int

    p = Parser(prog="sa3 bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sm-music,sm-sfx,medium", help="comma-separated (default all three)")
    p.add_argument("--seconds", default=",".join(map(str, DEFAULT_SECONDS)),
                   help="comma-separated clip lengths (default 5,30,120,380; 380 s for medium only)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dit-dtype", choices=DTYPES, help="default: fp32 on CPU, fp16 on GPU")
    p.add_argument("--codec-dtype", choices=DTYPES,
                   help="codec precision (default fp32; fp16 for SAME-L on GPU)")
    p.add_argument("--random-weights", action="store_true", help="full-size random weights in memory (no download)")
    p.add_argument("--weights-dir", help="local weights folder (default: the Hugging Face cache)")
    p.add_argument("--warmup", type=int, help="untimed runs before the timed one (default 1 on GPU, 0 on CPU)")
    p.add_argument("--repeat", type=int, help="timed runs per cell, the median is reported (default 5 on GPU, 1 on CPU)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--cold", action="store_true",
                   help="measure `sa3` itself from process start to the file written, weights read from disk "
                        "(--weights-dir, or with --random-weights a full-size random bundle written once to "
                        "--bundle-dir), with the process's peak resident memory")
    p.add_argument("--bundle-dir", default=str(Path.home() / ".cache" / "sa3-mlx" / "random-bundle"),
                   help="where --cold --random-weights keeps its files (default ~/.cache/sa3-mlx/random-bundle)")
    p.add_argument("--train", action="store_true",
                   help="time LoRA training steps instead (random full-size weights): ms/step, it/s, peak memory, "
                        "trainable parameters per model and crop")
    p.add_argument("--crops", default="256,1300", help="--train: comma-separated crop lengths in latents (256,1300)")
    p.add_argument("--adapters", default="dora-rows,lora", help="--train: comma-separated adapter types")
    p.add_argument("--rank", type=int, default=16, help="--train: adapter rank (16)")
    p.add_argument("--checkpointing", action="store_true", help="--train: gradient checkpointing of the blocks")
    p.add_argument("--compiled", "--fused", dest="fused", default="auto", metavar="LIST",
                   help="--train: what is compiled: auto (the device's default: the step and AdamW on GPUs, nothing "
                        "on the CPU), step (the whole forward and backward pass, and AdamW), fused (the blocks: sa3 "
                        "train --fused), adamw (AdamW only), off, or a list (step,adamw,off) to compare")
    p.add_argument("--merged-weights", default="auto", metavar="LIST",
                   help="--train: the adapted weights formed once per step (sa3 train --merged-weights): auto (the "
                        "device's default), on, off, or a list (on,off) to compare")
    p.add_argument("--batch", type=positive_int, metavar="CLIPS",
                   help="time `sa3 batch` instead: CLIPS clips of the first --models/--seconds (random full-size weights "
                        "in --bundle-dir) in this process and with --batch-workers Ray workers, against a loop of "
                        "`sa3` processes; clips per minute end to end and steady")
    p.add_argument("--batch-workers", default="1,2", help="--batch: comma-separated Ray worker counts (1,2)")
    p.add_argument("--no-cli-loop", action="store_true", help="--batch: leave out the loop of `sa3` processes")
    p.add_argument("--quantize", metavar="BITS,...",
                   help="memory and speed per DiT bit width, e.g. 16,8,4 (16 = unquantized): the CLI's run "
                        "(models loaded when needed, freed after use), with the bytes of each model's tensors, "
                        "the peak memory of each stage and ms/step")
    p.add_argument("--group-size", choices=("32", "64", "128"), help="--quantize/--fidelity: weights per scale "
                   "(default 64)")
    p.add_argument("--fidelity", action="store_true",
                   help="SNR of the quantized DiT's output and of the pipeline's audio against the unquantized "
                        "DiT, per bit width of --quantize (default 8,4)")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print its JSON
    args = p.parse_args(argv)
    if args.batch:
        from .batch.bench import main as batch_main

        return batch_main(args, hardware())
    if args.cold:
        return cold_main(args)
    if args.train:
        return train_main(args)
    if args.fidelity:
        return fidelity_main(args)
    if args.quantize is not None:
        return quantize_main(args)

    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(run_cell(**spec)))
        return 0

    warmup, repeat = _runs_per_cell(args, gpu_repeat=5)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lengths = [float(s) for s in args.seconds.split(",") if s.strip()]
    cells = [(m, s) for m in models for s in lengths if s < 300 or m == LONG_ONLY_FOR or len(lengths) == 1]
    results, hw = [], hardware()
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json, highlight=False, width=None if sys.stdout.isatty() else 140)
    console.print(f"[dim]{' | '.join(f'{k} {v}' for k, v in hw.items())}[/dim]")
    for model, seconds in cells:
        spec = dict(model=model, seconds=seconds, steps=args.steps, random_weights=args.random_weights,
                    weights_dir=args.weights_dir, dit_dtype=args.dit_dtype, warmup=warmup, repeat=repeat, codec_dtype=args.codec_dtype)
        results.append(_cell_process(spec, console, f"  running {model} {seconds:g} s ...",
                                     dict(model=model, seconds=seconds)))
        if "error" in results[-1]:
            continue
        console.print(f" {results[-1]['wall_s']:.2f} s")

    if args.json:
        print(json.dumps({"hardware": hw, "results": results}, indent=2))
        return 0
    table = Table(box=None, padding=(0, 1))
    for column in ("model", "seconds", "load", "text", "sampling", "ms/step", "decode", "wall", "x realtime",
                   "peak mem", "peak RSS"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["model"], f"{r['seconds']:g}", "[red]failed[/red]", *[""] * 8)
            continue
        table.add_row(r["model"], f"{r['seconds']:g}", f"{r['load_s']:.2f} s", f"{r['text_s'] * 1000:.0f} ms",
                      f"{r['sampling_s']:.2f} s", f"{r['ms_per_step']:.0f}", f"{r['decode_s']:.2f} s",
                      f"{r['wall_s']:.2f} s", f"{r['realtime']:.1f}x", f"{r['peak_bytes'] / 1024**3:.2f} GB",
                      f"{r['peak_rss_bytes'] / 1024**3:.2f} GB")
    console.print(table)
    return 0 if all("error" not in r for r in results) else 1
