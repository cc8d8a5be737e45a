"""Jobs: a bounded queue, one worker thread, one resident pipeline.

Jobs run one at a time (the models fill the memory; two at once would only
contend). The pipeline stays loaded between jobs and is replaced when a job asks
for another model, decoder or dtype. Cancelling sets a flag that the pipeline's
step and stage callbacks check, so a running job stops at the next step. Any
error in a job fails that job with its message; the worker carries on.
"""

from __future__ import annotations

import math
import queue
import re
import secrets
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import sqlite3

import numpy as np

from .. import output
from ..audio import FORMATS, SAMPLE_RATE, AudioError, honour_umask, read_audio, spectrogram
from ..hub import WeightsUnavailable
from ..settings import MODEL_DEFAULT, SettingsError, audio_reference, check_sampler, draw_seed
from .history import History
from .settings import ID_PATTERN, BadRequest, Limits, api_settings

PEAK_BUCKETS = 800  # waveform resolution sent to the page
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # adapter names a request may use: no path separators
ACTIVE = ("queued", "running")


class JobCancelled(Exception):
    pass


class StorageError(Exception):
    """The output folder or the history database cannot take what must be written (a full disk, ...): 507."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the job queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


def new_id() -> str:
    return secrets.token_hex(8)


def waveform_peaks(audio: np.ndarray, buckets: int = PEAK_BUCKETS) -> list[float]:
    """Largest absolute sample (both channels) per bucket: what the page draws."""
    mono = np.abs(np.asarray(audio, dtype=np.float32)).max(axis=0)
    if mono.size == 0:
        return []
    buckets = min(buckets, mono.size)
    edges = np.linspace(0, mono.size, buckets + 1).astype(int)
    return [round(float(v), 4) for v in np.maximum.reduceat(mono, edges[:-1])]


@dataclass
class Job:
    id: str
    settings: dict  # as the API spells them (api_settings), plus what the run decided once done
    request: object = None  # the checked GenerationSettings it runs
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued, running, done, failed, cancelled
    stage: str = "queued"
    step: int = 0
    steps: int = 0
    started: float | None = None
    finished: float | None = None
    outputs: list = field(default_factory=list)
    error: str | None = None
    warnings: list = field(default_factory=list)
    preview: dict | None = None  # the live preview: step, spectrogram and the decode's seconds
    version: int = 0  # bumped on every change, so progress streams know when to send
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def update(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self, k, v)
        self.version += 1

    def record(self) -> dict:
        return dict(id=self.id, created=self.created, finished=self.finished, status=self.status,
                    settings=self.settings, outputs=self.outputs, error=self.error, warnings=self.warnings)

    def live(self) -> dict:
        return dict(self.record(), stage=self.stage, step=self.step, steps=self.steps, started=self.started,
                    preview=self.preview)


class Studio:
    """The job queue, its worker, the uploads and the history of one output folder."""

    def __init__(self, output_dir: str | Path, weights_dir: str | Path | None = None,
                 limits: Limits | None = None, queue_size: int = 8,
                 upload_hours: float = 24.0, upload_budget_bytes: int = 1 << 30, preview_every: int = 0,
                 lora_dir: str | Path | None = None, quantize: str | None = None,
                 quantize_group_size: str | None = None):
        self.output_dir = Path(output_dir).resolve()
        self.lora_dir = None if lora_dir is None else Path(lora_dir).resolve()  # adapters jobs may name
        self.uploads_dir = self.output_dir / "uploads"
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.weights_dir = weights_dir
        # The server's --quantize (settings words, "4"): every job's DiT is quantized so (not a job's choice).
        self.quantize, self.quantize_group_size = quantize, quantize_group_size
        self.preview_every = preview_every  # live previews every N steps (0: none)
        self.limits = limits or Limits()
        self.upload_seconds = upload_hours * 3600.0  # uploads older than this are removed
        self.upload_budget_bytes = upload_budget_bytes  # and the oldest go once all of them pass this
        self.history = History(self.output_dir / "history.sqlite3")
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.jobs: dict[str, Job] = {}  # queued and running jobs (finished ones live in the history)
        self._unsaved: dict[str, Job] = {}  # finished jobs the history could not take (a full disk)
        self.prune_uploads()
        self.pipeline = None
        self.stopping = False  # set by close(): jobs cut short say why
        self.durations: list[float] = []  # of recent jobs, for Retry-After
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="sa3-studio-worker", daemon=True)
        self._worker.start()

    @property
    def loaded_model(self) -> str | None:
        return self.pipeline.model_name if self.pipeline is not None else None

    # ---- jobs ------------------------------------------------------------------------
    def submit(self, settings) -> Job:
        """Queue a job for checked settings (:func:`.settings.parse_settings`); a seed is drawn when none was given.

        The job is in the history before it is queued: a failure to write it leaves nothing behind.
        """
        settings = settings.replace(seed=draw_seed() if settings.seed is None else settings.seed,
                                    format=output.resolve_format(settings.format, None))
        self._check_for_model(settings)
        self.lora_paths(settings.loras)  # every named adapter exists (a name, never a path)
        if settings.init_audio is not None:
            self._init_audio_path(settings.init_audio)
        job = Job(new_id(), api_settings(settings), settings)
        with self._lock:
            if self.queue.full():
                raise QueueFull(self.retry_after())
            try:
                self.history.save(job.record())
            except (sqlite3.Error, OSError) as e:
                raise StorageError(f"the job could not be recorded ({e}); nothing was queued") from None
            self.jobs[job.id] = job
            self.queue.put_nowait(job)  # only this lock's holder puts: there is room
        return job

    def _check_for_model(self, settings) -> None:
        """What only the model decides (its samplers), refused now rather than when the job runs.
        Opening an official model's source reads no file."""
        from ..sources import open_source

        if settings.sampler == MODEL_DEFAULT:
            return
        source = open_source(settings.model_name, self.weights_dir, progress=False)
        try:
            check_sampler(settings.sampler, source.defaults.objective, source.name)
        except SettingsError as e:
            raise BadRequest(str(e)) from None

    def retry_after(self) -> int:
        recent = self.durations[-10:]
        average = sum(recent) / len(recent) if recent else 5.0
        return max(1, min(600, math.ceil(average * (self.queue.qsize() + 1))))

    def get(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        if job is not None:
            return self._with_position(job)
        if job_id in self._unsaved:
            return self._unsaved[job_id].live()
        return self.history.get(job_id) if ID_PATTERN.fullmatch(job_id) else None

    def _with_position(self, job: Job) -> dict:
        live = job.live()
        if job.status == "queued":
            with self.queue.mutex:
                waiting = [j for j in self.queue.queue if j is not None]
            live["queue_position"] = next((i for i, j in enumerate(waiting) if j is job), 0)
        return live

    def cancel(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        if job is None:
            return self.get(job_id)  # already finished: nothing to cancel
        with self._lock:
            job.cancel_requested.set()
            queued = job.status == "queued"
        if queued:  # the worker will skip it; a running job stops at its next step
            self._finish(job, "cancelled", error="cancelled before it started")
        return self._with_position(job) if job.id in self.jobs else job.live()

    def delete(self, job_id: str) -> bool:
        if job_id in self.jobs:
            raise BadRequest("the job is still queued or running; cancel it first")
        record = self.history.get(job_id) if ID_PATTERN.fullmatch(job_id) else None
        if record is None:
            return False
        for output in record["outputs"]:
            (self.output_dir / output["file"]).unlink(missing_ok=True)
        return self.history.delete(job_id)

    def output_path(self, job_id: str, index: int) -> Path | None:
        """The file of output ``index`` of a finished job; names come from the history, never the request."""
        record = self.get(job_id)
        if record is None or record["status"] != "done" or not 0 <= index < len(record["outputs"]):
            return None
        path = self.output_dir / record["outputs"][index]["file"]
        return path if path.is_file() else None

    # ---- uploads ----------------------------------------------------------------------
    def add_upload(self, data: bytes) -> dict:
        """Decode an uploaded file as the CLI does (any libsndfile format, resampled, mono or stereo)."""
        if len(data) > self.upload_budget_bytes:
            raise BadRequest(f"the upload is larger than the server keeps for all uploads ({self.upload_budget_bytes} bytes)")
        self.prune_uploads(room=len(data))
        upload_id = new_id()
        path = self.uploads_dir / f"{upload_id}.audio"
        tmp = None
        try:
            try:
                fd, tmp = tempfile.mkstemp(prefix=".upload.", suffix=".part", dir=self.uploads_dir)
                with open(fd, "wb") as f:
                    f.write(data)
            except OSError as e:
                raise StorageError(f"the upload could not be stored ({e.strerror or e})") from None
            try:
                audio = read_audio(tmp)
            except AudioError as e:
                # The message names the temporary file (a server path): name the upload instead.
                raise BadRequest(str(e).replace(f"'{tmp}'", "the upload").replace(tmp, "uploaded file")) from None
            honour_umask(tmp)
            Path(tmp).replace(path)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return dict(id=upload_id, seconds=audio.shape[1] / SAMPLE_RATE, peaks=waveform_peaks(audio))

    def prune_uploads(self, room: int = 0) -> None:
        """Remove uploads past their lifetime, then the oldest until ``room`` more bytes fit the budget.
        Uploads that a queued or running job will read are kept."""
        in_use = {audio_reference(j.request.init_audio).get("upload") for j in list(self.jobs.values())
                  if j.request is not None and j.request.init_audio}
        now = time.time()
        files = []
        for path in self.uploads_dir.glob("*.audio"):
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.stem in in_use:
                continue
            if now - stat.st_mtime > self.upload_seconds:
                path.unlink(missing_ok=True)
            else:
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files) + room
        for _, size, path in sorted(files):
            if total <= self.upload_budget_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def _init_audio_path(self, reference: str) -> Path:
        """The file behind an ``upload:ID`` / ``job:ID:N`` reference (ids only, never request paths)."""
        init_audio = audio_reference(reference)
        if "upload" in init_audio:
            path = self.uploads_dir / f"{init_audio['upload']}.audio"
            if not path.is_file():
                raise BadRequest(f"init_audio: no upload {init_audio['upload']}")
            return path
        path = self.output_path(init_audio["job"], init_audio["output"])
        if path is None:
            raise BadRequest(f"init_audio: job {init_audio['job']} has no finished output {init_audio['output']}")
        return path

    # ---- the worker -------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                self._work_on(job)
            except Exception:  # e.g. the history cannot be written: report it, keep the worker alive
                traceback.print_exc()

    def _work_on(self, job: Job) -> None:
        with self._lock:  # against a cancel arriving just now: the job either starts or is skipped
            start = not job.cancel_requested.is_set() and job.id in self.jobs
            if start:
                job.update(status="running", stage="preparing", started=time.time())
        if not start:
            if job.id in self.jobs:
                reason = "the server stopped" if self.stopping else "cancelled before it started"
                self._finish(job, "cancelled", error=reason)
            return
        started = time.perf_counter()
        try:
            self._run(job)
            self._finish(job, "done")
        except JobCancelled:
            self._finish(job, "cancelled", error="cancelled: the server stopped" if self.stopping else "cancelled")
        except (BadRequest, AudioError, WeightsUnavailable, ValueError) as e:  # messages written for users
            self._finish(job, "failed", error=str(e))
        except MemoryError:
            self.pipeline = None  # start the next job from a clean slate
            self._finish(job, "failed", error="out of memory (try shorter seconds or fewer outputs)")
        except Exception as e:  # a crash fails this job only; the server keeps serving
            traceback.print_exc()
            self.pipeline = None
            self._finish(job, "failed", error=f"{type(e).__name__}: {e}")
        self.durations.append(time.perf_counter() - started)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        """A job's end, once (a stop that outwaited the job may have recorded it already)."""
        with self._lock:
            if self.jobs.pop(job.id, None) is None:
                return
            job.update(status=status, stage=status, error=error, finished=time.time())
            try:
                self.history.save(job.record())
            except (sqlite3.Error, OSError) as e:  # a full disk: the job's end is still known while we run
                job.update(warnings=job.warnings + [f"the history could not record this job's end ({e})"])
                self._unsaved[job.id] = job

    def lora_names(self) -> list[str]:
        """The adapters a job may name: the ``.safetensors`` files of ``--lora-dir``, by file name without it."""
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return []
        return sorted(p.stem for p in self.lora_dir.glob("*.safetensors") if LORA_NAME.fullmatch(p.stem))

    def lora_paths(self, specs) -> tuple[str, ...]:
        """Specs naming adapters of ``--lora-dir`` (``NAME[:S][@LO-HI][;...]``) -> the same specs with their files."""
        resolved = []
        for spec in specs:
            match = LORA_NAME.match(spec)
            name = match.group(0) if match else ""
            rest = spec[len(name):]
            if not name or (rest and rest[0] not in ":@;"):
                raise BadRequest(f"loras: {spec!r} must start with an adapter's name (letters, digits, . _ -)")
            if self.lora_dir is None:
                raise BadRequest("loras: this server has no adapters (start it with --lora-dir DIR)")
            path = self.lora_dir / f"{name.removesuffix('.safetensors')}.safetensors"
            if not path.is_file():
                known = ", ".join(self.lora_names()) or "none"
                raise BadRequest(f"loras: no adapter named {name!r} in the server's --lora-dir (it has: {known})")
            resolved.append(f"{path}{rest}")
        return tuple(resolved)

    def _get_pipeline(self, settings):
        """The resident pipeline for ``settings``: reused when only its adapters differ (set in place, the
        base model is not read again), else replaced (the old models are dropped before the new load)."""
        from ..pipeline import Pipeline

        wanted = settings.replace(loras=self.lora_paths(settings.loras), quantize=self.quantize,
                                  quantize_group_size=self.quantize_group_size)
        if self.pipeline is not None:
            probe = Pipeline.from_settings(wanted.replace(loras=()), weights_dir=self.weights_dir, progress=False)
            if probe.base_key() == self.pipeline.base_key():
                self.pipeline.set_loras(wanted.loras)
                return self.pipeline
            self.pipeline.free()
            self.pipeline = None
        self.pipeline = Pipeline.from_settings(wanted, weights_dir=self.weights_dir, progress=False)
        return self.pipeline

    def _run(self, job: Job) -> None:
        from ..pipeline import SAMPLING, Finished, Preview, StageStarted, Step

        s = job.request
        init_audio = read_audio(self._init_audio_path(s.init_audio)) if s.init_audio else None
        pipe = self._get_pipeline(s)
        plan = pipe.plan(s, init_audio)
        job.update(warnings=list(plan.warnings), steps=pipe.resolve(s).steps, stage="loading models")

        result = None
        events = pipe.run(s, init_audio, preview_every=self.preview_every)
        try:
            for event in events:
                if job.cancel_requested.is_set():
                    raise JobCancelled()  # stops the run at this step (closing the generator below)
                if isinstance(event, Step):
                    job.update(stage=SAMPLING, step=event.done, steps=event.total)
                elif isinstance(event, Preview):
                    job.update(preview=dict(step=event.done, steps=event.total, seconds=round(event.seconds, 4),
                                            spectrogram=spectrogram(event.audio)))
                elif isinstance(event, StageStarted) and event.name != SAMPLING:  # sampling shows with its steps
                    job.update(stage=event.name)
                elif isinstance(event, Finished):
                    result = event.result
        finally:
            events.close()
        job.update(stage="writing")

        suffix = FORMATS[s.format][2]
        paths = [self.output_dir / f"{job.id}_{i + 1}{suffix}" for i in range(len(result.audio))]
        # The files record the adapters by the names the request used, not the server's paths.
        written = output.write(result, paths, s.format, s.loudness, job=job.id, loras=list(s.loras))
        outputs = []
        for i, o in enumerate(written.outputs):
            outputs.append(dict(index=i, seed=o.seed, file=o.path.name, peaks=waveform_peaks(o.audio),
                                spectrogram=spectrogram(o.audio), **o.levels))
        done = result.settings
        job.update(outputs=outputs, warnings=job.warnings + written.warnings,
                   settings=dict(job.settings, mode=result.plan.mode, codec=pipe.codec_name,
                                 init_noise_level_used=done.init_noise_level, steps_used=done.steps,
                                 cfg_used=done.cfg, sampler_used=done.sampler))

    def close(self, timeout: float = 30.0) -> None:
        """Stop: queued jobs are cancelled now, a running one at its next step; the history records both."""
        self.stopping = True
        for job in list(self.jobs.values()):
            job.cancel_requested.set()
        while True:  # jobs still waiting never start
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.id in self.jobs:
                self._finish(job, "cancelled", error="cancelled: the server stopped")
        self.queue.put(None)  # there is room now: the worker ends after the running job
        self._worker.join(timeout=timeout)
        for job in list(self.jobs.values()):  # a job that did not stop in time
            self._finish(job, "cancelled", error="cancelled: the server stopped")
        self.history.close()
