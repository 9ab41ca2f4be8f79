"""The concentrators' session bounds, from the stored routes, given to the drivers' shared
concentrator links (`drivers/concentrator_link.py`).

The dispatcher bounds the jobs it starts per route (`engine/limits.py`); the link to a
concentrator bounds every session on it, whoever starts it (reads, controls, event-log
fetches), to the route's `max_sessions` (a concentrator route without one:
`drivers.concentrator.DEFAULT_MAX_SESSIONS`). The dispatcher applies them when it starts.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cimhes.drivers.concentrator import DEFAULT_MAX_SESSIONS
from cimhes.drivers.concentrator_link import links_of
from cimhes.engine.store import Route, Store

DEFAULT_PORT = 4059


def concentrator_bounds(store: Store) -> dict[tuple[str, int], int]:
    """(host, port) -> sessions at once, for every stored route of kind concentrator."""
    with Session(store.engine) as session:
        rows = session.execute(select(Route.host, Route.port, Route.max_sessions)
                               .where(Route.kind == "concentrator", Route.host.is_not(None)))
        return {(host, port or DEFAULT_PORT): bound or DEFAULT_MAX_SESSIONS
                for host, port, bound in rows}


def apply_concentrator_bounds(reactor: Any, bounds: dict[tuple[str, int], int]) -> None:
    links = links_of(reactor)
    for (host, port), bound in bounds.items():
        links.bound(host, port, bound)


__all__ = ["concentrator_bounds", "apply_concentrator_bounds"]
