"""How a head-end process runs Python's cyclic garbage collector: rarely, and not over what
was loaded at start.

A full meter read allocates thousands of short-lived objects (decoded rows, Decimals, CIM
readings) and almost none of them form cycles: reference counting frees them. With the default
thresholds (700, 10, 10) the collector ran several times per read and, as a large request's
results accumulate, kept re-scanning every object still held, about a sixth of a read's CPU
(bench/read_fleet.py). `tune_for_throughput` freezes what exists at start (modules, the
inventory: never garbage) and collects the young generation after 50,000 allocations instead
of 700. Cycles are still collected, later.
"""
from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
OLDER_THRESHOLDS = (20, 20)


def tune_for_throughput() -> None:
    """Call once, after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
