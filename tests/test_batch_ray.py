"""``sa3 batch --ray`` on a Ray cluster this test starts on this machine (2 CPUs, a small object store): outputs
equal to single runs, a worker killed mid-run, a corrupt input, a stopped driver resumed, and a second node
that lacks the model files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sa3_mlx import hub
from sa3_mlx.batch import load_items
from sa3_mlx.pipeline import Pipeline

pytest.importorskip("ray", reason="sa3-mlx[ray] is part of the test install (./install.sh --test)")

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TIMEOUT = 180  # seconds a driver run may take here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop_node(proc: subprocess.Popen) -> None:
    """The node and everything it started (its session: raylet, GCS, workers); no 30 s drain."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait_for(address: str, log: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    host, port = address.split(":")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the Ray head did not come up in {seconds} s: {log.read_text()[-2000:]}")


def _hub_cache(root: Path, bundle: Path) -> Path:
    """A Hugging Face cache holding the bundle's files as the official repo's ``MLX/`` folder."""
    commit = "0" * 40
    repo = root / ("models--" + hub.REPO_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit / hub.REPO_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for f in list(bundle.glob("*")) + list((bundle / hub.REPO_FOLDER).glob("*")):
        if f.is_file() and not (folder / f.name).exists():
            os.symlink(f, folder / f.name)
    return root


@pytest.fixture(scope="module")
def cluster(bundle, tmp_path_factory):
    """A head node with 2 CPUs; its workers find the models in their own HF cache."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    work = tmp_path_factory.mktemp("cluster")
    # A throwaway cluster of this test: no token (a real cluster keeps Ray's token authentication).
    env = dict(os.environ, HF_HUB_CACHE=str(_hub_cache(work / "cache-head", bundle)), HF_HUB_OFFLINE="1",
               RAY_AUTH_MODE="disabled",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    address = f"127.0.0.1:{_free_port()}"
    log = work / "head.log"
    head = _start_node(["--head", "--port", address.split(":")[1], "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                        "--object-store-memory", str(80 * 1024**2), "--include-dashboard", "false",
                        "--temp-dir", str(temp)], env, log)
    try:
        _wait_for(address, log, head)
        yield dict(address=address, env=env, work=work)
    finally:
        _stop_node(head)
        shutil.rmtree(temp, ignore_errors=True)


def _driver(cluster, folder: Path, *args, cwd: Path) -> subprocess.Popen:
    env = dict(cluster["env"])
    return subprocess.Popen([sys.executable, "-m", "sa3_mlx", "batch", *map(str, args), "--ray", cluster["address"],
                             "--json"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(proc: subprocess.Popen) -> tuple[int, list[dict], str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, [json.loads(line) for line in out.splitlines()], err


def _write(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def _pcm(path) -> np.ndarray:
    return sf.read(str(path), dtype="float32", always_2d=True)[0].T


def _done_lines(folder: Path) -> list[str]:
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return [e["id"] for e in lines if e["status"] == "done"]


def test_forty_mixed_items_on_two_workers_equal_single_runs(cluster, bundle, tmp_path):
    models, lengths = ("sm-music", "sm-sfx", "medium"), (1.0, 1.5, 2.0)
    items = [{"prompt": f"sound {k}", "model": models[k % 3], "seconds": lengths[k // 3 % 3], "seed": k}
             for k in range(40)]
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    items.append({"id": "broken", "prompt": "x", "seed": 1, "init_audio": "broken.wav"})
    jobs = _write(tmp_path / "jobs.jsonl", items)
    out = tmp_path / "renders"
    code, events, err = _events(_driver(cluster, out, jobs, "--out-dir", out, "--weights-dir", bundle, "--steps", "2",
                                        "--workers", "2", "--cpus-per-worker", "1", "--retries", "1", cwd=tmp_path))
    assert code == 1, err
    assert "error: 1 of 41 items failed" in err
    workers = {e["name"]: e for e in events if e["event"] == "worker"}
    assert len(workers) == 2 and all(w["device"] == "cpu" for w in workers.values())
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 40 and len({e["id"] for e in done}) == 40
    assert {e["worker"] for e in done} == set(workers)  # both did work
    failed = [e for e in events if e["event"] in ("retry", "failed")]
    assert [(e["event"], e["attempts"]) for e in failed] == [("retry", 1), ("failed", 2)]
    assert sorted(_done_lines(out)) == sorted(e["id"] for e in done)
    assert len(list(out.glob("*.wav"))) == 40 and not list(out.glob(".*.part"))

    # Same seed, same samples: each output equals a single run of its settings (what `sa3` does).
    loaded = {i.id: i for i in load_items(jobs, {"steps": 2})}
    pipes = {}
    for event in done:
        item = loaded[event["id"]]
        pipe = pipes.setdefault(item.settings.model_name, Pipeline.from_settings(item.settings, weights_dir=bundle,
                                                                                   progress=False))
        single = pipe.generate(settings=item.settings)
        np.testing.assert_allclose(_pcm(event["outputs"][0]["path"]), np.clip(single.audio[0], -1, 1), atol=1e-4)


def _jobs(tmp_path: Path, n: int) -> Path:
    return _write(tmp_path / "jobs.jsonl", [{"id": f"clip{k:02d}", "prompt": f"drone {k}", "seed": k} for k in range(n)])


SLOW = ["--dit", "medium", "--seconds", "4", "--steps", "50", "--batch-size", "1", "--workers", "2",
        "--cpus-per-worker", "1"]


def test_a_killed_worker_loses_nothing_and_makes_nothing_twice(cluster, bundle, tmp_path):
    out = tmp_path / "renders"
    proc = _driver(cluster, out, _jobs(tmp_path, 16), "--out-dir", out, "--weights-dir", bundle, *SLOW, cwd=tmp_path)
    pids, killed, lines = {}, None, []
    for line in proc.stdout:
        event = json.loads(line)
        lines.append(event)
        if event["event"] == "worker":
            pids[event["name"]] = event["pid"]
        if event["event"] == "done" and killed is None:
            killed = next(name for name in pids if name != event["worker"])  # the other one: mid-item
            os.kill(pids[killed], signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    lost = [e for e in lines if e["event"] == "lost"]
    assert [e["worker"] for e in lost] == [killed] and "the worker was lost" in lost[0]["error"]
    assert lines[-1]["event"] == "summary" and (lines[-1]["done"], lines[-1]["failed"]) == (16, 0)
    assert Counter(_done_lines(out)) == Counter(f"clip{k:02d}" for k in range(16))  # each exactly once
    files = sorted(p.name for p in out.iterdir() if p.name != "manifest.jsonl" and not p.name.startswith(".sa3"))
    assert files == [f"clip{k:02d}.wav" for k in range(16)]  # no duplicates, no partial files
    for name in files:
        assert _pcm(out / name).shape == (2, 4 * 44100)


def test_a_stopped_driver_resumes_with_only_the_missing_items(cluster, bundle, tmp_path):
    out = tmp_path / "renders"
    jobs = _jobs(tmp_path, 12)
    proc = _driver(cluster, out, jobs, "--out-dir", out, "--weights-dir", bundle, *SLOW, cwd=tmp_path)
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if sum(e["event"] == "done" for e in seen) == 2:
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=TIMEOUT)
    seen += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 130, err
    assert [e["now"] for e in seen if e["event"] == "stopping"] == [False]
    first = {e["id"] for e in seen if e["event"] == "done"}
    assert 2 <= len(first) < 12 and seen[-1]["left"] == 12 - len(first)
    assert sorted(_done_lines(out)) == sorted(first)

    code, events, err = _events(_driver(cluster, out, jobs, "--out-dir", out, "--weights-dir", bundle, *SLOW,
                                        cwd=tmp_path))
    assert code == 0, err
    assert events[0] == {"event": "started", "items": 12, "done_before": len(first), "todo": 12 - len(first)}
    second = {e["id"] for e in events if e["event"] == "done"}
    assert not first & second and first | second == {f"clip{k:02d}" for k in range(12)}
    assert Counter(_done_lines(out)) == Counter(first | second)


def test_a_second_node_without_the_models_is_named_then_used(cluster, bundle, tmp_path):
    """Two logical nodes on this machine, each with its own Hugging Face cache (no --weights-dir)."""
    cache = tmp_path / "cache-node2"
    cache.mkdir()
    env = dict(cluster["env"], HF_HUB_CACHE=str(cache))
    node = _start_node(["--address", cluster["address"], "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                        "--object-store-memory", str(80 * 1024**2)], env, tmp_path / "node2.log")
    try:
        jobs = _write(tmp_path / "jobs.jsonl", [{"prompt": f"tick {k}", "seed": k} for k in range(6)])
        out = tmp_path / "renders"
        deadline = time.monotonic() + 60
        while True:  # until the second node has joined: its check then fails
            code, events, err = _events(_driver(cluster, out, jobs, "--out-dir", out, "--dit", "sm-music", "--seconds",
                                                "1", "--steps", "2", "--cpus-per-worker", "1", cwd=tmp_path))
            if code != 0 or time.monotonic() > deadline:
                break
            shutil.rmtree(out)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: cannot run here: node ") and err.count("node ") == 1  # the head has them
        assert f"{hub.REPO_FOLDER}/{hub.MODELS['sm-music'].dit_file} (not in the Hugging Face cache)" in err
        assert not out.exists() or not list(out.glob("*.wav"))

        _hub_cache(cache, bundle)
        code, events, err = _events(_driver(cluster, out, jobs, "--out-dir", out, "--dit", "sm-music", "--seconds", "1",
                                            "--steps", "2", "--cpus-per-worker", "1", "--batch-size", "1", cwd=tmp_path))
        assert code == 0, err
        nodes = {e["node"] for e in events if e["event"] == "worker"}
        assert len(nodes) == 2  # three workers: two on the head, one on the second node
        assert sum(e["event"] == "done" for e in events) == 6
    finally:
        _stop_node(node)


@pytest.mark.parametrize("address, words", [
    ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:{port} (Connection refused)"),
    ("nonsense", "give auto, local or HOST:PORT of the cluster's head"),
])
def test_an_unreachable_cluster_is_one_line_at_once(sa3, work, address, words):
    port = _free_port()
    (work / "p.txt").write_text("rain\n")
    started = time.monotonic()
    code, out, err = sa3("batch", "p.txt", "--ray", address.format(port=port))
    assert code == 2 and len(err.strip().splitlines()) == 1 and words.format(port=port) in err, err
    assert time.monotonic() - started < 10  # not Ray's minutes of retries
