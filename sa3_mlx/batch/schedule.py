"""The driver of ``sa3 batch``: which item runs where, retries, the manifest, stopping.

The driver owns the state of a run; executors own the workers. An executor is in-process
(:class:`LocalExecutor`: this process's models) or a Ray cluster (:mod:`.cluster`); both take units (a
group of items of one settings shape, :func:`~.items.groups`) and report each one's outcome. The driver

* skips what the manifest records as done (:class:`~.manifest.Manifest`), removes half-written files a
  killed worker left, and draws the seeds of items without one once, so a retry makes the same audio;
* gives an idle worker a unit of the models it holds when there is one (models are swapped only when
  needed), else of the models fewest workers are on;
* records each finished item in the manifest as soon as it is reported (one writer);
* retries a failed unit: a group item by item, an item up to ``retries`` times and on another worker when
  there is one, then records it failed (with its error) and goes on; a lost worker's unit is rescheduled;
* on Ctrl-C (or SIGTERM) stops scheduling and lets running units finish; a second one (or ``now``) cancels
  them. What is left runs when the same command is run again.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .items import MAX_ROWS, Item, groups, output_paths, pipeline_key
from .manifest import FolderLock, Manifest, remove_partial_files, settings_key
from .render import Rendered, Renderer, problems, with_seeds


@dataclass
class Unit:
    items: list[Item]
    attempts: int = 0  # failed runs of this unit (and of the item it was split from)
    failed_on: Counter = field(default_factory=Counter)  # failures per worker (a retry goes elsewhere)

    @property
    def key(self) -> tuple:
        return pipeline_key(self.items[0].settings)


@dataclass
class Outcome:
    worker: str
    unit: Unit
    rendered: list[Rendered] | None = None  # done
    error: str | None = None  # the unit failed (an item's fault, or the worker's)
    lost: bool = False  # the worker died with it (killed, out of memory, node lost)


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    node: str = "local"
    pid: int | None = None
    device: str = ""


class Executor(Protocol):
    """Where units run. ``idle()`` lists workers ready for a unit; ``wait`` returns finished outcomes
    (and blocks at most ``timeout`` seconds); ``alive()`` is False when no worker is left or can be made."""

    def start(self) -> list[WorkerInfo]: ...
    def check(self, items: Sequence[Item], folder: Path) -> dict[str, list[str]]: ...  # node -> problems
    def idle(self) -> list[str]: ...
    def submit(self, worker: str, unit: Unit) -> None: ...
    def wait(self, timeout: float) -> list[Outcome]: ...
    def running(self) -> int: ...
    def alive(self) -> bool: ...
    def new_workers(self) -> list[WorkerInfo]: ...  # workers started since the last call (replacements)
    def cancel(self) -> None: ...
    def shutdown(self) -> None: ...


# ---- events for the display ------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    total: int  # items in the file (variants included)
    done_before: int  # already done (skipped)
    todo: int
    workers: list[WorkerInfo]


@dataclass(frozen=True)
class ItemDone:
    rendered: Rendered
    worker: str


@dataclass(frozen=True)
class ItemFailed:
    item: Item
    error: str
    attempts: int
    final: bool  # False: it is tried again


@dataclass(frozen=True)
class WorkerLost:
    worker: str
    error: str


@dataclass(frozen=True)
class WorkerJoined:
    worker: WorkerInfo


@dataclass(frozen=True)
class Stopping:
    running: int  # units still running (to finish, unless cancelled)
    now: bool


@dataclass
class Summary:
    total: int
    skipped: int
    done: int = 0
    failed: int = 0
    left: int = 0  # neither done nor failed (stopped early)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    interrupted: BaseException | None = None
    per_worker: dict[str, dict] = field(default_factory=dict)


class BatchStopped(RuntimeError):
    """The run cannot go on (every worker lost); what is done stays done."""


# ---- the driver ------------------------------------------------------------------------------


class Driver:
    def __init__(self, items: Sequence[Item], folder: str | Path, executor: Executor, retries: int = 2,
                 batch_size: int = MAX_ROWS, report: Callable[[Any], None] = lambda event: None,
                 now: bool = False):
        self.items = list(items)
        self.folder = Path(folder)
        self.executor = executor
        self.retries = retries
        self.batch_size = batch_size
        self.report = report
        self.now = now
        self.pending: deque[Unit] = deque()
        self.last_key: dict[str, tuple] = {}
        self.on_key: Counter = Counter()  # running units per pipeline key
        self.busy: dict[str, tuple] = {}  # worker -> key of its running unit

    def check(self) -> None:
        """Every node's problems (missing model files, unreadable inputs), before anything runs."""
        found = self.executor.check(self.items, self.folder)
        lines = [f"{node}: {', '.join(p)}" for node, p in found.items() if p]
        if lines:
            raise BatchStopped("cannot run here: " + "; ".join(lines))

    def run(self) -> Summary:
        with FolderLock(self.folder):
            return self._run()

    def _run(self) -> Summary:
        manifest = Manifest(self.folder).load()
        done_before = [item for item in self.items if manifest.is_done(item)]
        todo = [item for item in self.items if not manifest.is_done(item)]
        summary = Summary(total=len(self.items), skipped=len(done_before))
        if not todo:
            self.report(Started(len(self.items), len(done_before), 0, []))
            return summary
        self.check()
        remove_partial_files(self.folder, self.items)  # the lock says no one else writes here
        keys = {item.id: settings_key(item) for item in todo}
        todo = with_seeds(todo)
        self.pending.extend(Unit(list(group)) for group in groups(todo, self.batch_size))
        workers = self.executor.start()
        self.report(Started(len(self.items), len(done_before), len(todo), workers))
        started = time.perf_counter()
        # The first Ctrl-C / SIGTERM is noted here and acted on at the top of the loop, not raised wherever the
        # main thread is: a KeyboardInterrupt raised inside a cluster client's wait can be lost there.
        held: list = []
        guard = contextlib.nullcontext() if getattr(self.executor, "holds_signals", False) or self.now \
            else _signals_held(held, now=False)
        with guard:
            self._loop(manifest, keys, summary, held)
        # A worker killed while it wrote an output left its temporary file (SIGKILL runs no clean-up), and a unit
        # stopped by a second Ctrl-C may have too: nothing of this run writes any more.
        remove_partial_files(self.folder, self.items)
        summary.wall_seconds = time.perf_counter() - started
        summary.left = summary.total - summary.skipped - summary.done - summary.failed
        return summary

    def _loop(self, manifest: Manifest, keys: dict, summary: Summary, held: list) -> None:
        stopping, noticed = False, 0
        while self.pending or self.executor.running():
            try:
                if len(held) > noticed:  # a signal came (see _run)
                    noticed = len(held)
                    raise KeyboardInterrupt
                if stopping and not self.executor.running():
                    break
                for info in self.executor.new_workers():
                    self.report(WorkerJoined(info))
                if not stopping:
                    if not self.executor.alive():
                        raise BatchStopped("every worker was lost; run the same command again to go on")
                    self._assign()
                for outcome in self.executor.wait(0.25):
                    self._settle(outcome, manifest, keys, summary)
            except KeyboardInterrupt as e:
                if summary.interrupted is not None or self.now:
                    summary.interrupted = summary.interrupted or e
                    self.executor.cancel()
                    self.report(Stopping(0, now=True))
                    break
                summary.interrupted = e
                stopping = True
                self.report(Stopping(self.executor.running(), now=False))

    def _candidates(self, worker: str) -> list[Unit]:
        """Pending units this worker may take: those that failed on it no more often than on any other
        worker left (a retry goes to another worker when there is one)."""
        alive = set(self.executor.idle()) | set(self.busy) | {worker}
        return [u for u in self.pending if u.failed_on[worker] <= min(u.failed_on[w] for w in alive)]

    def _assign(self) -> None:
        for worker in self.executor.idle():
            candidates = self._candidates(worker)
            if not candidates:
                continue
            key = self.last_key.get(worker)
            unit = next((u for u in candidates if u.key == key), None)
            if unit is None:  # a new model: the one the fewest workers are on, per unit left
                left = Counter(u.key for u in candidates)
                best = max(left, key=lambda k: (left[k] / (1 + self.on_key[k]), -self.on_key[k]))
                unit = next(u for u in candidates if u.key == best)
            self.pending.remove(unit)
            self.last_key[worker] = self.busy[worker] = unit.key
            self.on_key[unit.key] += 1
            self.executor.submit(worker, unit)

    def _settle(self, outcome: Outcome, manifest: Manifest, keys: dict, summary: Summary) -> None:
        key = self.busy.pop(outcome.worker, None)
        if key is not None:
            self.on_key[key] -= 1
        unit = outcome.unit
        stats = summary.per_worker.setdefault(outcome.worker, dict(items=0, audio_seconds=0.0, busy_seconds=0.0,
                                                                   failed=0))
        if outcome.rendered is not None:
            for rendered in outcome.rendered:
                manifest.append(rendered.entry(key=keys[rendered.item.id], worker=outcome.worker,
                                               attempts=unit.attempts + 1))
                summary.done += 1
                summary.audio_seconds += rendered.audio_seconds
                stats["items"] += 1
                stats["audio_seconds"] += rendered.audio_seconds
                stats["busy_seconds"] += rendered.wall_seconds
                self.report(ItemDone(rendered, outcome.worker))
            return
        error = outcome.error or "failed"
        if outcome.lost:
            self.last_key.pop(outcome.worker, None)
            self.report(WorkerLost(outcome.worker, error))
        stats["failed"] += 1
        unit.failed_on[outcome.worker] += 1
        if len(unit.items) > 1 and not outcome.lost:  # whose fault? each item alone, then
            for item in reversed(unit.items):
                self.pending.appendleft(Unit([item], unit.attempts, Counter(unit.failed_on)))
            return
        unit.attempts += 1
        final = unit.attempts > self.retries
        for item in unit.items:
            self.report(ItemFailed(item, error, unit.attempts, final))
        if not final:
            self.pending.appendleft(unit)
            return
        for item in unit.items:
            manifest.append(dict(id=item.id, line=item.line, status="failed", key=keys[item.id], error=error,
                                 attempts=unit.attempts, workers=sorted(unit.failed_on),
                                 outputs=[str(p) for p in output_paths(item, self.folder)]))
            summary.failed += 1


