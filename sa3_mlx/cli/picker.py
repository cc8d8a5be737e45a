"""Choosing from a short list: arrow keys on a terminal, a numbered prompt otherwise."""

from __future__ import annotations

import sys


def _numbered(title: str, options: list[str], default: str) -> str:
    print(title, file=sys.stderr)
    for i, option in enumerate(options, start=1):
        mark = "*" if option == default else " "
        print(f"  {mark} {i}) {option}", file=sys.stderr)
    while True:
        sys.stderr.write(f"Choose 1-{len(options)} (Enter = {default}): ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not sys.stdin.isatty():  # input that is not typed is not echoed: show it
            sys.stderr.write(line if line.endswith("\n") else line + "\n")
        if not line:  # end of input: take the default rather than loop forever
            return default
        answer = line.strip()
        if not answer:
            return default
        if answer in options:
            return answer
        if answer.isdigit() and 1 <= int(answer) <= len(options):
            return options[int(answer) - 1]
        print(f"  '{answer}' is not one of the choices", file=sys.stderr)


def _arrows(title: str, options: list[str], default: str, termios, tty) -> str:
    index = options.index(default)
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)  # raises on a stream that is not a real terminal
    out = sys.stderr
    try:
        tty.setcbreak(fd)
        out.write(f"{title}  (arrows to move, Enter to choose)\n" + "\n" * len(options))
        while True:
            out.write(f"\x1b[{len(options)}A")
            for i, option in enumerate(options):
                line = f"\x1b[36m> {option}\x1b[0m" if i == index else f"  {option}"
                out.write(f"\x1b[2K{line}\n")
            out.flush()
            key = sys.stdin.read(1)
            if key == "\x1b":
                seq = sys.stdin.read(2)
                if seq == "[A":
                    index = (index - 1) % len(options)
                elif seq == "[B":
                    index = (index + 1) % len(options)
            elif key in ("\r", "\n"):
                return options[index]
            elif key == "\x03":
                raise KeyboardInterrupt
            elif key == "":  # the terminal went away
                return options[index]
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def pick(title: str, options: list[str], default: str) -> str:
    """One of ``options``; arrow keys where a terminal and termios exist, else a numbered prompt."""
    if sys.stdin.isatty() and sys.stderr.isatty():
        try:
            import termios
            import tty
        except ImportError:  # Windows, or a Python built without termios
            return _numbered(title, options, default)
        try:
            return _arrows(title, options, default, termios, tty)
        except (OSError, termios.error):
            pass  # not a terminal termios can drive
    return _numbered(title, options, default)
