"""Terminal output: results on stdout, progress and logs on stderr (quiet when stderr is not a terminal)."""

from __future__ import annotations

import math
import sys

from rich.console import Console

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)  # never folds a long path in two


class BarProgress:
    """A rich progress bar on stderr implementing core.prepare.Progress; silent when quiet or not a TTY."""

    def __init__(self, quiet: bool = False):
        self.enabled = not quiet and sys.stderr.isatty()
        self._progress = None
        self._task = None

    def start(self, description: str, total: int | None) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, rate="")

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)
            speed = next(t.speed for t in self._progress.tasks if t.id == self._task)  # all workers together
            self._progress.update(self._task, rate=f"{speed:,.0f}/s" if speed else "")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_progress_factory():
    """A factory for a live training line on stderr (step/total, loss, examples/s, tokens/s, ETA), or None when
    stderr is not a terminal (training then logs a line every 10 s)."""
    if not sys.stderr.isatty():
        return None
    return LiveStepProgress


class LiveStepProgress:
    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=stderr,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=start, info="compiling...")

    def update(self, step: int, loss: float, ex_per_s: float, tok_per_s: float, eta_s: float) -> None:
        self._progress.update(
            self._task,
            completed=step,
            info=f"loss {loss:.4f}  {ex_per_s:.1f} ex/s  {tok_per_s:,.0f} tok/s  ETA {format_eta(eta_s)}",
        )

    def message(self, text: str) -> None:
        self._progress.console.print(text)

    def close(self) -> None:
        self._progress.stop()
