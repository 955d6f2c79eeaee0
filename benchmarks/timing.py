"""Interleaved timing, shared by the benchmark scripts.

Every runner runs once per round, the order reversed every other round, so machine noise
(this machine is shared) hits all of them alike; medians of the rounds after the warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["interleaved"]


def interleaved(runners: dict[Any, Callable[[Any], Any]], x, warmup: int, rounds: int) -> dict[Any, float]:
    """Median seconds of ``runner(x)`` per runner."""
    times: dict[Any, list[float]] = {k: [] for k in runners}
    for r in range(warmup + rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for k in order:
            start = time.perf_counter()
            runners[k](x)
            if r >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}