# ---- this process -----------------------------------------------------------------------------


class LocalExecutor:
    """One worker: this process, its models loaded once (``sa3 batch`` without ``--ray``). A unit runs in
    the main thread, with Ctrl-C and SIGTERM held back while it runs: the driver hears of them when the unit
    is done (it lets it finish); a second one (or any, with ``now``) stops the unit at once."""

    name = "local"
    holds_signals = True  # while a unit runs (the driver leaves them alone)

    def __init__(self, folder: Path, make_pipeline: Callable, weights_dir: Path | None = None, now: bool = False):
        self.folder = folder
        self.renderer = Renderer(make_pipeline)
        self.weights_dir = weights_dir
        self.now = now
        self.current: tuple[str, Unit] | None = None
        self.finished: list[Outcome] = []  # done, not yet reported (a signal came first)
        self.cancelled = False

    def start(self) -> list[WorkerInfo]:
        import os
        import socket

        from ..backend import device_name

        return [WorkerInfo(self.name, socket.gethostname(), os.getpid(), device_name())]

    def check(self, items, folder) -> dict[str, list[str]]:
        return {"this machine": problems(items, folder, self.weights_dir)}

    def idle(self) -> list[str]:
        return [] if self.current is not None or self.finished or self.cancelled else [self.name]

    def submit(self, worker: str, unit: Unit) -> None:
        self.current = (worker, unit)

    def wait(self, timeout: float) -> list[Outcome]:
        if self.finished:
            done, self.finished = self.finished, []
            return done
        if self.current is None:
            return []
        worker, unit = self.current
        held: list = []
        with _signals_held(held, self.now):
            try:
                outcome = Outcome(worker, unit, rendered=self.renderer.render(unit.items, self.folder, overwrite=True))
            except KeyboardInterrupt:  # the second signal: this unit is given up
                self.current, self.cancelled = None, True
                raise
            except BaseException as e:  # an item's fault (or memory): the driver retries or records it
                outcome = Outcome(worker, unit, error=describe_error(e))
        self.current = None
        if held:  # the unit is done; now the driver hears of the signal (and reports the unit next)
            self.finished.append(outcome)
            signum, handler = held[0]
            handler(signum, None)
            raise KeyboardInterrupt
        return [outcome]

    def running(self) -> int:
        return 0 if self.cancelled else int(self.current is not None) + len(self.finished)

    def alive(self) -> bool:
        return True

    def new_workers(self) -> list[WorkerInfo]:
        return []

    def cancel(self) -> None:
        self.cancelled = True
        self.current, self.finished = None, []

    def shutdown(self) -> None:
        pass


