"""Progress of a long transfer: a tqdm bar on a terminal, a plain line every few seconds otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Bytes done out of a total, shown with rate and ETA on ``stream`` (stderr by default)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval: float = 10.0):
        self.label, self.total, self.done = label, total, 0
        self._stream = stream or sys.stderr
        self._interval = interval
        self._start = self._last = time.monotonic()
        self._bar = (tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                          file=self._stream, dynamic_ncols=True) if self._stream.isatty() else None)

    def update(self, count: int) -> None:
        """Count ``count`` more bytes done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._line(now)

    def close(self) -> None:
        """Finish the bar, or print the final line."""
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        meter = tqdm.format_meter(self.done, self.total, now - self._start, prefix=self.label, unit="B",
                                  unit_scale=True, unit_divisor=1024, ncols=0)
        print(meter, file=self._stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
