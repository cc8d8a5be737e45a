"""Weight files from the hub (real huggingface_hub code against a loopback stand-in) and local folders.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE when it is
imported, so each scenario runs in a fresh Python process with its environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sa3_mlx import hub
from tests.hub_standin import COMMIT, HubStandIn

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = {f"{hub.REPO_FOLDER}/{hub.T5GEMMA_FILE}": b"t5 bytes" * 1000, f"{hub.REPO_FOLDER}/same_s_decoder_f32.npz": b"dec"}

SCRIPT = """
import json, sys
from sa3_mlx import hub
out = []
for name in sys.argv[1:]:
    try:
        out.append({"path": str(hub.resolve(name, progress=False))})
    except hub.WeightsUnavailable as e:
        out.append({"error": str(e)})
print(json.dumps(out))
"""


def resolve_in_subprocess(names, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True, env=full_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_download_into_standard_cache_then_offline(tmp_path):
    cache = tmp_path / "cache"
    with HubStandIn(hub.REPO_ID, PAYLOAD) as standin:
        (first,) = resolve_in_subprocess([hub.T5GEMMA_FILE], HF_ENDPOINT=standin.url, HF_HUB_CACHE=str(cache))
    path = Path(first["path"])
    assert path.read_bytes() == PAYLOAD["MLX/t5gemma_f16.npz"]
    # The standard cache layout, so other tools share the file.
    assert f"models--stabilityai--stable-audio-3-optimized/snapshots/{COMMIT}/MLX/" in path.as_posix()
    assert any(r.startswith("GET") and r.endswith("/MLX/t5gemma_f16.npz") for r in standin.requests)
    # Offline afterwards: served from the cache; a file never fetched gets a clear message.
    ok, missing = resolve_in_subprocess([hub.T5GEMMA_FILE, "dit_medium_f16.npz"], HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert Path(ok["path"]).read_bytes() == PAYLOAD["MLX/t5gemma_f16.npz"]
    assert "not in the local Hugging Face cache" in missing["error"] and "--weights-dir" in missing["error"]


def test_gated_and_missing_files_explain_what_to_do(tmp_path):
    with HubStandIn(hub.REPO_ID, PAYLOAD, gated=True) as standin:
        (gated,) = resolve_in_subprocess([hub.T5GEMMA_FILE], HF_ENDPOINT=standin.url, HF_HUB_CACHE=str(tmp_path))
    assert "accept the licence" in gated["error"] and "HF_TOKEN" in gated["error"]
    with HubStandIn(hub.REPO_ID, PAYLOAD) as standin:
        (missing,) = resolve_in_subprocess(["dit_medium_f16.npz"], HF_ENDPOINT=standin.url, HF_HUB_CACHE=str(tmp_path))
    assert "does not exist" in missing["error"]


def test_local_weights_dir_flat_or_with_mlx_folder(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / hub.T5GEMMA_FILE).write_bytes(b"x")
    (tmp_path / "nested" / "MLX").mkdir(parents=True)
    (tmp_path / "nested" / "MLX" / hub.T5GEMMA_FILE).write_bytes(b"y")
    assert hub.resolve(hub.T5GEMMA_FILE, tmp_path / "flat").read_bytes() == b"x"
    assert hub.resolve(hub.T5GEMMA_FILE, tmp_path / "nested").read_bytes() == b"y"
    with pytest.raises(hub.WeightsUnavailable, match="not found"):
        hub.resolve("dit_medium_f16.npz", tmp_path / "flat")


def test_files_for_each_model():
    assert hub.files_for("sm-music") == ["t5gemma_f16.npz", "dit_sm-music_f16.npz", "same_s_decoder_f32.npz"]
    assert hub.files_for("medium", encoder=True)[-2:] == ["same_l_decoder_f32.npz", "same_l_encoder_f32.npz"]
    with pytest.raises(ValueError):
        hub.files_for("large")


def test_original_release_downloads_with_snapshot_and_runs_offline(golden, tmp_path):
    """`--model owner/name`: snapshot_download of the release's files, then a run from the cache alone."""
    root = golden / "upstream_ckpt"
    files = {name: (root / name).read_bytes() for name in ("model_config.json", "model.safetensors")}
    for path in sorted((root / "t5gemma-b-b-ul2").iterdir()):
        files[f"t5gemma-b-b-ul2/{path.name}"] = path.read_bytes()
    repo = "stabilityai/stable-audio-3-small-music"
    cache = tmp_path / "cache"
    cli = [sys.executable, "-m", "sa3_mlx", "--model", repo, "--prompt", "lofi", "--seconds", "1", "--seed", "3",
           "--overwrite"]

    def run(out: str, **env):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        full_env.update(env, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                        PYTHONPATH=str(REPO))
        return subprocess.run([*cli, "--out", str(tmp_path / out)], capture_output=True, text=True, env=full_env,
                              timeout=300)

    with HubStandIn(repo, files) as standin:
        first = run("online.wav", HF_ENDPOINT=standin.url)
    assert first.returncode == 0, first.stderr
    assert any("/api/models/" in r for r in standin.requests)  # the real snapshot_download code path
    snapshot = cache / "models--stabilityai--stable-audio-3-small-music" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == files["model.safetensors"]
    offline = run("offline.wav", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "online.wav").read_bytes() == (tmp_path / "offline.wav").read_bytes()


def test_unresolvable_hub_fails_fast_and_cache_still_serves(tmp_path):
    """No DNS for the endpoint: a clear error at once (no ~25 s of retries), or the cached file."""
    import time

    cache = tmp_path / "cache"
    start = time.perf_counter()
    (missing,) = resolve_in_subprocess([hub.T5GEMMA_FILE], HF_ENDPOINT="http://hub.invalid", HF_HUB_CACHE=str(cache))
    assert time.perf_counter() - start < 15
    assert "cannot be reached" in missing["error"] and "--weights-dir" in missing["error"]
    with HubStandIn(hub.REPO_ID, PAYLOAD) as standin:
        resolve_in_subprocess([hub.T5GEMMA_FILE], HF_ENDPOINT=standin.url, HF_HUB_CACHE=str(cache))
    (cached,) = resolve_in_subprocess([hub.T5GEMMA_FILE], HF_ENDPOINT="http://hub.invalid", HF_HUB_CACHE=str(cache))
    assert Path(cached["path"]).read_bytes() == PAYLOAD["MLX/t5gemma_f16.npz"]
