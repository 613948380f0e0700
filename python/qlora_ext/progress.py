"""`ProgressBar`: one status line on stderr, redrawn in place with a carriage return on a
terminal (at most 10 times a second); when stderr is not a terminal (a log file, CI), a plain
line every `every` steps instead, so logs stay readable."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    def __init__(self, total: int, start: int = 0, every: int = 10, stream=None, width: int = 24):
        self.total, self.start, self.every, self.width = total, start, max(1, every), width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def line(self, step: int, fields: dict) -> str:
        frac = step / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        info = " ".join(f"{k} {v}" for k, v in fields.items())
        return f"{frac * 100:3.0f}% [{bar}] {step}/{self.total} {info} | {_clock(elapsed)}<{_clock(eta)}"

    def update(self, step: int, fields: dict) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw < 0.1 and step != self.total:
                return
            self.stream.write("\r" + self.line(step, fields) + "\x1b[K")
            self._drawn = True
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self.line(step, fields) + "\n")
        self._last_draw = now
        self.stream.flush()

    def write(self, message: str) -> None:
        """Prints a message above the bar without garbling it."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
