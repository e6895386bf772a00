"""Progress of long loops (training epochs, evaluation, calibration) that never goes silent.

On a terminal a tqdm bar shows it; whenever stderr is not a terminal (a cluster job, ``nohup``, CI, a
log file) or the bar is off, a log line every ``interval_s`` seconds (30 by default) says where the
loop is, how fast it goes and when it should end. Bars and lines never both print.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL_S = 30.0  # seconds between progress lines in the log


def _on_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``4000`` -> ``"1h06m"``, ``9`` -> ``"9s"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One loop's progress: a bar on a terminal, otherwise a log line every ``interval_s`` seconds.

    Args:
        total: steps in the loop (None when unknown).
        description: what runs, e.g. ``"finetune 3/10"``; starts every log line.
        initial: steps already done (a resumed epoch).
        bar: show a tqdm bar when stderr is a terminal (``progress=false`` turns it off; the log
            lines stay).
        unit: what one step is (``"steps"``, ``"batches"``, ``"layers"``).
        items_per_step: images per step, for an images/s figure (None: steps/s).
        interval_s: seconds between log lines.
        logger: where the lines go.
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, total: int | None, description: str, *, initial: int = 0, bar: bool = True,
                 unit: str = "steps", items_per_step: int | None = None, interval_s: float = INTERVAL_S,
                 logger: logging.Logger = log, clock: Callable[[], float] = time.perf_counter):
        self.total, self.description, self.done, self.unit = total, description, initial, unit
        self.items_per_step, self.interval_s, self.logger, self.clock = items_per_step, interval_s, logger, clock
        self.started = self.last_line = clock()
        self.start_count = initial
        self.postfix: dict = {}
        self._bar = None
        if bar and _on_terminal():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more steps done; ``postfix`` (e.g. ``loss="0.53"``) is shown beside the count."""
        self.done += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(**postfix)
            return
        now = self.clock()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line: count, percentage, rate, ETA and the postfix."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        steps = self.done - self.start_count
        parts = [f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if self.items_per_step:
            parts.append(f"{steps * self.items_per_step / elapsed:.0f} img/s")
        else:
            parts.append(f"{steps / elapsed:.2f} {self.unit}/s")
        if self.total and steps > 0:
            parts.append(f"ETA {format_duration((self.total - self.done) * elapsed / steps)}")
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return f"{self.description}: " + ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
