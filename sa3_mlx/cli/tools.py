"""``sa3 download``, ``sa3 doctor``, ``sa3 info`` and playback."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import __version__, hub
from ..audio import AudioError, read_metadata
from ..settings import SettingsError, from_metadata, reproduce_command
from .display import fmt_bytes
from ..arguments import Parser


def download(argv: list[str]) -> int:
    p = Parser(prog="sa3 download", description="Fetch model weights into the Hugging Face cache.")
    p.add_argument("model", nargs="?", default="all", choices=[*hub.MODELS, "all"],
                   help="which bundle (default all): text encoder, DiT and its codec (encoder and decoder)")
    args = p.parse_args(argv)
    names = list(hub.MODELS) if args.model == "all" else [args.model]
    files = []
    for name in names:
        for f in hub.files_for(name, encoder=True):
            if f not in files:
                files.append(f)
    for f in files:
        print(f"  {hub.REPO_FOLDER}/{f}", file=sys.stderr)
        path = hub.hub_file(f, progress=sys.stderr.isatty())
        print(path)
    return 0


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul rate of the default MLX device."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _backend(mx) -> str:
    """Which MLX backend this build has: Metal, CUDA or CPU only."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)  # MLX builds before the CUDA backend have no mx.cuda
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def doctor(argv: list[str]) -> int:
    p = Parser(prog="sa3 doctor", description="Report platform, MLX backend, BLAS and weights.")
    p.add_argument("--weights-dir", type=Path, help="also check this local weights folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)

    import mlx.core as mx

    from ..backend import blas_core_note, blas_status, memory_reuse_status
    from ..runtime import configure_process

    configure_process()  # what a generation runs with (memory reuse), so the report and the matmul rate are its

    report: dict = {"sa3-mlx": __version__, "python": platform.python_version(),
                    "platform": f"{platform.system()} {platform.machine()}", "mlx": mx.__version__}
    device = mx.default_device()
    report["backend"] = _backend(mx)
    report["device"] = str(device)
    try:
        report["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # older MLX or a backend without the query
        pass
    blas, why = blas_status()
    if device.type == mx.DeviceType.cpu:
        report["blas"] = blas or f"bundled reference BLAS ({why})"
        report["memory reuse"] = memory_reuse_status()
        if blas and (note := blas_core_note()):
            report["blas note"] = note
        from ..kernels import onednn

        usable, bf16_why = onednn.status()
        report["bf16 path"] = (f"oneDNN {bf16_why}: --dit-dtype bf16 and --codec-dtype bf16 run their products in "
                               "bf16 (faster; under the 50 dB bar, README 'Linux CPU')") if usable else \
            f"not available ({bf16_why}): --dit-dtype / --codec-dtype bf16 run MLX's own bf16 kernels"
    report["fp32_matmul_gflops"] = round(matmul_gflops(), 1)

    weights = {}
    for name in dict.fromkeys(f for m in hub.MODELS for f in hub.files_for(m, encoder=True)):
        where = None
        if args.weights_dir is not None:
            try:
                where = hub.local_file(args.weights_dir, name)
            except hub.WeightsUnavailable:
                pass
        if where is None:
            where = hub.cached_file(name)
        weights[name] = {"path": str(where), "bytes": where.stat().st_size} if where else None
    report["weights"] = weights

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    for key in ("sa3-mlx", "python", "platform", "mlx", "backend", "device", "blas", "memory reuse", "bf16 path"):
        if key in report:
            console.print(f"  [dim]{key:>12}[/dim]  {report[key]}")
    if "blas note" in report:
        console.print(f"  [dim]{'blas note':>12}[/dim]  [yellow]{report['blas note']}[/yellow]")
    if "device_info" in report:
        info = ", ".join(f"{k}={v}" for k, v in report["device_info"].items())
        console.print(f"  [dim]{'details':>12}[/dim]  {info}")
    rate = report["fp32_matmul_gflops"]
    slow = device.type == mx.DeviceType.cpu and rate < 50
    console.print(f"  [dim]{'matmul':>12}[/dim]  {rate} GFLOP/s fp32" + ("  [yellow](slow: see README, 'Linux CPU')[/yellow]" if slow else ""))
    table = Table(title="weights", title_justify="left", box=None, padding=(0, 2))
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("where", style="dim")
    for name, info in weights.items():
        if info:
            table.add_row(name, fmt_bytes(info["bytes"]), info["path"])
        else:
            table.add_row(name, "[yellow]missing[/yellow]", "sa3 download")
    console.print(table)
    return 0


def info(argv: list[str]) -> int:
    p = Parser(prog="sa3 info", description="Print the settings stored in a generated file, "
               "and the command that generates it again.")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print the settings as JSON")
    args = p.parse_args(argv)
    meta = read_metadata(args.file)
    if not isinstance(meta, dict):
        raise AudioError(f"{args.file}: no sa3-mlx settings in this file (not made by sa3, or its metadata was stripped)")
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
        return 0
    width = max(map(len, [*meta, "command"]))
    for key, value in meta.items():
        print(f"{key:>{width}}  {_printable(value)}")
    try:
        command = reproduce_command(from_metadata(meta))
    except (SettingsError, KeyError, TypeError, ValueError) as e:  # an older version's file, or edited metadata
        command = f"(none: the stored settings do not make a valid command: {_printable(e)})"
    print(f"{'command':>{width}}  {_printable(command)}")
    return 0


def _printable(value) -> str:
    """Text from a file is untrusted: control characters (terminal escapes) are shown escaped."""
    text = str(value)
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def convert(argv: list[str]) -> int:
    """``sa3 convert REPO_OR_PATH OUT_DIR``."""
    from ..convert import convert as convert_release
    from ..quantize import spec
    from ..settings import QUANTIZE_BITS, QUANTIZE_GROUP_SIZES

    p = Parser(prog="sa3 convert", description="Convert an original Stable Audio 3 release (Hugging Face repo "
               "or local folder with model_config.json) into the official MLX file set.")
    p.add_argument("source", metavar="REPO_OR_PATH")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--quantize", choices=QUANTIZE_BITS, metavar="BITS",
                   help="write the DiT's transformer-block linear layers quantized to 8 or 4 bits (MLX affine "
                        "quantization): a smaller file that loads quantized directly")
    p.add_argument("--quantize-group-size", choices=QUANTIZE_GROUP_SIZES, metavar="N",
                   help="weights per quantization scale and bias: 32, 64 (default, MLX's) or 128")
    args = p.parse_args(argv)
    if args.quantize_group_size is not None and args.quantize is None:
        p.error("--quantize-group-size needs --quantize (the bits)")
    quantize = spec(args.quantize, args.quantize_group_size)
    for path in convert_release(args.source, args.out_dir, quantize=quantize):
        print(path)
    return 0


def play(path: Path, display) -> None:
    """Play a file with the first player found; a clear note when there is none."""
    for player, args in (("afplay", []), ("paplay", []), ("aplay", ["-q"]), ("pw-play", []),
                         ("ffplay", ["-nodisp", "-autoexit", "-loglevel", "quiet"]), ("play", ["-q"])):
        exe = shutil.which(player)
        if exe:
            try:
                subprocess.run([exe, *args, str(path)], check=False)
            except KeyboardInterrupt:
                pass
            return
    display.warn("--play: no audio player found (install one of afplay, paplay, aplay, pw-play, ffplay or sox)")
