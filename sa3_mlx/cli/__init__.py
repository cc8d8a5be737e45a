"""The ``sa3`` command: a thin layer over :mod:`sa3_mlx.pipeline` and :mod:`sa3_mlx.audio`.

``sa3 [generate] ...`` generates (the default command); ``sa3 download``,
``sa3 doctor``, ``sa3 info`` and ``sa3 convert`` are tools; ``sa3 studio`` serves the web page and
HTTP API. Every failure is one line on stderr and exit code 2 (130 for Ctrl-C); no
half-written output is left behind.
"""

from __future__ import annotations

import sys

COMMANDS = ("generate", "download", "doctor", "info", "bench", "studio", "convert")


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    else:
        command = "generate"
    if command == "generate":
        from .generate import run

        return run(argv)
    if command == "bench":
        from ..bench import main as bench

        return bench(argv)
    if command == "studio":
        from ..studio.server import run as studio

        return studio(argv)
    from . import tools

    return getattr(tools, command)(argv)


def _error(text: str) -> int:
    """Report a failure as one ``error:`` line on stderr; exit code 2."""
    print("error: " + " ".join(text.split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from ..audio import AudioError
    from ..hub import WeightsUnavailable
    from ..settings import SettingsError, cli_name
    from ..weights import WeightError
    from ..arguments import UsageError

    argv = sys.argv[1:] if argv is None else argv
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        # A fresh line first on a terminal, where a progress bar may hold the current one.
        print(("\n" if sys.stderr.isatty() else "") + "interrupted", file=sys.stderr)
        return 130
    except SettingsError as e:  # spelled as the command line spells settings
        return _error(e.message(cli_name))
    except (UsageError, AudioError, WeightsUnavailable, WeightError, ValueError) as e:
        return _error(str(e))
    except MemoryError:
        return _error("out of memory (try a shorter --seconds, fewer --num-outputs, or --free-models)")
    except OSError as e:
        return _error(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")


if __name__ == "__main__":
    sys.exit(main())
