"""How much socket work one turn of the reactor does: at most `EVENTS_PER_TURN` ready sockets.

Twisted's epoll reactor asks the kernel for every ready socket at once (maxevents = all of
them) and handles them all before it runs a timer or a store result. With thousands of meter
sessions whose answers arrive together (sessions started together stay in step: same
exchanges, same delays), one turn handled hundreds of answers, each a step of a session and
some a whole read's conversion to CIM, and every timer (response timeouts, the connection
pacer, another request's work) waited for all of them: the reactor's lag at 2,000-5,000
sessions (bench/sessions.py, "5,000 sessions at 1 s").

`bound_events_per_turn` caps maxevents. epoll is level-triggered here, so a ready socket left
out is returned by the next poll, at once, and Linux rotates its ready list, so every socket is
served in turn; what changes is that timers and thread results run between every
`EVENTS_PER_TURN` sockets. The work is the same, spread into bounded turns (an epoll_wait per
16 sockets costs some microseconds; measured at 5,000 sessions, 64 per turn left the reactor's
own CPU between two 10 ms ticks over 50 ms 18 times, 16 per turn 7 times).

This is the one place that caps Twisted's poll (the epoll reactor's `_poller` attribute: a
`select.epoll`, or whatever already wraps it and passes `poll(timeout, maxevents)` on): Twisted
has no setting for it. A reactor that is not the epoll one is left as it is.
"""
from __future__ import annotations

import select
from typing import Any

EVENTS_PER_TURN = 16


class BoundedPoller:
    """A `select.epoll` (or a wrapper of one) whose `poll` returns at most `events` ready
    descriptors."""

    def __init__(self, poller: Any, events: int) -> None:
        if events < 1:
            raise ValueError(f"events per turn must be at least 1, got {events!r}")
        self.events = events
        self.poller = poller
        # The calls Twisted makes on every write or read change: the epoll's own methods.
        self.register = poller.register
        self.modify = poller.modify
        self.unregister = poller.unregister
        self.close = poller.close
        self.fileno = poller.fileno

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        return self.poller.poll(timeout, self.events if maxevents < 1
                                else min(maxevents, self.events))


def bound_events_per_turn(reactor: Any, events: int = EVENTS_PER_TURN) -> bool:
    """Cap the ready sockets `reactor` handles per turn at `events`; False when `reactor` is
    not Twisted's epoll reactor (nothing changed). Calling it again sets the new cap."""
    poller = getattr(reactor, "_poller", None)
    if isinstance(poller, BoundedPoller):
        reactor._poller = BoundedPoller(poller.poller, events)
        return True
    if not _is_epoll_reactor(reactor) or not callable(getattr(poller, "poll", None)):
        return False
    reactor._poller = BoundedPoller(poller, events)
    return True


def _is_epoll_reactor(reactor: Any) -> bool:
    if not hasattr(select, "epoll"):
        return False
    from twisted.internet.epollreactor import EPollReactor
    return isinstance(reactor, EPollReactor)
