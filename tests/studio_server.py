"""``sa3 studio`` in its own process for the tests, and a small HTTP client for it (stdlib only)."""

from __future__ import annotations

import email.message
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


class StudioProcess:
    """``python -m sa3_mlx studio --port 0 ...``; the URL is read from its first line of output."""

    def __init__(self, output_dir: Path, weights_dir: Path, *extra: str, host: str = "127.0.0.1",
                 api_key: str | None = None):
        self.api_key = api_key
        self.log = Path(output_dir).parent / f"{Path(output_dir).name}-server.log"
        args = [sys.executable, "-m", "sa3_mlx", "studio", "--host", host, "--port", "0", "--no-browser",
                "--output-dir", str(output_dir), "--weights-dir", str(weights_dir), *extra]
        if api_key:
            args += ["--api-key", api_key]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self._log_file = open(self.log, "wb")
        self.process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log_file, env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                match = re.search(rb"(http://\S+/)", line)
                if match:
                    return match.group(1).decode().replace("0.0.0.0", "127.0.0.1")
            if self.process.poll() is not None:
                break
        self.process.kill()
        self.process.wait()
        self._log_file.close()
        raise RuntimeError(f"sa3 studio did not start: {line!r} {self.log.read_text(errors='replace')[-2000:]}")

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                key: str | None = None) -> tuple[int, "email.message.Message", bytes]:
        """(status, headers (case-insensitive), body); a dict body is sent as JSON; ``key`` overrides the server's key."""
        headers = dict(headers or {})
        key = self.api_key if key is None else key
        if key:
            headers.setdefault("Authorization", f"Bearer {key}")
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def json(self, method: str, path: str, body=None, **kw) -> tuple[int, dict]:
        status, _, data = self.request(method, path, body, **kw)
        return status, (json.loads(data) if data else {})

    def submit(self, **settings) -> dict:
        status, job = self.json("POST", "/api/jobs", settings)
        assert status == 202, job
        return job

    def wait(self, job_id: str, timeout: float = 120, until=("done", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json("GET", f"/api/jobs/{job_id}")
            assert status == 200, job
            if job["status"] in until:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")

    def wait_for(self, job_id: str, condition, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, job = self.json("GET", f"/api/jobs/{job_id}")
            if condition(job):
                return job
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never reached the condition: {job}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self._log_file.close()
        return self.process.returncode
