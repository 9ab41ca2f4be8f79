"""The engine's settings and the connection bounds every session to a device passes through.

`EngineSettings` is the one place the engine's own bounds, retry policy and re-read policy are
configured (the CLI's flags fill it; docs/architecture.md lists the defaults). The bounds of one
session (timeouts, answer sizes) and the pacing of new connections are the drivers'
(`cimhes.drivers.limits`); the global session bound is `HeadEndSettings.read_concurrency`.

`ConnectionBounds` is the sans-IO bookkeeping of the bounds a dispatcher enforces before it
connects: sessions open at once, sessions per route (a route's own bound when it has one: a
concentrator's PLC segment), and the gap between two connections to one device. It is asked "may a session to this device start now?", told when one starts and ends,
and answers with the time at which a refused device would next be allowed, so the dispatcher
sleeps on one timer instead of polling.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields


@dataclass
class EngineSettings:
    """The engine's own bounds and policies (defaults documented in docs/architecture.md).

    `max_sessions_per_route`: sessions open at once on one route (a concentrator's segment, a
    cellular cell; devices without a route share none). `min_device_gap`: seconds between the
    end of one connection to a device and the next (meters count invocations and many refuse a
    quick reconnect). `prefetch`: jobs claimed from the store ahead of free sessions. A
    scheduled read is tried `max_attempts` times, waiting `retry_delay` x 2^(attempt-1) (at most
    `retry_delay_max`) plus up to `retry_jitter` of that at random; an on-demand read
    `on_demand_attempts` times (its caller is waiting). Re-reads of missing intervals wait
    `reread_delay` seconds between rounds, until complete or the run's deadline.
    `poll_interval`: how often the store is asked for jobs that fell due or came from elsewhere.
    `request_session_share`: the part of the session bound one request may hold while another
    request of its priority has a job that could start (a lone request may use every session;
    engine/dispatch.py, "Order").
    """

    max_sessions_per_route: int = 16
    min_device_gap: float = 0.5
    prefetch: int = 1000
    max_attempts: int = 4
    on_demand_attempts: int = 1
    retry_delay: float = 30.0
    retry_delay_max: float = 900.0
    retry_jitter: float = 0.2
    reread_delay: float = 900.0
    poll_interval: float = 5.0
    request_session_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_sessions_per_route", "prefetch", "max_attempts", "on_demand_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine setting {name} must be at least 1, "
                                 f"got {getattr(self, name)}")
        for name in ("min_device_gap", "retry_delay", "retry_delay_max", "retry_jitter",
                     "reread_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"engine setting {name} must not be negative")
        if self.poll_interval <= 0:
            raise ValueError("engine setting poll_interval must be positive")
        if not 0 < self.request_session_share <= 1:
            raise ValueError("engine setting request_session_share must be above 0 and at most "
                             f"1, got {self.request_session_share}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def session_share(self, max_sessions: int) -> int:
        """Sessions one request may hold while another waits: `request_session_share` of
        `max_sessions`, at least 1."""
        return max(1, int(self.request_session_share * max_sessions))

    def retry_wait(self, attempts: int, random: Callable[[], float]) -> float:
        """Seconds before attempt `attempts + 1`: exponential backoff with jitter, capped."""
        base = min(self.retry_delay * 2 ** max(attempts - 1, 0), self.retry_delay_max)
        return base * (1 + self.retry_jitter * random())


class ConnectionBounds:
    """Which device may be connected to now, under the global, per-route and per-device-gap
    bounds. `clock` gives seconds (the reactor's)."""

    def __init__(self, max_sessions: int, settings: EngineSettings, clock: Callable[[], float]):
        if max_sessions < 1:
            raise ValueError(f"the session bound must be at least 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self._settings = settings
        self._clock = clock
        self.open = 0
        self._per_route: dict[str, int] = {}
        # Routes with a bound of their own (a concentrator's segment, from the store's route
        # table); any other route has `max_sessions_per_route`.
        self.route_limits: dict[str, int] = {}
        self._busy: set[str] = set()
        self._last_end: dict[str, float] = {}

    def wait_for(self, device: str, route: str | None) -> float | None:
        """0 if a session to `device` may start now; else seconds until it might (None: not
        before some session ends)."""
        if self.open >= self.max_sessions or device in self._busy:
            return None
        if route is not None and self._per_route.get(route, 0) >= self.route_limit(route):
            return None
        last = self._last_end.get(device)
        if last is not None:
            gap_left = last + self._settings.min_device_gap - self._clock()
            if gap_left > 0:
                return gap_left
        return 0.0

    def route_limit(self, route: str) -> int:
        """Sessions that may be open at once on `route`."""
        return self.route_limits.get(route, self._settings.max_sessions_per_route)

    def on_route(self, route: str) -> int:
        """Sessions open now on `route` in this process."""
        return self._per_route.get(route, 0)

    def started(self, device: str, route: str | None) -> None:
        self.open += 1
        self._busy.add(device)
        if route is not None:
            self._per_route[route] = self._per_route.get(route, 0) + 1

    def ended(self, device: str, route: str | None) -> None:
        self.open -= 1
        self._busy.discard(device)
        if self._settings.min_device_gap > 0:
            self._last_end[device] = self._clock()
        if route is not None:
            left = self._per_route[route] - 1
            if left:
                self._per_route[route] = left
            else:
                del self._per_route[route]
        if len(self._last_end) > 2 * self._settings.prefetch + 1000:
            self._forget_passed_gaps()

    def _forget_passed_gaps(self) -> None:
        # Bounded memory: a device whose gap has passed needs no entry.
        horizon = self._clock() - self._settings.min_device_gap
        self._last_end = {d: t for d, t in self._last_end.items() if t > horizon}
