"""``sa3 studio``'s HTTP API over a real socket, the server in its own process, on the tiny bundle.

One server serves most tests (jobs there run one at a time, like real use); the
queue bound, the API key, restarts and the load test get servers of their own.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sa3_mlx.audio import SAMPLE_RATE
from sa3_mlx.pipeline import Pipeline
from tests.bundle import build_tiny_bundle
from tests.studio_server import REPO, StudioProcess

FAST = dict(seconds=1.5, steps=2)  # a job of a fraction of a second on the tiny bundle
SLOW = dict(seconds=60, steps=100)  # several seconds: long enough to watch, cancel or queue behind


@pytest.fixture(scope="module")
def weights(bundle, tmp_path_factory) -> Path:
    """The bundle, but with the medium DiT file cut short: a job asking for it fails while loading."""
    folder = tmp_path_factory.mktemp("weights")
    for f in bundle.iterdir():
        (folder / f.name).symlink_to(f)
    broken = folder / "dit_medium_f16.npz"
    broken.unlink()
    broken.write_bytes((bundle / "dit_medium_f16.npz").read_bytes()[:5000])
    return folder


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    studio = StudioProcess(tmp_path_factory.mktemp("studio") / "out", weights, "--max-steps", "100",
                           "--max-upload-mb", "1")
    yield studio
    assert studio.stop() == 0


def wav_bytes(seconds: float, rate: int = 22050, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone] * channels, axis=1), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def raw_post(server: StudioProcess, path: str, headers: bytes, body: bytes) -> bytes:
    """Send a request's head and ``body`` over a plain socket; the raw answer."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), host.encode(), headers) + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            answer += data
    return answer


def decode(data: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(data), dtype="float32", always_2d=True)[0]


def events(server: StudioProcess, job_id: str) -> list[dict]:
    """Every job state the server-sent event stream gives, until the job ends."""
    status, headers, body = server.request("GET", f"/api/jobs/{job_id}/events")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in body.decode().splitlines() if line.startswith("data: ")]


def test_generate_streams_progress_and_serves_audio_and_metadata(server, bundle):
    job = server.submit(prompt="lofi house loop", seconds=8, steps=40, seed=11, num_outputs=2, format="wav32f")
    assert job["status"] in ("queued", "running") and len(job["id"]) == 16
    states = events(server, job["id"])
    sampling = [s for s in states if s["status"] == "running" and s.get("stage") == "sampling"]
    assert sampling and all(1 <= s["step"] <= 40 and s["steps"] == 40 for s in sampling)
    assert [s["step"] for s in sampling] == sorted(s["step"] for s in sampling)
    final = states[-1]
    assert final["status"] == "done" and final["error"] is None
    assert final["settings"]["mode"] == "text-to-audio" and final["settings"]["seed"] == 11
    assert [o["seed"] for o in final["outputs"]] == [11, 12]

    # Each file is exactly what the pipeline makes for its seed alone (the CLI's rule).
    expected = Pipeline("sm-music", weights_dir=bundle, progress=False).generate(
        "lofi house loop", seconds=8, steps=40, seed=12).audio[0]
    status, headers, data = server.request("GET", final["outputs"][1]["url"])
    assert status == 200 and headers["content-type"] == "audio/wav"
    assert f'filename="{job["id"]}_2.wav"' in headers["content-disposition"]
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE and audio.shape == (8 * SAMPLE_RATE, 2)
    np.testing.assert_allclose(audio.T, expected, atol=1e-6)
    assert len(final["outputs"][1]["peaks"]) == 800
    assert max(final["outputs"][1]["peaks"]) == pytest.approx(np.abs(expected).max(), abs=1e-4)

    status, meta = server.json("GET", final["outputs"][1]["metadata_url"])
    assert status == 200
    assert meta["metadata"]["seed"] == 12 and meta["metadata"]["num_outputs"] == 1
    assert meta["metadata"]["prompt"] == "lofi house loop" and meta["metadata"]["job"] == job["id"]
    assert meta["levels"]["peak_dbfs"] == pytest.approx(20 * np.log10(np.abs(expected).max()), abs=0.01)


