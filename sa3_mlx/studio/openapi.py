"""The HTTP API described as OpenAPI 3.1, served at ``/api/openapi.json`` (limits filled in from the server's)."""

from __future__ import annotations

from .. import __version__
from ..settings import json_schema
from .settings import Limits


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_spec(limits: Limits) -> dict:
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"}}
    index = {"name": "index", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
    job = {"description": "the job", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}
    number = {"type": "number"}
    settings = json_schema("api", limits.bounds())
    job_schema = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
            "stage": {"type": "string"}, "step": {"type": "integer"}, "steps": {"type": "integer"},
            "queue_position": {"type": "integer"},
            "created": number, "started": {"type": ["number", "null"]}, "finished": {"type": ["number", "null"]},
            "settings": {"type": "object"},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "seed": {"type": "integer"}, "url": {"type": "string"},
                "metadata_url": {"type": "string"}, "peaks": {"type": "array", "items": number},
                "peak_dbfs": {"type": ["number", "null"]}}}},
            "error": {"type": ["string", "null"]},
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sa3 studio", "version": __version__,
                 "description": "Stable Audio 3 generation jobs. When the server has an API key, send it as "
                                "`Authorization: Bearer KEY`, `X-API-Key: KEY` or `?key=KEY`."},
        "components": {
            "schemas": {"Settings": settings, "Job": job_schema,
                        "Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "header": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{}, {"bearer": []}, {"header": []}],
        "paths": {
            "/api/jobs": {
                "post": {"summary": "Submit a generation job",
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/Settings"}}}},
                         "responses": {"202": {**job, "description": "accepted, queued"},
                                       "400": _error("a bad setting; the message names it"),
                                       "413": _error(f"body over {limits.max_json_bytes} bytes"),
                                       "429": {**_error("the queue is full"),
                                               "headers": {"Retry-After": {"schema": {"type": "integer"}}}}}},
                "get": {"summary": "The history, newest first",
                        "parameters": [{"name": "q", "in": "query", "schema": {"type": "string"},
                                        "description": "text the prompt contains"},
                                       {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 50}},
                                       {"name": "offset", "in": "query", "schema": {"type": "integer", "default": 0}}],
                        "responses": {"200": {"description": "jobs and the total count", "content": {
                            "application/json": {"schema": {"type": "object", "properties": {
                                "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                                "total": {"type": "integer"}}}}}}}},
            },
            "/api/jobs/{job_id}": {
                "parameters": [job_id],
                "get": {"summary": "A job's state and progress (poll)", "responses": {"200": job, "404": _error("no such job")}},
                "delete": {"summary": "Delete a finished job and its files",
                           "responses": {"204": {"description": "deleted"}, "404": _error("no such job"),
                                         "409": _error("still queued or running: cancel it first")}},
            },
            "/api/jobs/{job_id}/events": {
                "parameters": [job_id],
                "get": {"summary": "Progress as server-sent events (`event: job`, data = the job) until it ends",
                        "responses": {"200": {"description": "an event stream",
                                              "content": {"text/event-stream": {}}}, "404": _error("no such job")}},
            },
            "/api/jobs/{job_id}/cancel": {
                "parameters": [job_id],
                "post": {"summary": "Cancel a queued or running job (a running one stops at its next step)",
                         "responses": {"200": job, "404": _error("no such job")}},
            },
            "/api/jobs/{job_id}/outputs/{index}": {
                "parameters": [job_id, index],
                "get": {"summary": "The audio file of one output", "responses": {
                    "200": {"description": "WAV, FLAC, MP3, OGG or Opus",
                            "content": {"audio/wav": {}, "audio/flac": {}, "audio/mpeg": {}, "audio/ogg": {}}},
                    "404": _error("no such output")}},
            },
            "/api/jobs/{job_id}/outputs/{index}/metadata": {
                "parameters": [job_id, index],
                "get": {"summary": "The settings stored in the file, and its levels",
                        "responses": {"200": {"description": "metadata"}, "404": _error("no such output")}},
            },
            "/api/prompt-lists": {
                "post": {"summary": "Queue one job per item of a prompt list (the CLI's --prompts-file format: a "
                                    "prompt a line, or JSONL with settings per item); defaults apply to every item",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["text"], "additionalProperties": False,
                             "properties": {"text": {"type": "string"},
                                            "defaults": {"type": "object", "description": "settings for every item"}},
                         }}}},
                         "responses": {"202": {"description": "the queued jobs"},
                                       "400": _error("bad lines, each with its number"),
                                       "429": _error("the queue has no room for every item")}},
            },
            "/api/uploads": {
                "post": {"summary": "Upload init audio (the file as the body); decoded with the CLI's checks",
                         "requestBody": {"required": True, "content": {"application/octet-stream": {}}},
                         "responses": {"201": {"description": "id, seconds and waveform peaks"},
                                       "400": _error("not readable audio"),
                                       "413": _error(f"over {limits.max_upload_bytes} bytes")}},
            },
            "/api/options": {"get": {"summary": "Models, formats, defaults and limits",
                                     "responses": {"200": {"description": "options"}}}},
            "/api/health": {"get": {"summary": "Liveness and queue length", "responses": {"200": {"description": "ok"}}}},
        },
    }
