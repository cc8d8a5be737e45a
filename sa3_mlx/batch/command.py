"""``sa3 batch FILE``: thousands of clips from a prompts file, on this machine or over a Ray cluster,
resumable, each item made exactly once (see :mod:`.schedule`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

from .. import output
from ..arguments import Parser, UsageError, add_setting_options, positive_int, setting_values, whole_number
from ..settings import SettingsError, cli_name, validate
from .items import MAX_ROWS, BatchError, absolute_lora, bad_lines_message, parse_vary, read_items
from .manifest import FolderBusy
from .schedule import (
    BatchStopped,
    Driver,
    ItemDone,
    ItemFailed,
    LocalExecutor,
    Started,
    Stopping,
    Summary,
    WorkerJoined,
    WorkerLost,
)

EXAMPLES = """\
examples:
  sa3 batch jobs.jsonl --out-dir renders/                          one machine, models loaded once
  sa3 batch jobs.jsonl --out-dir /shared/renders --ray auto          the Ray cluster this machine is part of
  sa3 batch jobs.jsonl --out-dir renders/ --ray local --workers 2    a throwaway local Ray cluster
  sa3 batch steps.txt --dit sm-sfx --seconds 3 --vary seed=1..50     50 seeds of every prompt
  sa3 batch "footsteps.csv" --vary surface=gravel,wood,snow          {surface} in the prompts

