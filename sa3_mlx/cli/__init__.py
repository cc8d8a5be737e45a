"""The ``sa3`` command: a thin layer over :mod:`sa3_mlx.pipeline` and :mod:`sa3_mlx.audio`.

``sa3 [generate] ...`` generates (the default command); ``sa3 download``,
``sa3 doctor`` and ``sa3 info`` are tools. Every failure is one line on stderr
and exit code 2 (130 for Ctrl-C); no half-written output is left behind.
"""

from __future__ import annotations

import sys

COMMANDS = ("generate", "download", "doctor", "info")


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    else:
        command = "generate"
    if command == "generate":
        from .generate import run

        return run(argv)
    from . import tools

    return getattr(tools, command)(argv)


def main(argv: list[str] | None = None) -> int:
    from ..audio import AudioError
    from ..hub import WeightsUnavailable
    from ..weights import WeightError
    from .generate import UsageError

    argv = sys.argv[1:] if argv is None else argv
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (UsageError, AudioError, WeightsUnavailable, WeightError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (try a shorter --seconds, fewer --num-outputs, or --free-models)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
