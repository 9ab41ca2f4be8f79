"""How a head-end process runs Python's cyclic garbage collector: rarely, and not over what
was loaded at start.

A full meter read allocates thousands of short-lived objects (decoded rows, Decimals, CIM
readings) and almost none of them form cycles: reference counting frees them. With the default
thresholds (700, 10, 10) the collector ran several times per read and, as a large request's
results accumulate, kept re-scanning every object still held, about a sixth of a read's CPU
(bench/read_fleet.py). `tune_for_throughput` freezes what exists at start (modules, the
inventory: never garbage) and collects the young generation after 10,000 allocations instead
of 700, the middle one after 10 of those, and a full collection only after 200 middle ones
(20 million allocations, as with the thresholds before). Cycles are still collected, later.

Each pass stops the reactor: with 5,000 sessions open, a middle-generation pass over 20 x
50,000 allocations' survivors (the thresholds before) took up to 0.45-0.54 s of CPU; over
10 x 10,000 it takes ~0.11-0.14 s, for ~10-20 % more collector CPU in all (bench/sessions.py,
issue 5).

`release_memory_soon` is called after a large request's answer: a full collection, then glibc's
`malloc_trim(0)`. Python frees a request's objects by reference counting, but the allocator keeps
the freed pages (CPython's arenas are returned only when wholly empty, glibc's heap only from its
top), so a process that answered one 5,000-meter request kept ~230 MB it no longer used
(bench/abuse.py). The trim is the one workaround for that here; without glibc it is skipped.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000
OLDER_THRESHOLDS = (10, 200)


def tune_for_throughput() -> None:
    """Call once, after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)


RELEASE_DELAY = 1.0  # s after the answer: the reply's bytes are written by then
_pending = {"call": None}


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim with
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Collect every generation, then hand the allocator's free pages back to the system."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


def release_memory_soon(reactor, delay: float = RELEASE_DELAY) -> None:
    """`release_memory` once, `delay` s from now (calls meanwhile share it)."""
    call = _pending["call"]
    if call is not None and call.active():
        return

    def run():
        _pending["call"] = None
        release_memory()
    _pending["call"] = reactor.callLater(delay, run)
