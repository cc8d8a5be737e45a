"""Helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


class ManifestWeights(Mapping):
    """Keys and shapes of a manifest; nothing full-size is allocated.

    Reading a tensor is an error, except the byte ``blobs`` given and keys starting
    with ``zeros_for`` (small tensors a loader reads, e.g. the DiT's ``cond.*``), which
    read as zeros.
    """

    def __init__(self, manifest: dict, name: str, blobs: dict[str, bytes] | None = None, zeros_for: tuple = ()):
        self._shapes = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
        self._zeros_for = tuple(zeros_for)
        self._blobs = {k: np.frombuffer(v, np.uint8) for k, v in (blobs or {}).items()}
        for key, blob in self._blobs.items():
            self._shapes[key] = blob.shape
        self.name = name

    def __getitem__(self, key: str):
        if key in self._blobs:
            return self._blobs[key]
        if self._zeros_for and key.startswith(self._zeros_for):
            return np.zeros(self._shapes[key], np.float16)
        raise AssertionError(f"tensor '{key}' was read; only shapes may be used")

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]
