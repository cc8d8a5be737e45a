"""What a person sees in the terminal: banner, stage lines, progress bar, memory table.

Everything goes through a ``Display``; when stdout is not a terminal it stays
silent (the caller prints only the output paths or the JSON summary). Text that
comes from the user (prompts, paths) is escaped, so brackets in it are not taken
for rich markup.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def fmt_bytes(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GB"
    return f"{n / 1024**2:.0f} MB" if n >= 1024**2 else f"{n / 1024:.0f} KB"


class Display:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = Console(highlight=False)
        self._progress: Progress | None = None
        self._task = None

    def banner(self, title: str, rows: list[tuple[str, str]]) -> None:
        if not self.enabled:
            return
        self.console.rule(f"[bold]{escape(title)}")
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self.console.print(f"  [dim]{key:>{width}}[/dim]  {escape(value)}")
        self.console.print()

    def warn(self, text: str) -> None:
        # Warnings matter even when quiet: they go to stderr then, one plain line each.
        if self.enabled:
            self.console.print(f"  [yellow]warning:[/yellow] {escape(text)}")
        else:
            print(f"warning: {text}", file=sys.stderr)

    def stage_done(self, stage) -> None:
        """One line per pipeline stage as it ends (the sampling bar is cleared first)."""
        self.stop_sampling()
        if self.enabled:
            self.console.print(f"  [cyan]{stage.name:<28}[/cyan] [yellow]{stage.seconds * 1000:8.0f} ms[/yellow]")

    def start_sampling(self, total: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("  [cyan]sampling[/cyan]"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("sampling", total=total)

    def step(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def stop_sampling(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def memory_table(self, stages) -> None:
        if not self.enabled or not stages:
            return
        table = Table(title="Peak memory by stage", title_justify="left", box=None, padding=(0, 2))
        table.add_column("stage", style="dim")
        table.add_column("time", justify="right")
        table.add_column("peak memory", justify="right")
        top = max(s.peak_bytes for s in stages)
        for s in stages:
            mark = " [bold]<- max[/bold]" if s.peak_bytes == top else ""
            table.add_row(s.name, f"{s.seconds * 1000:.0f} ms", fmt_bytes(s.peak_bytes) + mark)
        self.console.print()
        self.console.print(table)

    def done(self, wall: float, audio_seconds: float, peak: int, seed: int, saved: list[tuple[str, str]]) -> None:
        """The final line (wall time, x realtime, peak memory, seed) and one ``▸ saved`` line per file."""
        if not self.enabled:
            return
        self.console.print()
        self.console.rule()
        speed = audio_seconds / wall if wall > 0 else float("inf")
        self.console.print(
            f"  [bold green]done[/bold green]  [bold]{wall:.2f} s[/bold] wall -> {audio_seconds:.1f} s audio"
            f" -> [bold yellow]{speed:.2f}x realtime[/bold yellow]   [dim]peak memory {fmt_bytes(peak)}   seed {seed}[/dim]"
        )
        for path, levels in saved:
            self.console.print(f"  [bold green]▸ saved[/bold green]  [bold]{escape(path)}[/bold]   [dim]{levels}[/dim]")
        self.console.rule()
