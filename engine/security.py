"""The store's security records: each meter's invocation counters, and security events.

`invocation_counter` holds, per device, the next client counter the head-end may use and the
largest counter accepted from the meter; `security_event` records replays and authentication
failures (what, when, which device; never a key). `StoredCounters` is the drivers'
`CounterBook` on these tables: each call is one transaction on the store's thread, and a
reservation is a single UPDATE ... RETURNING, so two sessions (or two processes on one
PostgreSQL) never get the same counters.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Integer, String, case, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column
from twisted.internet.defer import Deferred

from cimhes.drivers.security import CounterReservation
from cimhes.engine.store import Base, EpochMillis, Store, StoreRunner


class InvocationCounterRecord(Base):
    __tablename__ = "invocation_counter"
    device_mrid: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_client: Mapped[int] = mapped_column(BigInteger)  # first client counter never handed out
    last_server: Mapped[int] = mapped_column(BigInteger)  # largest accepted from it (-1: none)


class SecurityEventRecord(Base):
    __tablename__ = "security_event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(EpochMillis())
    device_mrid: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(500))


@dataclass(frozen=True)
class SecurityEvent:
    at: datetime
    device_mrid: str
    kind: str
    detail: str


class CounterStore:
    """Blocking unit-of-work methods on the security tables (run them on the store thread)."""

    def __init__(self, store: Store, now: Callable[[], datetime] | None = None):
        self._engine = store.engine
        self._now = now or (lambda: datetime.now(timezone.utc))

    def batch(self, operations: list[tuple[Callable, tuple]]) -> list:
        """Run (unit, args) operations in one transaction, each unit one of this class's
        `_reserve`, `_start`, `_seen`, `_security_event`; their results in order."""
        with self._engine.begin() as connection:
            return [unit(connection, *args) for unit, args in operations]

    def reserve(self, device_mrid: str, count: int) -> CounterReservation | None:
        with self._engine.begin() as connection:
            return self._reserve(connection, device_mrid, count)

    def _reserve(self, connection, device_mrid: str, count: int) -> CounterReservation | None:
        table = InvocationCounterRecord
        row = connection.execute(
            update(table).where(table.device_mrid == device_mrid)
            .values(next_client=table.next_client + count)
            .returning(table.next_client, table.last_server)).first()
        if row is None:
            return None
        return CounterReservation(row.next_client - count, row.next_client, row.last_server)

    def start(self, device_mrid: str, first: int, count: int) -> CounterReservation:
        with self._engine.begin() as connection:
            return self._start(connection, device_mrid, first, count)

    def _start(self, connection, device_mrid: str, first: int, count: int) -> CounterReservation:
        table = InvocationCounterRecord
        dialect_insert = (postgresql_insert if self._engine.dialect.name == "postgresql"
                          else sqlite_insert)
        connection.execute(dialect_insert(table).values(
            device_mrid=device_mrid, next_client=first, last_server=-1)
            .on_conflict_do_nothing(index_elements=["device_mrid"]))
        # Another session may have started the device meanwhile: never go below either.
        row = connection.execute(
            update(table).where(table.device_mrid == device_mrid)
            .values(next_client=case((table.next_client < first, first),
                                     else_=table.next_client) + count)
            .returning(table.next_client, table.last_server)).one()
        return CounterReservation(row.next_client - count, row.next_client, row.last_server)

    def seen(self, device_mrid: str, server_counter: int) -> None:
        with self._engine.begin() as connection:
            self._seen(connection, device_mrid, server_counter)

    def _seen(self, connection, device_mrid: str, server_counter: int) -> None:
        table = InvocationCounterRecord
        connection.execute(
            update(table).where(table.device_mrid == device_mrid,
                                table.last_server < server_counter)
            .values(last_server=server_counter))

    def counters(self, device_mrid: str) -> tuple[int, int] | None:
        """(next client counter, last server counter) recorded for the device, or None."""
        table = InvocationCounterRecord
        with self._engine.connect() as connection:
            row = connection.execute(select(table.next_client, table.last_server)
                                     .where(table.device_mrid == device_mrid)).first()
        return None if row is None else (row.next_client, row.last_server)

    def security_event(self, device_mrid: str, kind: str, detail: str) -> None:
        with self._engine.begin() as connection:
            self._security_event(connection, device_mrid, kind, detail)

    def _security_event(self, connection, device_mrid: str, kind: str, detail: str) -> None:
        connection.execute(insert(SecurityEventRecord).values(
            at=self._now(), device_mrid=device_mrid, kind=kind, detail=detail[:500]))

    def security_events(self, device_mrid: str | None = None) -> list[SecurityEvent]:
        table = SecurityEventRecord
        query = select(table.at, table.device_mrid, table.kind, table.detail).order_by(table.id)
        if device_mrid is not None:
            query = query.where(table.device_mrid == device_mrid)
        with self._engine.connect() as connection:
            return [SecurityEvent(*row) for row in connection.execute(query)]


class StoredCounters:
    """The drivers' `CounterBook`: `CounterStore` on the store's thread, as Deferreds.

    Calls that arrive while the store thread is busy with earlier ones are done together in one
    transaction (group commit, as `ReadingWriter` does for readings): with hundreds of sessions
    starting and ending at once, one commit serves many, and each call still gets its own
    answer. A reservation is still one UPDATE ... RETURNING of its own inside that transaction."""

    def __init__(self, runner: StoreRunner, counter_store: CounterStore):
        self._runner = runner
        self.store = counter_store
        self._queued: list[tuple[Callable, tuple, Deferred]] = []
        self._writing = False

    def reserve(self, device_mrid: str, count: int) -> Deferred:
        return self._queue(self.store._reserve, (device_mrid, count))

    def start(self, device_mrid: str, first: int, count: int) -> Deferred:
        return self._queue(self.store._start, (device_mrid, first, count))

    def seen(self, device_mrid: str, server_counter: int) -> Deferred:
        return self._queue(self.store._seen, (device_mrid, server_counter))

    def security_event(self, device_mrid: str, kind: str, detail: str) -> Deferred:
        return self._queue(self.store._security_event, (device_mrid, kind, detail))

    def _queue(self, operation: Callable, args: tuple) -> Deferred:
        done = Deferred()
        self._queued.append((operation, args, done))
        if not self._writing:
            self._write_queued()
        return done

    def _write_queued(self) -> None:
        batch, self._queued = self._queued, []
        self._writing = bool(batch)
        if not batch:
            return
        written = self._runner.call(self.store.batch, [(op, args) for op, args, _ in batch])

        def settle(results):
            for (_, _, done), result in zip(batch, results):
                if isinstance(result, Exception):
                    done.errback(result)
                else:
                    done.callback(result)
            self._write_queued()

        def failed(failure):
            for _, _, done in batch:
                done.errback(failure)
            self._write_queued()

        written.addCallbacks(settle, failed)
