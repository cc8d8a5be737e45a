"""Argument parsing shared by the ``sa3`` commands: one-line errors and checked value types."""

from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """A bad flag value: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error:`` line (no usage block), exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


MAX_SEED = 2**63 - 1  # MLX keys take unsigned 64-bit seeds; seed + i + 1 must still fit


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED} (got {value})")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def seconds_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected START,END in seconds (e.g. 4,7.5), got {text!r}")
    start, end = (finite_float(p.strip()) for p in parts)
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"needs 0 <= START < END (got {text!r})")
    return start, end
