"""Progress feedback for long loops, and the library's one way of talking to the user.

    with Progress(total=1000, label="train") as bar:
        for step in ...:
            bar.update(1, status="loss 0.123")
    log("wrote samples.png")

On a terminal this is click's progress bar with an ETA. When stderr is not a
terminal (a log file, CI, `nohup`), a bar would print only its label, so we
print one plain line every `every_s` seconds instead:

    train  120/1000  loss 0.123  2.31 it/s  ETA 6m21s

This is the only module of `ttfm_np` that imports click: the rest of the
library calls `log` and `Progress`, so it stays usable without a terminal UI.
"""
from __future__ import annotations

import sys
import time

import click


_QUIET = False        # True on the ranks other than 0 under mpiexec: rank 0 speaks for all ranks


def set_quiet(quiet: bool) -> None:
    """Silence log() in this process; distributed.setup() calls it on every rank but rank 0.

    (Set from outside so that this module imports nothing of ttfm_np: every module may log.)
    """
    global _QUIET
    _QUIET = bool(quiet)


def log(message: str) -> None:
    """A line for the user on stderr (stdout stays free for results such as tables)."""
    if not _QUIET:
        click.echo(message, err=True)


def format_seconds(seconds: float) -> str:
    """3725 -> '1h02m', 381 -> '6m21s', 4.2 -> '4s'."""
    if not seconds == seconds or seconds == float("inf"):      # NaN or inf: unknown
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """A progress display over `total` units; `enabled=False` makes it silent."""

    def __init__(self, total: int, label: str, enabled: bool = True, every_s: float = 5.0, stream=None):
        self.total, self.label, self.enabled, self.every_s = int(total), label, enabled, every_s
        self.stream = stream or sys.stderr
        self.done, self.status = 0, ""
        self.t0 = self._last_line = time.perf_counter()
        self._bar = None
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def rate(self) -> float:
        """Units per second since the start."""
        elapsed = time.perf_counter() - self.t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 and self.total > 0 else float("inf")

    def __enter__(self):
        if self.interactive:
            self._bar = click.progressbar(length=self.total or None, label=self.label, file=self.stream,
                                          show_eta=True,
                                          item_show_func=lambda _: self.status or None)
            self._bar.__enter__()
        return self

    def update(self, n: int = 1, status: str = ""):
        self.done += n
        self.status = status
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s or self.done == self.total:
            self._last_line = now
            self._print_line()

    def _print_line(self):
        parts = [self.label, f"{self.done}/{self.total}" if self.total > 0 else f"{self.done}"]
        if self.status:
            parts.append(self.status)
        parts += [f"{self.rate():.2f} it/s", f"ETA {format_seconds(self.eta())}"]
        print("  ".join(parts), file=self.stream, flush=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def __iter__(self):
        raise TypeError("use Progress.iterate(iterable) to wrap an iterable")

    @classmethod
    def iterate(cls, iterable, label: str, total: int | None = None, enabled: bool = True):
        """Yield from iterable while showing progress (total defaults to len(iterable))."""
        if total is None:
            total = len(iterable) if hasattr(iterable, "__len__") else 0     # 0: unknown length
        with cls(total, label, enabled) as bar:
            for item in iterable:
                yield item
                bar.update(1)
