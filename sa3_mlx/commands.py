"""The ``sa3`` entry point (also ``python -m sa3_mlx``): routes ``sa3 [generate] ...`` and the tools
(``download``, ``doctor``, ``info``, ``convert``, ``encode-audio``, ``decode-latents``, ``encode``, ``train``) to
the CLI front end (:mod:`sa3_mlx.cli`), ``sa3 bench``
to :mod:`sa3_mlx.bench`, ``sa3 studio`` to the studio front end (:mod:`sa3_mlx.studio`) and ``sa3 batch`` to
the batch front end (:mod:`sa3_mlx.batch.command`), so that
the front ends never import each other. It also owns what every command shares: one ``error:`` line
and exit code 2 for a failure, 130 for Ctrl-C, 128 + N for SIGTERM and SIGHUP, treated alike.
"""

from __future__ import annotations

import sys

COMMANDS = ("generate", "download", "doctor", "info", "bench", "studio", "convert", "encode-audio", "decode-latents",
            "encode", "train", "batch")


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    else:
        command = "generate"
    if command == "generate":
        from .cli.generate import run

        return run(argv)
    if command == "bench":
        from .bench import main as bench

        return bench(argv)
    if command in ("encode", "train"):
        from .cli import train

        return getattr(train, command)(argv)
    if command == "batch":
        from .batch.command import main as batch

        return batch(argv)
    if command == "studio":
        from .studio.server import run as studio

        return studio(argv)
    if command in ("encode-audio", "decode-latents"):
        from .cli import codec_tools

        return getattr(codec_tools, command.replace("-", "_"))(argv)
    from .cli import tools

    return getattr(tools, command)(argv)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop like Ctrl-C (everything half-done is cleaned up on the way out)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> dict:
    """Treat SIGTERM (systemd, Docker, supervisors) and SIGHUP (a closed terminal) like Ctrl-C;
    returns the handlers it replaced (none outside the main thread, where Python cannot set any)."""
    import signal
    import threading

    def stop(signum, frame):
        raise Terminated(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                number = getattr(signal, name)
                previous[number] = signal.signal(number, stop)
    return previous


def _error(text: str) -> int:
    """Report a failure as one ``error:`` line on stderr; exit code 2."""
    print("error: " + " ".join(text.split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    import signal

    from .arguments import UsageError
    from .audio import AudioError
    from .hub import WeightsUnavailable
    from .settings import SettingsError, cli_name
    from .weights import WeightError

    argv = sys.argv[1:] if argv is None else argv
    previous = stop_on_signals()
    try:
        return _dispatch(argv)
    except Terminated as e:
        print(("\n" if sys.stderr.isatty() else "") + f"interrupted ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
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
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
