"""The studio's ASGI app: the page (static files shipped in the package) and the HTTP API under ``/api``.

Every request passes :class:`Guard` first: the API key (when one is set) and a
bound on the request body. Handlers answer errors as JSON ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__, hub
from ..audio import FORMATS, read_metadata
from ..cli.generate import DTYPES
from .jobs import ACTIVE, QueueFull, Studio
from .openapi import openapi_spec
from .settings import DEFAULTS, BadRequest, parse_settings

STATIC_DIR = Path(__file__).parent / "static"
STREAM_POLL_S = 0.1
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac"}


class TooLarge(BadRequest):
    """A body over its bound (413)."""


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: checks the API key on every request and bounds request bodies.

    The key is accepted as ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or a
    ``key`` query parameter (what an ``<audio src>`` or a first page load can send).
    """

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    def _authorized(self, scope) -> bool:
        if self.api_key is None:
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        candidates = [headers.get("x-api-key", "")]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            candidates.append(auth[7:].strip())
        from urllib.parse import parse_qs

        candidates += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [])
        return any(hmac.compare_digest(c.encode(), self.api_key.encode()) for c in candidates if c)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            response = error(401, "missing or wrong API key (send Authorization: Bearer KEY or X-API-Key)",
                             {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            response = error(413, f"request body over {self.max_body} bytes")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes even when sent without a Content-Length."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def public_job(record: dict, base: str = "/api/jobs") -> dict:
    """A job as the API shows it: outputs with their URLs, never server paths."""
    record = dict(record)
    outputs = []
    for o in record.get("outputs", []):
        o = {k: v for k, v in o.items() if k != "file"}
        o["url"] = f"{base}/{record['id']}/outputs/{o['index']}"
        o["metadata_url"] = o["url"] + "/metadata"
        outputs.append(o)
    record["outputs"] = outputs
    return record


def build_app(studio: Studio, api_key: str | None = None) -> Starlette:
    limits = studio.limits

    def job_or_404(job_id: str):
        record = studio.get(job_id)
        return record if record is not None else None

    async def health(request: Request):
        return JSONResponse(dict(status="ok", version=__version__, queued=studio.queue.qsize(),
                                 queue_size=studio.queue.maxsize,
                                 model_loaded=studio._pipeline_key[0] if studio.pipeline else None))

    async def options(request: Request):
        return JSONResponse(dict(models=list(hub.MODELS), decoders=list(hub.CODECS),
                                 default_decoders={m: spec.codec for m, spec in hub.MODELS.items()},
                                 formats=list(FORMATS), dtypes=list(DTYPES), defaults=DEFAULTS,
                                 limits=limits.public()))

    async def spec(request: Request):
        return JSONResponse(openapi_spec(limits))

    async def submit(request: Request):
        try:
            body = await read_body(request, limits.max_json_bytes)
            try:
                data = json.loads(body or b"null")
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the request body is not valid JSON ({e})") from None
            settings = parse_settings(data, limits)
            job = studio.submit(settings)
        except TooLarge as e:
            return error(413, str(e))
        except BadRequest as e:
            return error(400, str(e))
        except QueueFull as e:
            return error(429, str(e), {"Retry-After": str(e.retry_after)})
        record = studio.get(job.id)
        return JSONResponse(public_job(record), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})

    async def list_jobs(request: Request):
        try:
            limit = min(max(int(request.query_params.get("limit", 50)), 1), 500)
            offset = max(int(request.query_params.get("offset", 0)), 0)
        except ValueError:
            return error(400, "limit and offset must be whole numbers")
        text = request.query_params.get("q", "")[: limits.max_prompt_chars]
        records, total = studio.history.search(text, limit, offset)
        # Jobs still in flight: show their live state rather than the row written at submission.
        records = [studio.get(r["id"]) if r["status"] in ACTIVE else r for r in records]
        return JSONResponse(dict(jobs=[public_job(r) for r in records if r], total=total))

    async def get_job(request: Request):
        record = job_or_404(request.path_params["job_id"])
        if record is None:
            return error(404, "no such job")
        return JSONResponse(public_job(record))

    async def events(request: Request):
        """Server-sent events: the job's state on every change, until it ends."""
        job_id = request.path_params["job_id"]
        if studio.get(job_id) is None:
            return error(404, "no such job")

        async def stream():
            last = None
            while True:
                record = studio.get(job_id)
                if record is None:
                    return
                snapshot = json.dumps(public_job(record))
                if snapshot != last:
                    last = snapshot
                    yield f"event: job\ndata: {snapshot}\n\n"
                if record["status"] not in ACTIVE:
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(STREAM_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def cancel(request: Request):
        record = studio.cancel(request.path_params["job_id"])
        if record is None:
            return error(404, "no such job")
        return JSONResponse(public_job(record))

    async def delete(request: Request):
        try:
            deleted = await run_in_threadpool(studio.delete, request.path_params["job_id"])
        except BadRequest as e:
            return error(409, str(e))
        return Response(status_code=204) if deleted else error(404, "no such job")

    def output_file(request: Request) -> Path | None:
        return studio.output_path(request.path_params["job_id"], request.path_params["index"])

    async def get_output(request: Request):
        path = output_file(request)
        if path is None:
            return error(404, "no such output (the job may not be done yet)")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=path.name)

    async def get_metadata(request: Request):
        path = output_file(request)
        if path is None:
            return error(404, "no such output (the job may not be done yet)")
        record = studio.get(request.path_params["job_id"])
        output = public_job(record)["outputs"][request.path_params["index"]]
        return JSONResponse(dict(metadata=await run_in_threadpool(read_metadata, path),
                                 levels={k: v for k, v in output.items() if k not in ("peaks", "url", "metadata_url")},
                                 job=record["id"]))

    async def upload(request: Request):
        try:
            data = await read_body(request, limits.max_upload_bytes)
            if not data:
                raise BadRequest("the upload is empty (send the audio file as the request body)")
            return JSONResponse(await run_in_threadpool(studio.add_upload, data), status_code=201)
        except TooLarge as e:
            return error(413, str(e))
        except BadRequest as e:
            return error(400, str(e))

    routes = [
        Route("/api/health", health),
        Route("/api/options", options),
        Route("/api/openapi.json", spec),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}", delete, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/events", events),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id}/outputs/{index:int}", get_output),
        Route("/api/jobs/{job_id}/outputs/{index:int}/metadata", get_metadata),
        Route("/api/uploads", upload, methods=["POST"]),
        Mount("/", StaticFiles(directory=STATIC_DIR, html=True)),
    ]

    async def not_found(request: Request, exc):
        return error(getattr(exc, "status_code", 404), getattr(exc, "detail", "not found"))

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.studio = studio
    # The body bound at the door is the largest any route takes; each route applies its own.
    return Guard(app, api_key, max(limits.max_upload_bytes, limits.max_json_bytes))
