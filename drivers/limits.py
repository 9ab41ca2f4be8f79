"""The limits an operator sets on meter sessions, and the pacing of new connections.

`SessionLimits` bounds one DLMS session: how long a TCP connect may take, how long a meter may
be silent after a request, how long the whole session may last, and how large one answer may
grow (bytes and blocks of a block transfer). Past any of them the session ends with a
`DeviceError` naming the device and its address, and its socket is aborted, so the memory the
answer held is returned.

`ConnectionPacer` spaces new connections: at most `rate` connection attempts per second for the
whole process, evenly spread (networks, NATs and firewalls dislike bursts of SYNs, and a burst of
sessions starting together stalls the reactor).

`raise_descriptor_limit` raises the process's soft RLIMIT_NOFILE to its hard limit at start and
says whether the sessions the settings allow fit in it.

Defaults (documented in README.md and docs/architecture.md) are the `SessionLimits` field
defaults and `DEFAULT_CONNECTIONS_PER_SECOND`.
"""
from __future__ import annotations

import resource
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

DEFAULT_CONNECTIONS_PER_SECOND = 1000.0
# New connections begun in one reactor turn at most (ConnectionPacer).
CONNECTIONS_PER_TURN = 8
# Descriptors kept free for what is not a meter socket: the database, listening sockets, HTTP
# callers, log files.
SPARE_DESCRIPTORS = 256


@dataclass(frozen=True)
class SessionLimits:
    """Bounds on one meter session (seconds, bytes, blocks); all must be positive."""

    connect_timeout: float = 10.0     # TCP connect
    response_timeout: float = 20.0    # silence after a request (or a block) before giving up
    session_deadline: float = 60.0    # connect to release, everything included
    max_answer_bytes: int = 4 * 1024 * 1024   # one GET answer, all its blocks together
    max_answer_blocks: int = 10_000           # blocks of one GET answer

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "response_timeout", "session_deadline",
                     "max_answer_bytes", "max_answer_blocks"):
            if not getattr(self, name) > 0:
                raise ValueError(f"session limit {name} must be positive, "
                                 f"got {getattr(self, name)!r}")

    @classmethod
    def of(cls, limits: "SessionLimits | float") -> "SessionLimits":
        """`limits` itself, or for a number t (the short form tests and scripts use) the
        defaults with connect and response timeouts t and a deadline of at least 3 t."""
        if isinstance(limits, SessionLimits):
            return limits
        return cls(connect_timeout=limits, response_timeout=limits,
                   session_deadline=max(cls.session_deadline, 3 * limits))


class ConnectionPacer:
    """At most `rate` connection attempts per second, spaced 1/rate apart (rate 0: no pacing),
    and at most `per_turn` of them begun by one timer call (one reactor turn).

    `slot()` gives a Deferred that fires when the caller may connect: at once when the last slot
    is at least 1/rate ago, otherwise at the next free instant. Cancelling a waiting slot frees
    it (the instant it held is not given back: pacing errs on the slow side).

    The slots due are released by one timer, `per_turn` at a time: when a reactor turn ran
    long, the slots that fell due meanwhile (a 50 ms turn at 1,000 a second: 50) would all
    connect in the next turn (a socket, a connect and an epoll change each, every syscall also
    handing the interpreter lock away) and make it longer still; the rest wait for the turns
    after it, `callLater(0)` apart, so a turn never begins more than `per_turn` connections."""

    def __init__(self, reactor: Any, rate: float = DEFAULT_CONNECTIONS_PER_SECOND,
                 per_turn: int = CONNECTIONS_PER_TURN) -> None:
        if rate < 0:
            raise ValueError(f"connection rate must be 0 (unpaced) or positive, got {rate!r}")
        if per_turn < 1:
            raise ValueError(f"connections per turn must be at least 1, got {per_turn!r}")
        self._reactor = reactor
        self._spacing = 1.0 / rate if rate else 0.0
        self._per_turn = per_turn
        self._next = 0.0
        self._waiting: deque[tuple[float, Deferred]] = deque()  # by instant
        self._timer: Any = None

    def slot(self) -> Deferred:
        if not self._spacing:
            waiting: Deferred = Deferred()
            waiting.callback(None)
            return waiting
        now = self._reactor.seconds()
        at = max(now, self._next)
        self._next = at + self._spacing
        if at <= now and not self._waiting:
            waiting = Deferred()
            waiting.callback(None)
            return waiting
        waiting = Deferred(self._cancelled)
        self._waiting.append((at, waiting))
        if self._timer is None:
            self._timer = self._reactor.callLater(at - now, self._release)
        return waiting

    def _release(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        released = 0
        while self._waiting and self._waiting[0][0] <= now and released < self._per_turn:
            _, waiting = self._waiting.popleft()
            released += 1
            waiting.callback(None)
        if self._waiting:
            self._timer = self._reactor.callLater(max(0.0, self._waiting[0][0] - now),
                                                  self._release)

    def _cancelled(self, waiting: Deferred) -> None:
        for entry in self._waiting:
            if entry[1] is waiting:
                self._waiting.remove(entry)
                break
        if not self._waiting and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None


@dataclass(frozen=True)
class DescriptorLimit:
    """What `raise_descriptor_limit` found: the soft limit now in force, the hard limit, and
    how many descriptors the settings need."""

    soft: int
    hard: int
    needed: int

    @property
    def sufficient(self) -> bool:
        return self.soft >= self.needed

    def explain(self) -> str:
        if self.sufficient:
            return (f"file descriptors: limit {self.soft}, sessions and spares need "
                    f"{self.needed}")
        return (f"file descriptors: the process may open {self.soft} (hard limit {self.hard}) "
                f"but the session bound needs {self.needed}: lower the session bound "
                f"(--sessions) or raise the hard limit (ulimit -Hn, LimitNOFILE=); past the "
                "limit new sessions fail as a head-end error, not as the meters' fault")


def raise_descriptor_limit(sessions: int, spare: int = SPARE_DESCRIPTORS) -> DescriptorLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit; report whether `sessions` sockets plus
    `spare` fit in it."""
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # An unlimited hard limit still has the kernel's nr_open above it: ask for 2**20.
        target = hard if hard != infinity else max(soft, 2 ** 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit; `explain` says what that allows
    soft_n = soft if soft != infinity else 2 ** 31
    hard_n = hard if hard != infinity else 2 ** 31
    return DescriptorLimit(soft_n, hard_n, sessions + spare)