class _signals_held:
    """While a unit runs in the main thread: the first SIGINT/SIGTERM/SIGHUP is noted in ``held`` (signal,
    the handler it would have reached), a second one reaches its handler (which raises). Nothing changes
    outside the main thread, or with ``now``."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self, held: list, now: bool):
        self.held, self.now, self.previous = held, now, {}

    def __enter__(self):
        import signal
        import threading

        if self.now or threading.current_thread() is not threading.main_thread():
            return self
        for name in self.NAMES:
            if not hasattr(signal, name):
                continue
            number = getattr(signal, name)
            previous = signal.getsignal(number)
            if not callable(previous):
                continue  # ignored or default: left as it is

            def hold(signum, frame, previous=previous):
                if self.held:
                    previous(signum, frame)
                self.held.append((signum, previous))

            self.previous[number] = previous
            signal.signal(number, hold)
        return self

    def __exit__(self, *exc):
        import signal

        for number, previous in self.previous.items():
            signal.signal(number, previous)


def describe_error(e: BaseException) -> str:
    """One line for a failure: the messages the CLI shows for its own errors."""
    from ..settings import SettingsError, api_name

    if isinstance(e, SettingsError):
        return e.message(api_name)
    if isinstance(e, MemoryError):
        return "out of memory"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError, RuntimeError)) else f"{type(e).__name__}: {text}"


__all__ = ["BatchStopped", "Driver", "Executor", "ItemDone", "ItemFailed", "LocalExecutor", "Outcome", "Started",
           "Stopping", "Summary", "Unit", "WorkerInfo", "WorkerJoined", "WorkerLost", "describe_error"]