FILE: one prompt a line (.txt), one JSON object of settings a line (.jsonl: any setting by its API name,
plus an optional "id"), or CSV with a header row (a "prompt" column, any other setting, "id").
The other flags are every item's defaults. Outputs are OUT_DIR/ID.ext with OUT_DIR/manifest.jsonl;
running the same command again makes only what is not done. Ctrl-C stops scheduling and lets running
items finish (again, or --now: cancels them).
"""

GROUPS = ("what to generate", "model", "sampling", "audio input", "output")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sa3 batch", description="Generate every item of a prompts file, on this machine or over a "
               "Ray cluster; resumable, each item exactly once.", epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, metavar="FILE", help="the items: .txt, .jsonl or .csv")
    run = p.add_argument_group("the run")
    run.add_argument("--out-dir", default=None, metavar="DIR",  # text: Path would fold an s3:// URL into a path
                     help=f"folder of the outputs and manifest.jsonl (default {output.DEFAULT_FOLDER}/)")
    run.add_argument("--ray", metavar="auto|local|ADDRESS", default=None,
                     help="run on Ray workers: auto (the cluster this machine is part of), local (a cluster of this "
                          "machine, for this run), or a cluster address (HOST:PORT); needs sa3-mlx[ray]")
    run.add_argument("--workers", type=positive_int, default=None, metavar="N",
                     help="how many workers: with --ray local, workers sharing this machine's cores (default one per GPU, "
                          "else one); with a cluster at most this many (default one per GPU and per CPU node)")
    run.add_argument("--cpus-per-worker", type=positive_int, default=None, metavar="N",
                     help="cores a worker takes on a node without GPUs (default: the whole node; GPU nodes get "
                          "one worker per GPU)")
    run.add_argument("--retries", type=whole_number(0, 100), default=2, metavar="N",
                     help="tries again a failed item this many times, on another worker when there is one "
                          "(default 2); then it is recorded as failed and the run goes on")
    run.add_argument("--batch-size", type=whole_number(1, MAX_ROWS), default=8, metavar="N",
                     help=f"outputs of one model and length sampled together (1-{MAX_ROWS}, default 8)")
    run.add_argument("--vary", action="append", default=[], metavar="NAME=VALUES",
                     help="every item once per value: NAME a setting (seed=1..50, cfg=1,3,5) or a {NAME} "
                          "placeholder of the prompts (surface=gravel,wood,snow); repeatable (all combinations)")
    run.add_argument("--skip-invalid", action="store_true",
                     help="leave out bad lines (listed as warnings) instead of refusing the file")
    run.add_argument("--now", action="store_true",
                     help="on Ctrl-C, cancel running items at once instead of letting them finish")
    run.add_argument("--dry-run", action="store_true", help="check everything and say what would run, run nothing")
    run.add_argument("--json", action="store_true", help="one JSON line per event on stdout")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    add_setting_options(groups.__getitem__)
    groups["model"].add_argument("--weights-dir", type=Path,
                                 help="folder with the weight files, at the same path on every node")
    return p


class Report:
    """The run as it goes: one line per event (``--json``: JSON), or, on a terminal, a progress bar for the
    whole run with a line per worker."""

    def __init__(self, as_json: bool, live: bool, stream=None):
        self.as_json, self.live = as_json, live and not as_json
        self.stream = stream or sys.stdout  # the report's own: while workers run, others' prints go to stderr
        self.total = self.todo = self.done = self.failed = 0
        self.workers: dict[str, dict] = {}
        self.started = time.monotonic()
        self.progress = self.view = None

    def _emit(self, **fields) -> None:
        print(json.dumps(fields, ensure_ascii=False), file=self.stream, flush=True)

    def _note(self, text: str, err: bool = False) -> None:
        if self.view is not None:
            self.view.console.print(text, style="yellow" if err else None, highlight=False)
        else:
            print(text, file=sys.stderr if err else self.stream, flush=True)

    def _worker(self, info) -> None:
        self.workers[info.name] = dict(node=info.node, device=info.device, pid=info.pid, items=0, audio=0.0,
                                       since=time.monotonic(), state="ready")
        if self.as_json:
            self._emit(event="worker", name=info.name, node=info.node, pid=info.pid, device=info.device)

    def __call__(self, event) -> None:
        if isinstance(event, Started):
            self.total, self.todo = event.total, event.todo
            if self.as_json:
                self._emit(event="started", items=event.total, done_before=event.done_before, todo=event.todo)
            elif event.done_before:
                self._note(f"{event.done_before} of {event.total} items already done (skipped)")
            for info in event.workers:
                self._worker(info)
            if self.live and event.todo:
                self._start_live()
            elif not self.as_json and event.workers:
                self._note("workers: " + ", ".join(f"{w.name} ({w.node}, {w.device})" for w in event.workers))
        elif isinstance(event, WorkerJoined):
            self._worker(event.worker)
        elif isinstance(event, ItemDone):
            self.done += 1
            w = self.workers[event.worker]  # the driver reports a worker before giving it work
            w["items"] += 1
            w["audio"] += event.rendered.audio_seconds
            r = event.rendered
            if self.as_json:
                self._emit(event="done", id=r.item.id, line=r.item.line, worker=event.worker, outputs=r.outputs,
                           wall_seconds=round(r.wall_seconds, 4), elapsed=round(time.monotonic() - self.started, 4))
            elif not self.live:
                outs = "  ".join(f"{o['path']} (seed {o['seed']})" for o in r.outputs)
                print(f"[{self.done + self.failed}/{self.todo}] {r.item.id}  {outs}  {r.wall_seconds:.2f} s  "
                      f"{event.worker}", file=self.stream, flush=True)
            for warning in r.warnings:
                self._note(f"warning: {r.item.id}: {warning}", err=True)
        elif isinstance(event, ItemFailed):
            if event.final:
                self.failed += 1
            if self.as_json:
                self._emit(event="failed" if event.final else "retry", id=event.item.id, line=event.item.line,
                           error=event.error, attempts=event.attempts)
            else:
                what = "failed" if event.final else f"failed (try {event.attempts}), trying again"
                self._note(f"warning: {event.item.id} (line {event.item.line}) {what}: {event.error}", err=True)
        elif isinstance(event, WorkerLost):
            if event.worker in self.workers:
                self.workers[event.worker]["state"] = "lost"
            if self.as_json:
                self._emit(event="lost", worker=event.worker, error=event.error)
            else:
                self._note(f"warning: worker {event.worker}: {event.error}; its items go to other workers", err=True)
        elif isinstance(event, Stopping):
            if self.as_json:
                self._emit(event="stopping", running=event.running, now=event.now)
            elif event.now:
                self._note("stopping now: running items cancelled", err=True)
            else:
                self._note(f"stopping: {event.running} running unit(s) finish first (Ctrl-C again to cancel them)",
                           err=True)
        self._refresh()

    # ---- the terminal view -------------------------------------------------------------------
    def _start_live(self) -> None:
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        self.task = self.progress.add_task("items", total=self.todo, rate="")
        self.view = Live(Group(self.progress, self._table()), refresh_per_second=4, transient=False)
        self.view.start()

    def _table(self):
        from rich.table import Table

        table = Table(box=None, pad_edge=False, show_edge=False)
        for column in ("worker", "node", "device", "items", "clips/min", "audio s"):
            table.add_column(column, justify="right" if column in ("items", "clips/min", "audio s") else "left")
        for name, w in self.workers.items():
            minutes = max(time.monotonic() - w["since"], 1e-9) / 60
            table.add_row(name + (" (lost)" if w["state"] == "lost" else ""), w["node"], w["device"], str(w["items"]),
                          f"{w['items'] / minutes:.1f}", f"{w['audio']:.0f}")
        return table

    def _refresh(self) -> None:
        if self.view is None:
            return
        from rich.console import Group

        minutes = max(time.monotonic() - self.started, 1e-9) / 60
        rate = f"done {self.done}, failed {self.failed}, {self.done / minutes:.1f} clips/min"
        self.progress.update(self.task, completed=self.done + self.failed, rate=rate)
        self.view.update(Group(self.progress, self._table()))

    def close(self) -> None:
        if self.view is not None:
            self._refresh()
            self.view.stop()
            self.view = None

    def summary(self, s: Summary, folder: Path) -> None:
        if self.as_json:
            self._emit(event="summary", items=s.total, skipped=s.skipped, done=s.done, failed=s.failed, left=s.left,
                       audio_seconds=round(s.audio_seconds, 3), wall_seconds=round(s.wall_seconds, 3),
                       clips_per_minute=round(s.done / s.wall_seconds * 60, 3) if s.wall_seconds else None,
                       workers={name: dict(w, audio_seconds=round(w["audio_seconds"], 3),
                                           busy_seconds=round(w["busy_seconds"], 3))
                                for name, w in s.per_worker.items()})
            return
        rate = f", {s.done / s.wall_seconds * 60:.1f} clips/min" if s.wall_seconds and s.done else ""
        text = (f"{s.done} made, {s.skipped} already done, {s.failed} failed"
                + (f", {s.left} left" if s.left else "") + f" in {s.wall_seconds:.1f} s{rate}; "
                f"manifest: {folder / 'manifest.jsonl'}")
        print(text, file=sys.stderr, flush=True)
        if s.left:
            print("run the same command again to make the rest", file=sys.stderr, flush=True)


def _executor(args, folder: Path):
    if args.ray is None:
        from ..pipeline import Pipeline

        weights_dir = args.weights_dir

        def make_pipeline(settings):
            return Pipeline.from_settings(settings, weights_dir=weights_dir, progress=False)

        return LocalExecutor(folder, make_pipeline, weights_dir, now=args.now)
    from .cluster import RayExecutor, import_ray

    import_ray()  # the install hint, before anything else
    return RayExecutor(args.ray, folder, args.weights_dir and args.weights_dir.resolve(), workers=args.workers,
                       cpus_per_worker=args.cpus_per_worker)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.ray is None and (args.workers not in (None, 1) or args.cpus_per_worker is not None):
        raise UsageError("--workers and --cpus-per-worker need --ray (without it, this process is the one worker)")
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir}: no such folder")
    try:
        defaults = setting_values(args)
        validate({**defaults, "prompt": ""})
    except SettingsError as e:
        raise UsageError(e.message(cli_name)) from None
    cwd = Path.cwd()  # the flags' paths are this directory's; workers run elsewhere
    if defaults.get("loras"):
        defaults["loras"] = tuple(absolute_lora(spec, cwd) for spec in defaults["loras"])
    if defaults.get("init_audio"):
        defaults["init_audio"] = str(cwd / Path(defaults["init_audio"]).expanduser())
    if args.out_dir is not None and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir}: object storage URLs are not written to directly; mount the "
                         "bucket (s3fs, gcsfuse) or use a shared filesystem, at the same path on every node")
    folder = (output.DEFAULT_FOLDER if args.out_dir is None else Path(args.out_dir)).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {folder}: not a folder")
    folder = folder.resolve()  # the manifest's paths hold from any directory, and on every node
    try:
        varies = [parse_vary(text) for text in args.vary]
        if len({v.name for v in varies}) != len(varies):
            raise BatchError("--vary: a name is given twice")
        items, errors = read_items(args.file, defaults, varies, label="")
    except BatchError as e:
        raise UsageError(str(e)) from None
    if errors and not args.skip_invalid:
        raise UsageError(bad_lines_message(errors, label=str(args.file)) + " (or pass --skip-invalid)")
    for error in errors[:20]:
        print(f"warning: skipped {error}", file=sys.stderr)
    if len(errors) > 20:
        print(f"warning: skipped {len(errors) - 20} more bad lines", file=sys.stderr)
    if not items:
        raise UsageError(f"{args.file}: no valid items")
    if args.dry_run:
        return _dry_run(items, folder, args)

    from ..runtime import configure_process

    configure_process()
    report = Report(args.json, sys.stderr.isatty())
    executor = None
    try:
        # stdout is the report's (JSON lines with --json); what Ray and the models print goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            executor = _executor(args, folder)
            driver = Driver(items, folder, executor, retries=args.retries, batch_size=args.batch_size,
                            report=report, now=args.now)
            summary = driver.run()
    except (BatchStopped, FolderBusy) as e:
        raise UsageError(str(e)) from None
    finally:
        report.close()
        if executor is not None:
            executor.shutdown()
    report.summary(summary, folder)
    if summary.interrupted is not None:
        raise summary.interrupted
    if summary.failed:
        print(f"error: {summary.failed} of {summary.total} items failed (their errors are in "
              f"{folder / 'manifest.jsonl'}); run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def _dry_run(items, folder: Path, args) -> int:
    from .items import groups
    from .manifest import Manifest
    from .render import problems

    manifest = Manifest(folder).load()
    todo = [item for item in items if not manifest.is_done(item)]
    units = groups(todo, args.batch_size)
    models = sorted({item.settings.model_name for item in todo})
    where = "this machine" if args.ray is None else "the workers (each node is checked when the run starts)"
    found = problems(todo, folder, args.weights_dir) if todo else []
    if args.json:
        print(json.dumps(dict(event="plan", items=len(items), done=len(items) - len(todo), todo=len(todo),
                              units=len(units), models=models, problems=found)))
    else:
        print(f"{len(items)} items: {len(items) - len(todo)} done, {len(todo)} to make in {len(units)} batched "
              f"runs ({', '.join(models) or 'none'}) on {where}")
        for problem in found:
            print(f"  missing here: {problem}")
    return 1 if found else 0


__all__ = ["build_parser", "main"]
