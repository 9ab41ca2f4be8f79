"""Per-route session bounds across engine processes: database-held leases, one row per slot.

One engine alone enforces `max_sessions_per_route` in memory (`ConnectionBounds`). Several
engines over one PostgreSQL store share the bound through the `route_lease` table: a row is one
session slot on a route, held by one engine until `expires_at`. Before an engine opens a session
on a route it must hold a free slot of its own there; it takes slots one at a time
(`acquire`), keeps them while it has sessions to open on the route, renews every slot it holds
in one statement every `ttl / 4` seconds (`renew`), and gives back the ones it has not used
since the last renewal (`release`).

Why this holds: `acquire` counts the route's live rows and inserts at most `limit - count`,
under a transaction-scoped advisory lock on the route (PostgreSQL `pg_advisory_xact_lock`), so
two engines never both see room for the last slot; every engine counts the same rows, so the
route never has more than `limit` sessions open over all engines. An engine that dies holds its
slots until they expire: `ttl` (default 120 s) is longer than a session can last (the session
deadline, 60 s by default, plus the connect timeout), so by then its sessions are certainly
over, and the route runs below its bound for at most `ttl`.

A route with a bound of its own (a concentrator's, from the store's route table) is bounded by
that; every engine reads the same table, so they agree on it.

On SQLite (one process) the table is not used: the role split needs a server database.
"""
from __future__ import annotations

import zlib
from datetime import datetime, timedelta

from sqlalchemy import Index, String, delete, func, insert, select, text, update
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from cimhes.engine.store import Base, EpochMillis, Store

DEFAULT_LEASE_SECONDS = 120.0
# The advisory lock's first key: "cimh" as a 32-bit integer, so cimhes's locks meet no other's.
_LOCK_NAMESPACE = 0x63696D68


class RouteLeaseRecord(Base):
    """One session slot on a route, held by one engine until `expires_at`."""

    __tablename__ = "route_lease"
    __table_args__ = (Index("ix_route_lease_route", "route", "expires_at"),
                      Index("ix_route_lease_engine", "engine_id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    route: Mapped[str] = mapped_column(String(128))
    engine_id: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(EpochMillis())


def _route_key(route: str) -> int:
    value = zlib.crc32(route.encode())
    return value - (1 << 32) if value >= 1 << 31 else value  # a signed int4


class RouteLeases:
    """Blocking unit-of-work methods over `route_lease` (run them on the store's thread)."""

    def __init__(self, store: Store, limit: int, ttl: float = DEFAULT_LEASE_SECONDS):
        if limit < 1 or ttl <= 0:
            raise ValueError("a route lease needs a limit of at least 1 and a positive ttl")
        self._session = sessionmaker(store.engine)
        self._postgres = store.engine.dialect.name == "postgresql"
        self.limit = limit
        self.ttl = timedelta(seconds=ttl)

    def acquire(self, route: str, engine_id: str, wanted: int, now: datetime,
                limit: int | None = None) -> int:
        """Take up to `wanted` more slots on `route` for `engine_id`; how many were taken.
        `limit`: the route's own bound (a concentrator's), else the default one."""
        limit = self.limit if limit is None else limit
        with self._session.begin() as session:
            if self._postgres:
                session.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                                {"ns": _LOCK_NAMESPACE, "key": _route_key(route)})
            session.execute(delete(RouteLeaseRecord).where(
                RouteLeaseRecord.route == route, RouteLeaseRecord.expires_at <= now))
            held = session.scalar(select(func.count()).where(RouteLeaseRecord.route == route))
            granted = max(0, min(wanted, limit - (held or 0)))
            if granted:
                session.execute(insert(RouteLeaseRecord), [
                    {"route": route, "engine_id": engine_id, "expires_at": now + self.ttl}
                    for _ in range(granted)])
            return granted

    def renew(self, engine_id: str, now: datetime) -> int:
        """Extend every slot `engine_id` holds; how many it holds (fewer than it thinks: some
        expired, e.g. after a long pause, and may be another engine's now)."""
        with self._session.begin() as session:
            return session.execute(update(RouteLeaseRecord).where(
                RouteLeaseRecord.engine_id == engine_id, RouteLeaseRecord.expires_at > now)
                .values(expires_at=now + self.ttl)).rowcount

    def release(self, engine_id: str, counts: dict[str, int]) -> None:
        """Give back `counts[route]` slots of `engine_id` on each route."""
        with self._session.begin() as session:
            for route, count in counts.items():
                ids = session.scalars(select(RouteLeaseRecord.id).where(
                    RouteLeaseRecord.route == route, RouteLeaseRecord.engine_id == engine_id)
                    .limit(count)).all()
                if ids:
                    session.execute(delete(RouteLeaseRecord).where(
                        RouteLeaseRecord.id.in_(ids)))

    def release_all(self, engine_id: str) -> None:
        with self._session.begin() as session:
            session.execute(delete(RouteLeaseRecord).where(
                RouteLeaseRecord.engine_id == engine_id))

    def held(self, route: str, now: datetime) -> dict[str, int]:
        """Live slots on `route` per engine (for tests and the operator)."""
        with self._session() as session:
            return dict(session.execute(
                select(RouteLeaseRecord.engine_id, func.count())
                .where(RouteLeaseRecord.route == route, RouteLeaseRecord.expires_at > now)
                .group_by(RouteLeaseRecord.engine_id)).all())


__all__ = ["RouteLeaseRecord", "RouteLeases", "DEFAULT_LEASE_SECONDS"]
