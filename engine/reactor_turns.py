"""Whether the reactor thread is in a turn, so that the store's thread can give way to it.

The store's thread and the reactor share one interpreter lock. While the store thread runs a
unit of work (SQLAlchemy builds and compiles statements: milliseconds of Python each), every
syscall the reactor makes in its turn (a send, an epoll change, an accept, a
connect) hands the lock over and the reactor then waits to get it back: measured during
`bench/concurrent_calls.py`, the reactor's turns of 20 ms or more were off the CPU, neither
running nor runnable, for about half their length while the store thread ran for 60-70 % of it
(bench/README.md, "The store thread gives way to the reactor's turns"). A WSDL fetch takes three
or four turns (accept, request, answer, close), so turns stretched from ~10 to 40-70 ms put it
past 100 ms.

`ReactorTurns` watches the reactor's poll (the one place where it waits for the world): outside
it, the reactor is in a turn. `give_way(at_most)`, on another thread, waits until the reactor
waits in its poll, for at most `at_most` seconds, so a unit of work starts when the reactor is
idle and no longer stretches a turn. A poll that returns at once (sockets still ready: the
ready-socket bound of engine/ready_sockets.py hands the reactor 16 a turn) begins the next turn
and does not end the wait (measured: with it ending the wait, turns of 20 ms or more were again
half lock waits). The bound keeps the store's thread going when the reactor is busy turn after
turn.

The store's thread asks `before_work(bulk)` before each unit: a bulk unit (readings, outcomes,
device status: tens of ms) always gives way; a unit of the first lane (a request's own lookups
and small writes, a few ms) only once the store thread has already worked `FIRST_LANE_BUDGET`
during the reactor's turn in progress. A small request's lookups, one after the other, each
come back to the reactor and go out again: were each to wait for the end of a turn, a 1-meter
call beside a large request's 200 sessions (turns of ~25 ms, back to back) would wait ~10 of
them; a few ms of the store's work stretch a turn by no more than that. Only a reactor with a
`_poller` (Twisted's epoll and poll reactors) is watched; with any other `ReactorTurns.of` gives
None and nobody waits.

This module wraps the reactor's `_poller` (Twisted has no hook saying when the reactor polls);
it composes with the ready-socket bound of engine/ready_sockets.py, which wraps the same poller
in either order.
"""
from __future__ import annotations

import threading
import time
from typing import Any

# How long the store's thread waits at most for a reactor turn to end before a unit of work.
GIVE_WAY = 0.05
# The store's work in one reactor turn before its first-lane units give way too.
FIRST_LANE_BUDGET = 0.005


class ReactorTurns:
    """See the module docstring."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self._polling = threading.Event()
        self._in_turn = False
        self._turn = 0  # turns begun so far
        self._worked_in = -1  # the turn the store's thread last worked in, and how long
        self._worked = 0.0
        self.waits = 0  # give_way calls that found the reactor in a turn (tests, benchmarks)

    @classmethod
    def of(cls, reactor: Any) -> ReactorTurns | None:
        """The reactor's watcher (one per reactor, installed on first use), or None if this
        kind of reactor cannot be watched."""
        turns = getattr(reactor, "_cimhes_turns", None)
        if turns is not None:
            return turns
        poller = getattr(reactor, "_poller", None)
        if poller is None or not callable(getattr(poller, "poll", None)):
            return None
        turns = cls(poller)
        reactor._poller = _WatchedPoller(poller, turns)
        reactor._cimhes_turns = turns
        return turns

    @property
    def in_turn(self) -> bool:
        return self._in_turn

    def give_way(self, at_most: float) -> None:
        """On a thread other than the reactor's: if the reactor is in a turn, wait until it
        waits in its poll, at most `at_most` seconds. A poll that returns at once (sockets
        ready; at most EVENTS_PER_TURN of them a turn) is the start of the next turn, not a
        pause: the wait goes on to the next poll."""
        if not self._in_turn:
            return
        self.waits += 1
        deadline = time.monotonic() + at_most
        while self._in_turn:
            left = deadline - time.monotonic()
            if left <= 0 or not self._polling.wait(left):
                return

    def before_work(self, bulk: bool) -> None:
        """On the store's thread, before a unit of work (see the module docstring)."""
        if not self._in_turn:
            return
        if bulk or (self._worked_in == self._turn and self._worked >= FIRST_LANE_BUDGET):
            self.give_way(GIVE_WAY)

    def after_work(self, started_in: int, seconds: float) -> None:
        """On the store's thread: a first-lane unit begun in turn `started_in` took `seconds`
        (a bulk unit gave way before it began: it does not count against the budget)."""
        if started_in == self._worked_in:
            self._worked += seconds
        else:
            self._worked_in, self._worked = started_in, seconds

    @property
    def turn(self) -> int:
        return self._turn

    # -- on the reactor's thread -------------------------------------------------------------

    def polling(self) -> None:
        self._in_turn = False
        self._polling.set()

    def polled(self) -> None:
        self._polling.clear()
        self._turn += 1
        self._in_turn = True


class _WatchedPoller:
    """The reactor's poller, telling `ReactorTurns` when the reactor enters and leaves it."""

    def __init__(self, poller: Any, turns: ReactorTurns) -> None:
        self.wrapped = poller
        self._turns = turns

    def poll(self, *args, **kwargs):
        self._turns.polling()
        try:
            return self.wrapped.poll(*args, **kwargs)
        finally:
            self._turns.polled()

    def __getattr__(self, name: str):  # register, modify, unregister, close, fileno
        return getattr(self.wrapped, name)


__all__ = ["FIRST_LANE_BUDGET", "GIVE_WAY", "ReactorTurns"]
