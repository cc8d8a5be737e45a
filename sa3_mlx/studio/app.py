"""The studio's ASGI app: the page (static files shipped in the package) and the HTTP API under ``/api``.

Every request passes :class:`Guard` first: the API key (when one is set) and a
bound on the request body. Handlers answer errors as JSON ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__, hub
from ..audio import FORMATS, read_metadata
from ..settings import DTYPES, MAX_PROMPT_CHARS, SAMPLERS, describe
from ..batch import BatchError, parse_lines
from .jobs import ACTIVE, QueueFull, StorageError, Studio
from .openapi import openapi_spec
from .settings import BadRequest, parse_settings

STATIC_DIR = Path(__file__).parent / "static"


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
STREAM_POLL_S = 0.1
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
KEY_COOKIE = "sa3_studio_key"
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
               ".opus": "audio/ogg"}


class TooLarge(BadRequest):
    """A body over its bound (413)."""


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def refusal(e: Exception) -> JSONResponse:
    """The answer to a request refused for a reason its message gives: a body over its bound 413, a bad
    setting 400, a full queue 429 (with Retry-After), storage that cannot take it 507."""
    if isinstance(e, TooLarge):
        return error(413, str(e))
    if isinstance(e, QueueFull):
        return error(429, str(e), {"Retry-After": str(e.retry_after)})
    if isinstance(e, StorageError):
        return error(507, str(e))
    return error(400, str(e))


class Guard:
    """ASGI middleware: on every request, the Host and Origin, the API key, and a bound on the body.

    The key is accepted as ``Authorization: Bearer KEY``, ``X-API-Key: KEY``, a ``key``
    query parameter (opening the page as ``/?key=KEY``), or the same-site cookie that
    such a request sets.
    """

    def __init__(self, app, api_key: str | None, max_body: int, loopback_only: bool = True):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body
        self.loopback_only = loopback_only

    def _refusal(self, method: str, headers: dict) -> str | None:
        """Why a request from a browser on another site must not act here (None: it may).

        Bound to loopback, only loopback host names are served (a DNS-rebound name is not).
        A state-changing request whose Origin is not this server is refused: web pages on other
        sites could otherwise submit, cancel or delete jobs through the visitor's browser.
        """
        host = headers.get("host", "")
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:  # a Host header that is not a host
            name = None
        if self.loopback_only and not is_loopback(name or ""):
            return f"host {host!r} is not served: use http://127.0.0.1 or http://localhost"
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc != host:
            return f"cross-origin request from {origin} refused"
        return None

    def _key_source(self, scope, headers: dict) -> str | None:
        """Where a valid key came from ("header", "query" or "cookie"); None when none did."""
        candidates = [("header", headers.get("x-api-key", ""))]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            candidates.append(("header", auth[7:].strip()))
        candidates += [("query", k) for k in parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [])]
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except CookieError:
            pass
        if KEY_COOKIE in cookie:
            candidates.append(("cookie", cookie[KEY_COOKIE].value))
        for source, key in candidates:
            if key and hmac.compare_digest(key.encode(), self.api_key.encode()):
                return source
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["method"], headers)
        if refusal is not None:
            return await error(403, refusal)(scope, receive, send)
        if self.api_key is not None:
            source = self._key_source(scope, headers)
            if source is None:
                response = error(401, "missing or wrong API key (send Authorization: Bearer KEY or X-API-Key)",
                                 {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
            if source == "query":
                # The page opened as /?key=KEY: a same-site cookie then carries the key for what the
                # page loads itself (its script and style, <audio> sources, the event stream).
                send = self._setting_cookie(send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            response = error(413, f"request body over {self.max_body} bytes")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _setting_cookie(self, send):
        cookie = f"{KEY_COOKIE}={self.api_key}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", cookie)])
            await send(message)

        return send_with_cookie


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


def build_app(studio: Studio, api_key: str | None = None, loopback_only: bool = True) -> Starlette:
    limits = studio.limits

    async def health(request: Request):
        return JSONResponse(dict(status="ok", version=__version__, queued=studio.queue.qsize(),
                                 queue_size=studio.queue.maxsize,
                                 model_loaded=studio.loaded_model))

    async def options(request: Request):
        fields = describe("api", limits.bounds())
        return JSONResponse(dict(models=list(hub.MODELS), decoders=list(hub.CODECS),
                                 default_decoders={m: spec.codec for m, spec in hub.MODELS.items()},
                                 formats=list(FORMATS), dtypes=list(DTYPES), samplers=list(SAMPLERS),
                                 defaults={f["name"]: f["default"] for f in fields}, fields=fields,
                                 loras=studio.lora_names(), limits=limits.public()))

    async def spec(request: Request):
        return JSONResponse(openapi_spec(limits))

    async def submit(request: Request):
        try:
            body = await read_body(request, limits.max_json_bytes)
            try:
                data = json.loads(body or b"null")
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the request body is not valid JSON ({e})") from None
            except RecursionError:
                raise BadRequest("the request body nests too deeply (settings are a flat JSON object)") from None
            settings = parse_settings(data, limits)
            job = studio.submit(settings)
        except (BadRequest, QueueFull, StorageError) as e:
            return refusal(e)
        record = studio.get(job.id)
        return JSONResponse(public_job(record), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})

    async def submit_list(request: Request):
        """A prompt list: ``{"text": FILE_TEXT, "defaults": {settings}}`` -> one job per item, every line
        checked first (all bad lines in one 400); queued when the queue has room for every item."""
        try:
            body = await read_body(request, limits.max_json_bytes * 8)
            try:
                data = json.loads(body or b"null")
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise BadRequest("the request body must be JSON: {\"text\": ..., \"defaults\": {...}}") from None
            if not isinstance(data, dict) or not isinstance(data.get("text"), str) or set(data) - {"text", "defaults"}:
                raise BadRequest('the request body must be {"text": the prompt list, "defaults": {settings}}')
            defaults = data.get("defaults")
            defaults = {} if defaults is None else defaults
            if not isinstance(defaults, dict):
                raise BadRequest("defaults must be a JSON object of settings")
            try:
                lines = parse_lines(data["text"])
            except BatchError as e:
                raise BadRequest(f"the prompt list {e}") from None
            if len(lines) > studio.queue.maxsize:
                raise BadRequest(f"the prompt list has {len(lines)} items; the queue holds {studio.queue.maxsize}")
            items, errors = [], []
            for number, item in lines:
                try:
                    if isinstance(item, BatchError):
                        raise BadRequest(str(item))
                    item.pop("id", None)  # the studio names jobs itself
                    items.append(parse_settings({k: v for k, v in defaults.items() if k != "prompt"} | item, limits))
                except BadRequest as e:
                    errors.append(f"line {number}: {e}")
            if errors:
                raise BadRequest(f"{len(errors)} bad line{'s' if len(errors) > 1 else ''} in the prompt list: "
                                 + "; ".join(errors[:20]) + (f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""))
            free = studio.queue.maxsize - studio.queue.qsize()
            if len(items) > free:
                raise QueueFull(studio.retry_after())
            jobs = [studio.submit(s) for s in items]
        except (BadRequest, QueueFull, StorageError) as e:
            return refusal(e)
        return JSONResponse(dict(jobs=[public_job(studio.get(j.id)) for j in jobs]), status_code=202)

    async def list_jobs(request: Request):
        try:
            limit = min(max(int(request.query_params.get("limit", 50)), 1), 500)
            offset = max(int(request.query_params.get("offset", 0)), 0)
        except ValueError:
            return error(400, "limit and offset must be whole numbers")
        text = request.query_params.get("q", "")[: MAX_PROMPT_CHARS]
        records, total = studio.history.search(text, limit, offset)
        # Jobs still in flight: show their live state rather than the row written at submission.
        records = [studio.get(r["id"]) if r["status"] in ACTIVE else r for r in records]
        return JSONResponse(dict(jobs=[public_job(r) for r in records if r], total=total))

    async def get_job(request: Request):
        record = studio.get(request.path_params["job_id"])
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
        except (BadRequest, StorageError) as e:
            return refusal(e)

    routes = [
        Route("/api/health", health),
        Route("/api/options", options),
        Route("/api/openapi.json", spec),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/prompt-lists", submit_list, methods=["POST"]),
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
        # 405 keeps its Allow header (which methods the path takes).
        return error(getattr(exc, "status_code", 404), getattr(exc, "detail", "not found"), getattr(exc, "headers", None))

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.studio = studio
    # The body bound at the door is the largest any route takes; each route applies its own.
    return Guard(app, api_key, max(limits.max_upload_bytes, limits.max_json_bytes), loopback_only)
