"""Bounded reactor turns for the SOAP door's own CPU work, and a worker thread for large bodies.

Every HTTP request, a WSDL fetch as much as a SOAP call, is served by the one reactor thread,
which also carries every meter session. When 200 SOAP POSTs arrive together, handling each in
full where it arrives (parse the envelope, spyne's dispatch, the door's decoding and validation,
later the reply's serialisation and its log line) makes one reactor turn of several hundred
milliseconds, and a WSDL GET that arrived meanwhile waits for all of it (bench/README.md,
concurrent_calls.py).

`ReactorSlices` queues those steps instead and runs them first in, first out, at most
``budget`` seconds of them per reactor turn (always at least one), then lets the reactor poll its
sockets again before the next slice. A GET, answered straight from the served-document cache in
``render_GET``, waits for at most one slice, not for a burst. The queue holds at most one step
per request being handled, and a request needs an open connection (HTTP door: at most
``max_connections``, 512 by default), so it is bounded by the connection cap.

`ParsePool` is one worker thread on which request bodies larger than
``PARSE_ON_REACTOR_MAX_BYTES`` are parsed (the hardened parser and spyne's envelope checks), so a
4 MiB document never holds the reactor for the ~0.3 s its parse and element count take; lxml
parses without the GIL.
"""
from __future__ import annotations

import time
from collections import deque

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

# Seconds of queued door steps one reactor turn runs at most (one step always runs).
DEFAULT_BUDGET = 0.004
# Bodies up to this size are parsed on the reactor, in a slice (a few ms at most); larger ones
# on the parse thread.
PARSE_ON_REACTOR_MAX_BYTES = 64 * 1024


class ReactorSlices:
    """Runs queued callables on the reactor, FIFO, at most ``budget`` seconds per turn."""

    def __init__(self, reactor=None, budget: float = DEFAULT_BUDGET,
                 clock=time.perf_counter):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._budget = budget
        self._clock = clock
        self._queue: deque = deque()
        self._scheduled = None
        self.turns = 0  # slices run so far (for tests and benchmarks)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, function, *args, **kwargs) -> Deferred:
        """Deferred of ``function(*args, **kwargs)`` (itself maybe a Deferred), run in a later
        slice, after every step submitted before it."""
        done = Deferred()
        self._queue.append((done, function, args, kwargs))
        if self._scheduled is None:
            self._scheduled = self._reactor.callLater(0, self._turn)
        return done

    def _turn(self) -> None:
        # Still "scheduled" while it runs: a step that submits another (the next step of its
        # request) must not schedule a second turn; this one reschedules once, at its end.
        self.turns += 1
        deadline = self._clock() + self._budget
        try:
            while self._queue:
                done, function, args, kwargs = self._queue.popleft()
                maybeDeferred(function, *args, **kwargs).chainDeferred(done)
                if self._clock() >= deadline:
                    break
        finally:
            self._scheduled = (self._reactor.callLater(0, self._turn) if self._queue
                               else None)


class ParsePool:
    """One worker thread for parsing large request bodies, started on first use."""

    def __init__(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._pool: ThreadPool | None = None

    def run(self, function, *args) -> Deferred:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="cimhes-soap-parse")
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._stop)
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def _stop(self) -> None:
        if self._pool is not None and self._pool.started:
            self._pool.stop()
        self._pool = None


_shared: dict[int, tuple[ReactorSlices, ParsePool]] = {}


def shared(reactor=None) -> tuple[ReactorSlices, ParsePool]:
    """The process's one ReactorSlices and ParsePool for ``reactor`` (default: the global one),
    shared by every SOAP service of the site, so one FIFO orders all their steps."""
    if reactor is None:
        from twisted.internet import reactor
    key = id(reactor)
    if key not in _shared:
        _shared[key] = (ReactorSlices(reactor), ParsePool(reactor))
    return _shared[key]

