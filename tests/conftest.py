"""Shared fixtures: the reference data folder (never skipped when missing), the tiny bundle of official-format
files, and the CLI run in-process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import sa3_mlx  # noqa: F401  (first: loads the fast BLAS before anything imports mlx)
from sa3_mlx.audio import SAMPLE_RATE
from sa3_mlx.commands import main
from tests.bundle import build_tiny_bundle

REPO = Path(__file__).resolve().parents[1]


def _reference_dir() -> Path:
    root = Path(os.environ.get("SA3_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
    if not (root / "golden").is_dir() or not (root / "manifests").is_dir():
        raise RuntimeError(
            f"reference data not found at {root} (needs golden/ and manifests/); "
            "set SA3_REFERENCE_DIR to the shared/reference folder"
        )
    return root


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _reference_dir()


@pytest.fixture(scope="session")
def golden(reference_dir) -> Path:
    return reference_dir / "golden"


@pytest.fixture(scope="session")
def manifests(reference_dir) -> Path:
    return reference_dir / "manifests"


# ---- the CLI on the tiny bundle -----------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """Each test runs in its own folder, so relative outputs land in ``work/output``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def sa3(work, capsys):
    """``sa3 ARGS`` in-process: (exit code, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def generate(sa3, bundle):
    """``sa3 ARGS --weights-dir BUNDLE`` with short, fast defaults unless ARGS give their own."""

    def run(*args):
        defaults = {"--dit": "sm-music", "--seconds": "1.5", "--steps": "2", "--seed": "1"}
        extra = [x for flag, value in defaults.items() if flag not in args for x in (flag, value)]
        return sa3(*args, *extra, "--weights-dir", bundle)

    return run


@pytest.fixture
def init_wav(work):
    """Write a test tone file: ``init_wav(seconds, rate=44100, channels=2)``."""

    def make(seconds: float, rate: int = SAMPLE_RATE, channels: int = 2, name: str = "init.wav") -> Path:
        t = np.arange(int(round(seconds * rate))) / rate
        data = np.stack([0.4 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 331 * t)], axis=1)
        path = work / name
        sf.write(path, data[:, :channels], rate, subtype="PCM_24")
        return path

    return make