def test_a_weighted_prompt_as_mp3_is_served_with_its_id3_settings(server):
    job = server.submit(prompt="warm (tape hiss:0.5) pad", seed=5, format="mp3", **FAST)
    done = server.wait(job["id"])
    assert done["status"] == "done", done
    status, headers, data = server.request("GET", done["outputs"][0]["url"])
    assert status == 200 and headers["content-type"] == "audio/mpeg" and data.startswith(b"ID3")
    assert f'filename="{job["id"]}_1.mp3"' in headers["content-disposition"]
    status, meta = server.json("GET", done["outputs"][0]["metadata_url"])
    assert status == 200 and meta["metadata"]["prompt"] == "warm (tape hiss:0.5) pad"
    assert meta["metadata"]["format"] == "mp3"
    status, error = server.json("POST", "/api/jobs", {"prompt": "warm (tape hiss:x) pad"})
    assert status == 400 and error["error"] == ("prompt (tape hiss:x): the weight 'x' is not a number such as 1.3 "
                                                "or -0.5")


def test_polling_shows_the_queue_then_the_result(server):
    first = server.submit(prompt="rain", **SLOW)
    server.wait_for(first["id"], lambda job: job["status"] == "running")  # out of the queue: the second is first in it
    second = server.submit(prompt="thunder", seed=3, **FAST)
    status, polled = server.json("GET", f"/api/jobs/{second['id']}")
    assert status == 200 and polled["status"] == "queued" and polled["queue_position"] == 0
    server.json("POST", f"/api/jobs/{first['id']}/cancel")
    done = server.wait(second["id"])
    assert done["status"] == "done" and done["settings"]["seed"] == 3 and len(done["outputs"]) == 1


