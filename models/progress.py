"""How much of a training run is left: each epoch's line ends with an estimate, from the time the epochs so far took
and what the remaining ones weigh (an epoch at a larger side costs in proportion to its pixels)."""

from __future__ import annotations

import time
from collections.abc import Sequence


def duration(seconds: float) -> str:
    """`seconds` as a person reads it: 45 s, 3 min 20 s, 1 h 05 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Eta:
    """The time left of a run of epochs whose costs are in proportion to `weights` (one per epoch)."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = [float(w) for w in weights]
        self.done = 0
        self.started = time.monotonic()

    def epoch_done(self) -> str:
        """Count one more epoch done; the estimate of what is left, as the end of its log line."""
        self.done += 1
        spent, left = sum(self.weights[:self.done]), sum(self.weights[self.done:])
        if left <= 0:
            return "done"
        elapsed = time.monotonic() - self.started
        return f"about {duration(elapsed / spent * left)} left" if spent > 0 else "estimating"
