"""Shared fixtures: the reference data folder (never skipped when missing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sa3_mlx  # noqa: F401  (first: loads the fast BLAS before anything imports mlx)

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
