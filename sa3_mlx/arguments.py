"""Argument parsing shared by the front ends' commands (``sa3``, ``sa3 studio``, ``sa3 bench``):
one-line errors and checked value types, and the generation settings' options, generated from the
settings table (:mod:`sa3_mlx.settings`), which holds their rules."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable


class UsageError(Exception):
    """A bad flag value: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error:`` line (no usage block), exit code 2, and a value
    such as ``-1e-9``, ``-1,2`` or ``-inf`` is read as a (negative) value, not as an unknown option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.I)  # -1e-9, -1,2, -inf

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def whole_number(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number >= ``minimum`` (and <= ``maximum``), with a one-line reason."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if maximum is None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {value})")
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be in [{minimum}, {maximum}] (got {value})")
        return value

    return parse


positive_int = whole_number(1)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _metavar(f) -> str | None:
    if f.metavar:
        return f.metavar
    if f.kind == "choice":
        return "{" + ",".join(f.choices) + "}"
    return None


def add_setting_options(group_of: Callable[[str], object]) -> None:
    """One option per command-line setting of the table (``--seconds``, ``--cfg``, ...), in the argument
    group ``group_of(field.group)``; every value is kept as typed text until :func:`setting_values`."""
    from .settings import fields_for

    for f in fields_for("cli"):
        g = group_of(f.group)
        if f.kind == "bool":
            g.add_argument(f.cli_flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f.help)
        elif f.kind in ("ranges", "loras"):
            g.add_argument(f.cli_flag, dest=f.name, action="append", metavar=_metavar(f), help=f.help)
        else:
            g.add_argument(f.cli_flag, dest=f.name, metavar=_metavar(f), help=f.help)


def setting_values(args: argparse.Namespace) -> dict:
    """The typed values of the settings given on the command line (a ``SettingsError`` for a bad one)."""
    from .settings import fields_for, from_text

    return {f.name: from_text(f, getattr(args, f.name)) for f in fields_for("cli") if getattr(args, f.name) is not None}
