"""``sa3 studio``: the web page and the HTTP API in one process (uvicorn), opened in the browser."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import webbrowser
from pathlib import Path

from ..arguments import Parser, UsageError, finite_float, positive_int, whole_number
from ..settings import QUANTIZE_BITS, QUANTIZE_GROUP_SIZES
from .app import is_loopback
from .settings import Limits

MAX_PREVIEW_EVERY = 1000  # the most steps a run has


preview_steps = whole_number(0, MAX_PREVIEW_EVERY)

API_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~-]{8,}")  # it travels in headers, URLs and a cookie as is
DEFAULT_PORT = 7860  # the usual local audio/ML demo port (Gradio's)


def build_parser() -> argparse.ArgumentParser:
    limits = Limits()
    p = Parser(prog="sa3 studio", description="A local web studio and HTTP API for Stable Audio 3 "
               "(OpenAPI description at /api/openapi.json).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("SA3_STUDIO_API_KEY"),
                   help="key every request must carry (required off loopback; default $SA3_STUDIO_API_KEY)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    p.add_argument("--output-dir", type=Path, default=Path("output") / "studio",
                   help="where results and the history database go (default output/studio)")
    p.add_argument("--weights-dir", type=Path, help="local folder with the weight files (flat or with MLX/)")
    p.add_argument("--queue-size", type=positive_int, default=8, help="jobs waiting at most (default 8); more get 429")
    p.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="LoRA adapters jobs may use: the .safetensors files of DIR, named by file name (without "
                        ".safetensors) in a job's loras, e.g. [\"my_style:0.8@0.3-1\"]")
    p.add_argument("--preview-every", type=preview_steps, default=4, metavar="N",
                   help="live preview: every N sampling steps the page shows the spectrogram of what the step "
                        "predicts (one decode each; default 4; 0 = off)")
    p.add_argument("--quantize", choices=QUANTIZE_BITS, metavar="BITS",
                   help="quantize every job's DiT (its transformer-block linear layers) to 8 or 4 bits at load "
                        "time: less memory (see the README's table of which setting for which machine)")
    p.add_argument("--quantize-group-size", choices=QUANTIZE_GROUP_SIZES, metavar="N",
                   help="weights per quantization scale and bias: 32, 64 (default) or 128")
    p.add_argument("--max-seconds", type=finite_float, default=limits.max_seconds,
                   help=f"longest audio a job may ask for (default and most {limits.max_seconds:g})")
    p.add_argument("--max-steps", type=positive_int, default=limits.max_steps,
                   help=f"most sampling steps per job (default and most {limits.max_steps})")
    p.add_argument("--max-batch", type=positive_int, default=limits.max_batch,
                   help=f"most outputs per job (default and most {limits.max_batch})")
    p.add_argument("--max-upload-mb", type=finite_float, default=limits.max_upload_bytes / 2**20,
                   help="largest upload in MiB (default 64)")
    p.add_argument("--upload-hours", type=finite_float, default=24.0,
                   help="uploads are removed after this many hours (default 24)")
    p.add_argument("--upload-budget-mb", type=finite_float, default=1024.0,
                   help="all uploads together at most this many MiB; the oldest go first (default 1024)")
    return p


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (got {value})")
    return value


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a bad host or a busy port is one clear error before anything starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host}: cannot be resolved ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    return sock


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        raise UsageError(f"--host {args.host} is reachable from other machines: pass --api-key KEY "
                         "(every request must then carry it)")
    if args.api_key is not None and not API_KEY_PATTERN.fullmatch(args.api_key):
        raise UsageError("--api-key must be at least 8 letters, digits or - _ . ~ (e.g. `openssl rand -hex 16`)")
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir}: no such folder")
    if args.quantize_group_size is not None and args.quantize is None:
        raise UsageError("--quantize-group-size needs --quantize (the bits)")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir}: no such folder")
    table = Limits()  # the settings table's own bounds: a server can narrow them, not widen them
    if not 0 < args.max_seconds <= table.max_seconds:
        raise UsageError(f"--max-seconds must be in (0, {table.max_seconds:g}]")
    if args.max_steps > table.max_steps:
        raise UsageError(f"--max-steps must be at most {table.max_steps}")
    if args.max_batch > table.max_batch:
        raise UsageError(f"--max-batch must be at most {table.max_batch}")
    if not 0 < args.max_upload_mb <= 4096:
        raise UsageError("--max-upload-mb must be in (0, 4096]")
    if not 0 < args.upload_hours <= 24 * 365:
        raise UsageError("--upload-hours must be in (0, 8760]")
    if not args.max_upload_mb <= args.upload_budget_mb <= 1 << 20:
        raise UsageError("--upload-budget-mb must be at least --max-upload-mb and at most 1048576")

    import uvicorn

    from ..runtime import configure_process
    from .app import build_app
    from .jobs import Studio

    configure_process()
    limits = Limits(max_seconds=args.max_seconds, max_steps=args.max_steps, max_batch=args.max_batch,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    sock = listen(args.host, args.port)
    try:
        studio = Studio(args.output_dir, weights_dir=args.weights_dir, limits=limits, queue_size=args.queue_size,
                        preview_every=args.preview_every, lora_dir=args.lora_dir, quantize=args.quantize,
                        quantize_group_size=args.quantize_group_size,
                        upload_hours=args.upload_hours, upload_budget_bytes=int(args.upload_budget_mb * 2**20))
    except (sqlite3.Error, OSError) as e:
        sock.close()
        raise UsageError(f"cannot open the studio's folder {args.output_dir} ({e}); free some space or choose "
                         "another --output-dir") from None
    app = build_app(studio, api_key=args.api_key, loopback_only=is_loopback(args.host))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{port}/"
        print(f"sa3 studio: {url}  (history in {studio.history.path}; Ctrl-C stops)", flush=True)
        if not args.no_browser:
            webbrowser.open(url + (f"?key={args.api_key}" if args.api_key else ""))

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM and SIGHUP (see commands.stop_on_signals): a clean stop
        pass  # uvicorn re-raises the signal after its graceful shutdown
    finally:
        studio.close()
        sock.close()
    if not server.started:
        print(f"error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 2
    return 0
