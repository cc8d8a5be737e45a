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
import random
import secrets
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import __version__, hub
from ..audio import FORMATS, SAMPLE_RATE, AudioError, read_audio, write_audio_files
from ..hub import WeightsUnavailable
from .history import History
from .settings import ID_PATTERN, BadRequest, Limits

PEAK_BUCKETS = 800  # waveform resolution sent to the page
ACTIVE = ("queued", "running")
# The stage a run is in once the named stage has ended (the pipeline reports ends only).
NEXT_STAGE = {
    "load text encoder": "loading DiT",
    "load DiT": "text encoding",
    "load encoder": "encoding init audio",
    "init audio encoding": "sampling",
    "sampling": "decoding",
    "load decoder": "decoding",
    "decoding": "writing",
}


class JobCancelled(Exception):
    pass


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
    settings: dict
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
        return dict(self.record(), stage=self.stage, step=self.step, steps=self.steps, started=self.started)


class Studio:
    """The job queue, its worker, the uploads and the history of one output folder."""

    def __init__(self, output_dir: str | Path, weights_dir: str | Path | None = None,
                 limits: Limits | None = None, queue_size: int = 8):
        self.output_dir = Path(output_dir).resolve()
        self.uploads_dir = self.output_dir / "uploads"
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.weights_dir = weights_dir
        self.limits = limits or Limits()
        self.history = History(self.output_dir / "history.sqlite3")
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.jobs: dict[str, Job] = {}  # queued and running jobs (finished ones live in the history)
        self.pipeline = None
        self._pipeline_key: tuple | None = None  # (model, codec, dtype) of the loaded pipeline
        self.stopping = False  # set by close(): jobs cut short say why
        self.durations: list[float] = []  # of recent jobs, for Retry-After
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="sa3-studio-worker", daemon=True)
        self._worker.start()

    @property
    def loaded_model(self) -> str | None:
        return self._pipeline_key[0] if self.pipeline is not None and self._pipeline_key else None

    # ---- jobs ------------------------------------------------------------------------
    def submit(self, settings: dict) -> Job:
        settings = dict(settings)
        if settings["seed"] is None:
            settings["seed"] = random.randint(0, 2**31 - 1)
        self._check_init_audio(settings["init_audio"])
        job = Job(new_id(), settings)
        with self._lock:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(self.retry_after()) from None
            self.jobs[job.id] = job
            self.history.save(job.record())
        return job

    def retry_after(self) -> int:
        recent = self.durations[-10:]
        average = sum(recent) / len(recent) if recent else 5.0
        return max(1, min(600, math.ceil(average * (self.queue.qsize() + 1))))

    def get(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        if job is not None:
            return self._with_position(job)
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
        upload_id = new_id()
        path = self.uploads_dir / f"{upload_id}.audio"
        fd, tmp = tempfile.mkstemp(prefix=".upload.", suffix=".part", dir=self.uploads_dir)
        try:
            with open(fd, "wb") as f:
                f.write(data)
            try:
                audio = read_audio(tmp)
            except AudioError as e:
                # The message names the temporary file (a server path): name the upload instead.
                raise BadRequest(str(e).replace(f"'{tmp}'", "the upload").replace(tmp, "uploaded file")) from None
            Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dict(id=upload_id, seconds=audio.shape[1] / SAMPLE_RATE, peaks=waveform_peaks(audio))

    def _init_audio_path(self, init_audio: dict) -> Path:
        if "upload" in init_audio:
            path = self.uploads_dir / f"{init_audio['upload']}.audio"
            if not path.is_file():
                raise BadRequest(f"init_audio: no upload {init_audio['upload']}")
            return path
        path = self.output_path(init_audio["job"], init_audio["output"])
        if path is None:
            raise BadRequest(f"init_audio: job {init_audio['job']} has no finished output {init_audio['output']}")
        return path

    def _check_init_audio(self, init_audio: dict | None) -> None:
        if init_audio is not None:
            self._init_audio_path(init_audio)

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
        with self._lock:
            job.update(status=status, stage=status, error=error, finished=time.time())
            self.history.save(job.record())
            self.jobs.pop(job.id, None)

    def _get_pipeline(self, settings: dict):
        import mlx.core as mx

        from ..pipeline import Pipeline

        dtype = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}.get(settings["dit_dtype"])
        key = (settings["model"], settings["decoder"] or hub.MODELS[settings["model"]].codec, settings["dit_dtype"])
        if self.pipeline is None or self._pipeline_key != key:
            if self.pipeline is not None:
                self.pipeline.free()
            self.pipeline = None  # drop the old models before loading new ones
            self.pipeline = Pipeline(settings["model"], settings["decoder"], weights_dir=self.weights_dir,
                                     dit_dtype=dtype, progress=False)
            self._pipeline_key = key
        return self.pipeline

    def _run(self, job: Job) -> None:
        from ..cli.generate import finish_output

        s = job.settings
        init_audio = read_audio(self._init_audio_path(s["init_audio"])) if s["init_audio"] else None
        pipe = self._get_pipeline(s)
        plan = pipe.plan(s["prompt"], s["seconds"], init_audio, s["inpaint"], s["init_noise_level"])
        warnings = list(plan.warnings)
        if s["negative_prompt"] is not None and s["cfg"] == 1:
            warnings.append("negative_prompt is ignored while cfg is 1 (guidance off)")
        job.update(warnings=warnings, steps=s["steps"], stage="loading models")

        def on_stage(stats) -> None:
            if job.cancel_requested.is_set():
                raise JobCancelled()
            job.update(stage=NEXT_STAGE.get(stats.name, "preparing"))

        def on_step(done: int, total: int) -> None:
            if job.cancel_requested.is_set():
                raise JobCancelled()
            job.update(stage="sampling", step=done, steps=total)

        pipe.on_stage = on_stage
        try:
            result = pipe.generate(
                s["prompt"], negative_prompt=s["negative_prompt"], seconds=s["seconds"], steps=s["steps"],
                seed=s["seed"], cfg=s["cfg"], apg=s["apg"], init_audio=init_audio,
                init_noise_level=s["init_noise_level"], inpaint=s["inpaint"], batch=s["num_outputs"],
                on_step=on_step, free_models=s["free_models"],
            )
        finally:
            pipe.on_stage = None
        job.update(stage="writing")

        collected: list[str] = []
        warner = SimpleNamespace(warn=collected.append)
        args = SimpleNamespace(loudness=s["loudness"], format=s["format"])
        suffix = FORMATS[s["format"]][2]
        files, outputs = [], []
        for i, audio in enumerate(result.audio):
            name = f"{job.id}_{i + 1}{suffix}"
            audio, levels = finish_output(audio, args, name, warner)
            seed = s["seed"] + i
            # Like the CLI: each file records the single run that reproduces it.
            meta = dict(result.settings, seed=seed, batch=1, version=__version__, format=s["format"],
                        loudness=s["loudness"], init_audio=_describe(s["init_audio"]), job=job.id)
            files.append((self.output_dir / name, audio, meta))
            outputs.append(dict(index=i, seed=seed, file=name, peaks=waveform_peaks(audio), **levels))
        write_audio_files(files, SAMPLE_RATE, s["format"])
        job.update(outputs=outputs, warnings=warnings + collected,
                   settings=dict(s, mode=result.settings["mode"], codec=result.settings["codec"],
                                 init_noise_level_used=result.settings["init_noise_level"]))

    def close(self) -> None:
        self.stopping = True
        for job in list(self.jobs.values()):
            job.cancel_requested.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self._worker.join(timeout=10)
        self.history.close()


def _describe(init_audio: dict | None) -> str | None:
    if init_audio is None:
        return None
    if "upload" in init_audio:
        return f"upload {init_audio['upload']}"
    return f"job {init_audio['job']} output {init_audio['output']}"
