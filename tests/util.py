"""Helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_case(golden: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(golden / name) as f:
        return {k: f[k] for k in f.files}


def assert_close(actual, expected, atol: float, rtol: float = 0.0, what: str = ""):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    worst = float((err - bound).max())
    assert worst <= 0, f"{what}: max abs err {err.max():.3g} exceeds atol={atol} rtol={rtol}"
