"""A local stand-in for the Hugging Face file endpoints, for testing real downloads.

It answers ``HEAD``/``GET /<repo>/resolve/<revision>/<path>`` the way the hub does
(``X-Repo-Commit``, ``ETag``, ``Content-Length``; ``X-Error-Code`` on errors) and the
repo-info request ``snapshot_download`` starts with, so the real ``huggingface_hub``
download code runs against it on loopback.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, repo_id: str, files: dict[str, bytes], gated: bool = False):
        self.repo_id, self.files, self.gated = repo_id, files, gated
        self.requests: list[str] = []
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _answer(self, body: bool) -> None:
                standin.requests.append(f"{self.command} {self.path}")
                api = f"/api/models/{standin.repo_id}/"
                if self.path.startswith(api) and not standin.gated:
                    # What snapshot_download asks first: the commit, then the file tree.
                    if self.path.startswith(api + "revision/"):
                        info = {"id": standin.repo_id, "sha": COMMIT,
                                "siblings": [{"rfilename": name} for name in standin.files]}
                    else:
                        info = [{"type": "file", "path": name, "size": len(data),
                                 "oid": hashlib.sha1(data).hexdigest()} for name, data in standin.files.items()]
                    data = json.dumps(info).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return
                prefix = f"/{standin.repo_id}/resolve/"
                if not self.path.startswith(prefix):
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.end_headers()
                    return
                if standin.gated:
                    self.send_response(401)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("X-Error-Message", "Access to this repo is restricted")
                    self.end_headers()
                    return
                _, _, name = self.path[len(prefix):].partition("/")
                data = standin.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