def test_cancel_running_and_queued_jobs(server):
    running = server.submit(prompt="ambient pad", **SLOW)
    queued = server.submit(prompt="choir", **SLOW)
    server.wait_for(running["id"], lambda j: j["status"] == "running" and j.get("step", 0) >= 1)
    status, cancelled = server.json("POST", f"/api/jobs/{queued['id']}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled"
    status, _ = server.json("POST", f"/api/jobs/{running['id']}/cancel")
    assert status == 200
    stopped = server.wait(running["id"], timeout=30)
    assert stopped["status"] == "cancelled" and stopped["outputs"] == []
    status, _, _ = server.request("GET", f"/api/jobs/{running['id']}/outputs/0")
    assert status == 404
    assert server.wait(server.submit(prompt="bell", **FAST)["id"])["status"] == "done"  # still serving


def test_audio_to_audio_and_inpainting_from_an_upload_and_a_past_result(server):
    status, upload = server.json("POST", "/api/uploads", wav_bytes(2.0),
                                 headers={"Content-Type": "application/octet-stream"})
    assert status == 201 and upload["seconds"] == pytest.approx(2.0) and len(upload["peaks"]) == 800
    inpainted = server.wait(server.submit(prompt="drum fill", seconds=2, steps=2, seed=5,
                                          init_audio={"upload": upload["id"]}, inpaint=[[0.5, 1.0], [1.5, 2.0]])["id"])
    assert inpainted["status"] == "done", inpainted["error"]
    assert inpainted["settings"]["mode"] == "inpainting" and inpainted["settings"]["inpaint"] == [[0.5, 1.0], [1.5, 2.0]]

    varied = server.wait(server.submit(prompt="jazz trio", seconds=2, steps=2, init_noise_level=0.7,
                                       init_audio={"job": inpainted["id"], "output": 0})["id"])
    assert varied["status"] == "done", varied["error"]
    assert varied["settings"]["mode"] == "audio-to-audio" and varied["settings"]["init_noise_level_used"] == 0.7
    status, meta = server.json("GET", varied["outputs"][0]["metadata_url"])
    assert meta["metadata"]["init_audio"] == f"job:{inpainted['id']}:0"


@pytest.mark.parametrize("body, message", [
    ({"seconds": 2}, "prompt is required"),
    ({"prompt": "x", "seconds": -1}, "seconds must be in (0, 384]"),
    ({"prompt": "x", "seconds": 400}, "seconds must be in (0, 384]"),
    ({"prompt": "x", "steps": 0}, "steps must be in [1, 100] (got 0)"),  # the server narrows the table's 1000
    ({"prompt": "x", "steps": 101}, "steps must be in [1, 100] (got 101)"),
    ({"prompt": "x", "steps": 2.5}, "steps must be a whole number"),
    ({"prompt": "x", "num_outputs": 17}, "num_outputs must be in [1, 16]"),
    ({"prompt": "x" * 10001}, "prompt is 10001 characters; at most 10000"),
    ({"prompt": "x\ud800"}, "prompt is not valid UTF-8 text"),
    ({"prompt": "x", "seed": -1}, "seed must be in [0, 9223372036854775807]"),
    ({"prompt": "x", "cfg": -2}, "cfg must be in [0, 50]"),
    ({"prompt": "x", "cfg": 1e300}, "cfg must be in [0, 50]"),
    ({"prompt": "x", "apg": 1.5}, "apg must be in [0, 1]"),
    ({"prompt": "x", "model": "huge"}, "model must be one of sm-music, sm-sfx, medium"),
    ({"prompt": "x", "format": "aac"}, "format must be one of wav16"),
    ({"prompt": "x", "loudness": 3}, "loudness must be in [-70, 0)"),
    ({"prompt": "x", "init_noise_level": 0.001}, "init_noise_level must be in [0.01, 1]"),
    ({"prompt": "x", "inpaint": [[1, 2]]}, "inpaint needs init_audio"),
    ({"prompt": "x", "out": "/etc/passwd"}, "unknown setting 'out'"),
    ({"prompt": "x", "init_audio": "/etc/passwd"}, "init_audio must be"),
    ({"prompt": "x", "init_audio": {"upload": "../../etc/passwd"}}, "init_audio must be"),
    ({"prompt": "x", "init_audio": {"upload": "0123456789abcdef"}}, "init_audio: no upload 0123456789abcdef"),
    ({"prompt": "x", "init_audio": {"job": "0123456789abcdef"}}, "has no finished output 0"),
    ({"prompt": "x", "seconds": 2, "init_audio": {"job": "0123456789abcdef"}, "inpaint": [[1, 3]]},
     "inpaint 1,3 ends after seconds 2"),
    (["prompt"], "the request body must be a JSON object"),
])
def test_bad_settings_are_400_with_a_clear_message(server, body, message):
    status, answer = server.json("POST", "/api/jobs", body)
    assert status == 400 and message in answer["error"], answer


def test_bad_bodies_and_uploads(server):
    status, _, body = server.request("POST", "/api/jobs", b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and b"not valid JSON" in body
    status, answer = server.json("POST", "/api/uploads", b"this is not audio at all" * 10)
    assert status == 400 and "not a readable audio file" in answer["error"] and "/" not in answer["error"]
    status, answer = server.json("POST", "/api/uploads", b"")
    assert status == 400 and "the upload is empty" in answer["error"]
    status, answer = server.json("POST", "/api/uploads", wav_bytes(1.0, channels=3))
    assert status == 400 and "3 channels" in answer["error"]
    # The server takes 1 MiB. It answers an over-long Content-Length before any of the body is sent, and
    # a chunked body once it passes the bound; raw sockets, as urllib would not read an early answer.
    assert raw_post(server, "/api/uploads", b"Content-Length: 2097152\r\n", b"").startswith(b"HTTP/1.1 413")
    chunk = b"\0" * (2**20 + 2**15)
    answer = raw_post(server, "/api/uploads", b"Transfer-Encoding: chunked\r\n", b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit of 1048576 bytes" in answer
    status, answer = server.json("POST", "/api/jobs", {"prompt": "x" * 300_000})
    assert status == 413
    for path in ("/api/jobs/..%2F..%2Fetc%2Fpasswd", "/api/jobs/0123456789abcdef", "/api/jobs/x/outputs/0",
                 "/static/../../pyproject.toml"):
        status, _, _ = server.request("GET", path)
        assert status == 404, path


def test_history_search_and_delete(server):
    kick = server.wait(server.submit(prompt="Techno KICK 50%_off", **FAST)["id"])
    snare = server.wait(server.submit(prompt="snare roll", **FAST)["id"])
    status, found = server.json("GET", "/api/jobs?q=kick%2050%25_")
    assert status == 200 and [j["id"] for j in found["jobs"]] == [kick["id"]] and found["total"] == 1
    _, everything = server.json("GET", "/api/jobs?limit=500")
    ids = [j["id"] for j in everything["jobs"]]
    assert ids.index(snare["id"]) < ids.index(kick["id"])  # newest first
    assert all("file" not in o for j in everything["jobs"] for o in j["outputs"])  # no server paths

    status, _, _ = server.request("DELETE", f"/api/jobs/{kick['id']}")
    assert status == 204
    assert server.json("GET", f"/api/jobs/{kick['id']}")[0] == 404
    assert server.request("GET", f"/api/jobs/{kick['id']}/outputs/0")[0] == 404
    assert server.request("DELETE", f"/api/jobs/{kick['id']}")[0] == 404
    running = server.submit(prompt="long", **SLOW)
    status, answer = server.json("DELETE", f"/api/jobs/{running['id']}")
    assert status == 409 and "cancel it first" in answer["error"]
    server.json("POST", f"/api/jobs/{running['id']}/cancel")
    server.wait(running["id"])


def test_a_failing_job_keeps_the_server_serving_and_models_swap(server):
    music = server.wait(server.submit(prompt="guitar", **FAST)["id"])
    assert server.json("GET", "/api/health")[1]["model_loaded"] == "sm-music"
    sfx = server.wait(server.submit(prompt="door creak", model="sm-sfx", **FAST)["id"])
    assert sfx["status"] == "done" and sfx["settings"]["codec"] == "same-s"
    assert server.json("GET", "/api/health")[1]["model_loaded"] == "sm-sfx"
    broken = server.wait(server.submit(prompt="strings", model="medium", **FAST)["id"])
    assert broken["status"] == "failed" and "dit_medium_f16.npz" in broken["error"]
    after = server.wait(server.submit(prompt="guitar", seed=music["settings"]["seed"], **FAST)["id"])
    assert after["status"] == "done"
    assert decode(server.request("GET", after["outputs"][0]["url"])[2]).tobytes() == \
        decode(server.request("GET", music["outputs"][0]["url"])[2]).tobytes()  # same seed, same audio


def test_other_sites_and_rebound_host_names_are_refused(server):
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    status, answer = server.json("POST", "/api/jobs", {"prompt": "x", **FAST}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin request from http://evil.example refused" in answer["error"]
    status, answer = server.json("GET", "/api/health", headers={"Host": f"evil.example:{port}"})
    assert status == 403 and "is not served" in answer["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        status, answer = server.json("POST", "/api/jobs", {"prompt": "same origin", **FAST},
                                     headers={"Host": host, "Origin": f"http://{host}"})
        assert status == 202, answer
        server.wait(answer["id"])


def test_openapi_describes_the_api(server):
    status, spec = server.json("GET", "/api/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/cancel",
            "/api/jobs/{job_id}/outputs/{index}", "/api/uploads"} <= set(spec["paths"])
    settings = spec["components"]["schemas"]["Settings"]["properties"]
    assert settings["steps"]["maximum"] == 100 and "429" in spec["paths"]["/api/jobs"]["post"]["responses"]


def test_full_queue_answers_429_with_retry_after(bundle, tmp_path):
    studio = StudioProcess(tmp_path / "out", bundle, "--queue-size", "1")
    try:
        running = studio.submit(prompt="long one", **SLOW)
        studio.wait_for(running["id"], lambda j: j["status"] == "running")
        waiting = studio.submit(prompt="waits", **FAST)
        status, headers, body = studio.request("POST", "/api/jobs", {"prompt": "one too many", **FAST})
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert "queue is full" in json.loads(body)["error"]
        studio.json("POST", f"/api/jobs/{running['id']}/cancel")
        assert studio.wait(waiting["id"])["status"] == "done"
        assert studio.submit(prompt="room again", **FAST)["status"] in ("queued", "running")
    finally:
        assert studio.stop() == 0


def test_off_loopback_needs_an_api_key_checked_on_every_request(bundle, tmp_path):
    refused = subprocess.run([sys.executable, "-m", "sa3_mlx", "studio", "--host", "0.0.0.0", "--no-browser",
                              "--weights-dir", str(bundle), "--output-dir", str(tmp_path / "x")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "pass --api-key" in refused.stderr
    weak = subprocess.run([sys.executable, "-m", "sa3_mlx", "studio", "--api-key", "a;b"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert weak.returncode == 2 and "--api-key must be at least 8 letters" in weak.stderr
    studio = StudioProcess(tmp_path / "out", bundle, host="0.0.0.0", api_key="s3cret-key")
    try:
        for path in ("/", "/api/health", "/api/jobs", "/api/openapi.json"):
            assert studio.request("GET", path, key="")[0] == 401, path
            assert studio.request("GET", path, key="wrong")[0] == 401, path
        status, answer = studio.json("POST", "/api/jobs", {"prompt": "x", **FAST}, key="wrong")
        assert status == 401 and "API key" in answer["error"]
        job = studio.submit(prompt="with key", **FAST)  # Bearer
        assert studio.request("GET", f"/api/jobs/{job['id']}", key="", headers={"X-API-Key": "s3cret-key"})[0] == 200
        done = studio.wait(job["id"])
        status, headers, _ = studio.request("GET", done["outputs"][0]["url"] + "?key=s3cret-key", key="")
        assert status == 200  # the page's way in: the key in the URL, then a same-site cookie
        cookie = headers["Set-Cookie"]
        assert cookie.startswith("sa3_studio_key=s3cret-key;") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert studio.request("GET", "/api/health", key="", headers={"Cookie": cookie.split(";")[0]})[0] == 200
        assert studio.request("GET", "/api/health", key="", headers={"Cookie": "sa3_studio_key=wrong"})[0] == 401
    finally:
        assert studio.stop() == 0


def test_history_survives_a_restart(bundle, tmp_path):
    studio = StudioProcess(tmp_path / "out", bundle)
    try:
        job = studio.wait(studio.submit(prompt="warm synth bass", **FAST)["id"])
        audio = studio.request("GET", job["outputs"][0]["url"])[2]
        running = studio.submit(prompt="cut short", **SLOW)
        studio.wait_for(running["id"], lambda j: j["status"] == "running")
        queued = studio.submit(prompt="never started", **FAST)
    finally:
        assert studio.stop() == 0  # while a job runs and another waits
    studio = StudioProcess(tmp_path / "out", bundle)
    try:
        _, listed = studio.json("GET", "/api/jobs?q=synth")
        assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["jobs"][0]["status"] == "done"
        assert listed["jobs"][0]["outputs"][0]["peaks"] == job["outputs"][0]["peaks"]
        assert studio.request("GET", job["outputs"][0]["url"])[2] == audio
        for interrupted in (running, queued):  # ended by the stop, with the reason: none is lost
            record = studio.json("GET", f"/api/jobs/{interrupted['id']}")[1]
            assert record["status"] == "cancelled" and "the server stopped" in record["error"], record
    finally:
        assert studio.stop() == 0


LOAD_CLIENT = r"""
import json, sys, threading, urllib.request, urllib.error
url, count = sys.argv[1], int(sys.argv[2])
results = [None] * count
start = threading.Barrier(count)
def submit(i):
    body = json.dumps({"prompt": f"load test {i}", "seconds": 1, "steps": 1, "seed": i}).encode()
    request = urllib.request.Request(url + "api/jobs", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    start.wait()
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            results[i] = {"status": r.status, "id": json.load(r)["id"]}
    except urllib.error.HTTPError as e:
        results[i] = {"status": e.code, "retry_after": e.headers.get("Retry-After")}
threads = [threading.Thread(target=submit, args=(i,)) for i in range(count)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"""


def test_load_50_concurrent_submissions_from_another_process(bundle, tmp_path):
    studio = StudioProcess(tmp_path / "out", bundle, "--queue-size", "4")
    try:
        client = subprocess.run([sys.executable, "-c", LOAD_CLIENT, studio.url, "50"],
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        results = json.loads(client.stdout)
        accepted = [r["id"] for r in results if r["status"] == 202]
        rejected = [r for r in results if r["status"] == 429]
        assert len(accepted) + len(rejected) == 50, results  # nothing else: no errors, no drops
        assert accepted and rejected and all(int(r["retry_after"]) >= 1 for r in rejected)
        finished = [studio.wait(i)["status"] for i in accepted]
        assert finished == ["done"] * len(accepted)
        _, listed = studio.json("GET", "/api/jobs?limit=500")
        assert sorted(j["id"] for j in listed["jobs"]) == sorted(accepted)  # every accepted job is in the history
        assert studio.json("GET", "/api/health")[1]["status"] == "ok"
    finally:
        assert studio.stop() == 0


def test_a_prompt_list_queues_one_job_per_item(server):
    text = "\n".join([json.dumps({"prompt": "rain", "seed": 3}), "# a comment",
                      json.dumps({"prompt": "(thunder:1.5) far", "seconds": 2, "id": "ignored"})])
    status, answer = server.json("POST", "/api/prompt-lists", {"text": text, "defaults": {"seconds": 1.5, "steps": 2}})
    assert status == 202, answer
    jobs = answer["jobs"]
    assert [j["settings"]["prompt"] for j in jobs] == ["rain", "(thunder:1.5) far"]
    done = [server.wait(j["id"]) for j in jobs]
    assert [d["status"] for d in done] == ["done", "done"]
    assert [(d["settings"]["seconds"], d["settings"]["steps"]) for d in done] == [(1.5, 2), (2.0, 2)]
    assert done[0]["settings"]["seed"] == 3

    bad = "\n".join(["plain prompt one", "warm (pad", "fine"])
    status, answer = server.json("POST", "/api/prompt-lists", {"text": bad, "defaults": {"steps": 2000}})
    assert status == 400
    assert answer["error"].startswith("3 bad lines in the prompt list: line 1: steps must be in [1, ")
    assert "line 2: prompt has an unbalanced '(' at character 6" in answer["error"]
    for body, words in (({"text": "# nothing"}, "the prompt list holds no prompts"),
                        ({"text": '{"prompt": "x", "release": "/etc"}'}, "line 1: unknown setting 'release'"),
                        ({"text": "x", "extra": 1}, 'must be {"text"'),
                        ({"text": "x", "defaults": []}, "defaults must be a JSON object")):
        status, answer = server.json("POST", "/api/prompt-lists", body)
        assert status == 400 and words in answer["error"], answer


def test_live_previews_and_result_spectrograms(server):
    """The server previews every 4 steps (its default): the job's state carries the latest one while it samples."""
    import base64

    job = server.submit(prompt="rain", seconds=8, steps=40, seed=1)
    states = events(server, job["id"])
    previews = [s["preview"] for s in states if s.get("preview")]
    assert previews and all(p["step"] % 4 == 0 and p["step"] < 40 and p["steps"] == 40 for p in previews)
    assert all(s["step"] >= s["preview"]["step"] for s in states if s.get("preview"))
    spec = previews[0]["spectrogram"]
    assert (spec["width"], spec["height"]) == (160, 48) and len(base64.b64decode(spec["data"])) == 160 * 48
    assert previews[0]["seconds"] > 0
    final = states[-1]
    assert final["status"] == "done"
    out = final["outputs"][0]["spectrogram"]
    assert len(base64.b64decode(out["data"])) == out["width"] * out["height"]
    status, listed = server.json("GET", "/api/jobs")
    assert status == 200 and listed["jobs"][0]["outputs"][0]["spectrogram"] == out  # kept in the history
