"""A terminal progress bar with rate and ETA (stderr; quiet when not a TTY unless asked)."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    """`bar.update(n_steps, items=batch_size, **metrics)`; shows steps, items/s and ETA."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "img", stream=None,
                 min_interval: float = 0.5, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self.count = initial
        self._start_count = initial
        self.items = 0
        self.start = time.time()
        self._last = 0.0
        self.metrics = {}

    def update(self, steps: int = 1, items: int = 0, **metrics):
        self.count += steps
        self.items += items
        self.metrics.update(metrics)
        now = time.time()
        if now - self._last >= self.min_interval or (self.total and self.count >= self.total):
            self._last = now
            self._render(now)

    def _render(self, now):
        elapsed = max(now - self.start, 1e-9)
        done = self.count - self._start_count
        rate = self.items / elapsed
        parts = [self.desc]
        if self.total:
            frac = min(self.count / self.total, 1.0)
            filled = int(25 * frac)
            eta = (self.total - self.count) * elapsed / done if done else float("nan")
            parts.append(f"[{'#' * filled}{'.' * (25 - filled)}] {self.count}/{self.total}")
            parts.append(f"eta {_fmt_time(eta)}")
        else:
            parts.append(f"{self.count}")
        parts.append(f"{rate:.1f} {self.unit}/s" if self.items else f"{done / elapsed:.2f} it/s")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in self.metrics.items()]
        self.stream.write("\r" + " ".join(p for p in parts if p) + "   ")
        self.stream.flush()

    def close(self):
        self._render(time.time())
        self.stream.write("\n")
        self.stream.flush()


def _fmt_time(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
