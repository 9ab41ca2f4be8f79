"""The store's security records: each meter's invocation counters, and security events.

`invocation_counter` holds, per device, the next client counter the head-end may use (a
high-water mark: every counter below it may have been handed out) and the largest counter
accepted from the meter; `security_event` records replays and authentication failures (what,
when, which device; never a key). `StoredCounters` is the drivers' `CounterBook` on these
tables.

Reserving ranges, as real head-ends do: the store hands a process the counters of
`sessions_per_reservation` sessions at once (`SESSIONS_PER_RESERVATION`, 16) and the process
gives them to its sessions from memory, so a meter's row is moved once every 16 sessions
instead of once per session. The row always stays above every counter handed out, so a restart
(which forgets the rest of a range) skips ahead and never reuses one, and two processes on one
PostgreSQL get disjoint ranges. The largest counter seen from the meter is still read from the
store for every session (another process may have talked to the meter since) and written back
after it, before the read's result is given.

Calls are group-committed on the store's thread: what arrives while a transaction runs goes
into the next one, and within it the range reservations, the last-counter reads and the `seen`
updates of all sessions are one statement each (executemany, one SELECT of the rows).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Integer, String, bindparam, case, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

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


# Sessions' worth of client counters a process takes from the store at once (see above).
SESSIONS_PER_RESERVATION = 16
# Devices whose reserved ranges a process keeps in memory; past it the oldest range is
# forgotten (its counters are never used: the store's mark is above them).
MAX_HELD_RANGES = 100_000
_IN_CHUNK = 500  # devices per SELECT ... IN


class CounterStore:
    """Blocking unit-of-work methods on the security tables (run them on the store thread)."""

    def __init__(self, store: Store, now: Callable[[], datetime] | None = None):
        self._engine = store.engine
        self._now = now or (lambda: datetime.now(timezone.utc))
        table = InvocationCounterRecord.__table__
        self._reserve_many = (
            update(table).where(table.c.device_mrid == bindparam("device"))
            .values(next_client=table.c.next_client + bindparam("count")))
        self._seen_many = (
            update(table).where(table.c.device_mrid == bindparam("device"),
                                table.c.last_server < bindparam("counter"))
            .values(last_server=bindparam("counter")))
        self._set_next_many = (
            update(table).where(table.c.device_mrid == bindparam("device"))
            .values(next_client=bindparam("next_client")))
        self._many = {"_reserve": self._reserve_batch, "_start": self._start_batch,
                      "_seen": self._seen_batch, "_last_server": self._last_server_batch}

    def batch(self, operations: list[tuple[Callable, tuple]]) -> list:
        """Run (unit, args) operations in one transaction, each unit one of this class's
        `_reserve`, `_start`, `_seen`, `_last_server`, `_security_event`; their results in
        order. A batch's `_reserve`s, `_start`s, `_seen`s and `_last_server`s are done together
        (an executemany or a SELECT each), security events one by one; kinds in order of
        first arrival."""
        results: list = [None] * len(operations)
        groups: dict[str, list[tuple[int, Callable, tuple]]] = {}
        for index, (unit, args) in enumerate(operations):
            groups.setdefault(unit.__name__, []).append((index, unit, args))
        with self._engine.begin() as connection:
            for name, members in groups.items():
                many = self._many.get(name)
                if many is not None:
                    values = many(connection, [args for _, _, args in members])
                else:
                    values = [unit(connection, *args) for _, unit, args in members]
                for (index, _, _), value in zip(members, values):
                    results[index] = value
        return results

    def _rows(self, connection, devices) -> dict[str, tuple[int, int]]:
        """(next client, last server) of each device that has a row."""
        table = InvocationCounterRecord.__table__
        found: dict[str, tuple[int, int]] = {}
        devices = list(devices)
        for at in range(0, len(devices), _IN_CHUNK):
            for row in connection.execute(
                    select(table.c.device_mrid, table.c.next_client, table.c.last_server)
                    .where(table.c.device_mrid.in_(devices[at:at + _IN_CHUNK]))):
                found[row.device_mrid] = (row.next_client, row.last_server)
        return found

    def _reserve_batch(self, connection, calls: list[tuple[str, int]]
                       ) -> list[CounterReservation | None]:
        """Many `_reserve`s: one executemany UPDATE, then one SELECT of the rows (locked by
        this transaction until it commits, so it reads what the UPDATE left)."""
        total: dict[str, int] = {}
        for device, count in calls:
            total[device] = total.get(device, 0) + count
        connection.execute(self._reserve_many,
                           [{"device": device, "count": count} for device, count in total.items()])
        rows = self._rows(connection, total)
        # A device reserved k times in the batch: its k ranges in call order, below the mark.
        first = {device: rows[device][0] - count for device, count in total.items()
                 if device in rows}
        out: list[CounterReservation | None] = []
        for device, count in calls:
            if device not in first:
                out.append(None)
                continue
            out.append(CounterReservation(first[device], first[device] + count, rows[device][1]))
            first[device] += count
        return out

    def _start_batch(self, connection, calls: list[tuple[str, int, int]]
                     ) -> list[CounterReservation]:
        """Many `_start`s: the missing rows inserted (one executemany), all the rows read and
        locked (SELECT ... FOR UPDATE on PostgreSQL; on SQLite the insert made this
        transaction the one writer), each call's range worked out in call order as `_start`
        would (never below the row's mark nor below its `first`), the marks written back."""
        table = InvocationCounterRecord.__table__
        dialect_insert = (postgresql_insert if self._engine.dialect.name == "postgresql"
                          else sqlite_insert)
        firsts: dict[str, int] = {}
        for device, first, _ in calls:
            firsts.setdefault(device, first)
        connection.execute(
            dialect_insert(table).on_conflict_do_nothing(index_elements=["device_mrid"]),
            [{"device_mrid": device, "next_client": first, "last_server": -1}
             for device, first in firsts.items()])
        rows: dict[str, tuple[int, int]] = {}
        devices = list(firsts)
        for at in range(0, len(devices), _IN_CHUNK):
            for row in connection.execute(
                    select(table.c.device_mrid, table.c.next_client, table.c.last_server)
                    .where(table.c.device_mrid.in_(devices[at:at + _IN_CHUNK]))
                    .with_for_update()):
                rows[row.device_mrid] = (row.next_client, row.last_server)
        mark = {device: rows[device][0] for device in devices}
        out = []
        for device, first, count in calls:
            begin = max(mark[device], first)
            mark[device] = begin + count
            out.append(CounterReservation(begin, begin + count, rows[device][1]))
        connection.execute(self._set_next_many, [{"device": device, "next_client": value}
                                                 for device, value in mark.items()])
        return out

    def _seen_batch(self, connection, calls: list[tuple[str, int]]) -> list[None]:
        largest: dict[str, int] = {}
        for device, counter in calls:
            largest[device] = max(counter, largest.get(device, counter))
        connection.execute(self._seen_many, [{"device": device, "counter": counter}
                                             for device, counter in largest.items()])
        return [None] * len(calls)

    def _last_server(self, connection, device_mrid: str) -> int | None:
        """The largest counter recorded from the device (-1: none); None: it has no row."""
        return self._last_server_batch(connection, [(device_mrid,)])[0]

    def _last_server_batch(self, connection, calls: list[tuple[str]]) -> list[int | None]:
        rows = self._rows(connection, {device for device, in calls})
        return [rows[device][1] if device in rows else None for device, in calls]

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
    """The drivers' `CounterBook`: `CounterStore` on the store's thread, as Deferreds, with the
    client counters of `sessions_per_reservation` sessions reserved in the store at once and
    handed out from memory (module docstring).

    Calls that arrive while the store thread is busy with earlier ones are done together in one
    transaction (group commit, as `ReadingWriter` does for readings): with hundreds of sessions
    starting and ending at once, one commit serves many, and each call still gets its own
    answer."""

    def __init__(self, runner: StoreRunner, counter_store: CounterStore,
                 sessions_per_reservation: int = SESSIONS_PER_RESERVATION,
                 max_held: int = MAX_HELD_RANGES):
        if sessions_per_reservation < 1:
            raise ValueError("sessions_per_reservation must be at least 1")
        self._runner = runner
        self.store = counter_store
        self.sessions_per_reservation = sessions_per_reservation
        self._max_held = max_held
        # device -> [next, limit): client counters reserved in the store, not handed out yet.
        self._held: dict[str, list[int]] = {}
        # device -> the calls waiting for the range being reserved for it in the store.
        self._refilling: dict[str, list[tuple[Deferred, int]]] = {}
        self._queued: list[tuple[Callable, tuple, Deferred]] = []
        self._writing = False

    def reserve(self, device_mrid: str, count: int) -> Deferred:
        held = self._held.get(device_mrid)
        if held is not None and held[1] - held[0] >= count:
            first = held[0]
            held[0] = first + count
            return self._queue(self.store._last_server, (device_mrid,)).addCallback(
                self._from_held, device_mrid, first, count)
        waiting = self._refilling.get(device_mrid)
        if waiting is not None:  # a range for the device is on its way: take from it
            later = Deferred()
            waiting.append((later, count))
            return later
        self._refilling[device_mrid] = []
        reserved = self._queue(self.store._reserve,
                               (device_mrid, count * self.sessions_per_reservation))
        reserved.addCallback(self._hold, device_mrid, count)
        return reserved.addBoth(self._refilled, device_mrid)

    def start(self, device_mrid: str, first: int, count: int) -> Deferred:
        # Whatever was held for the device is below where it starts now: forget it.
        self._held.pop(device_mrid, None)
        return self._queue(self.store._start,
                           (device_mrid, first, count * self.sessions_per_reservation)
                           ).addCallback(self._hold, device_mrid, count)

    def seen(self, device_mrid: str, server_counter: int) -> Deferred:
        return self._queue(self.store._seen, (device_mrid, server_counter))

    def security_event(self, device_mrid: str, kind: str, detail: str) -> Deferred:
        return self._queue(self.store._security_event, (device_mrid, kind, detail))

    def _from_held(self, last_server: int | None, device_mrid: str, first: int,
                   count: int) -> CounterReservation | None:
        if last_server is None:  # the row is gone: the session starts from the meter's counter
            self._held.pop(device_mrid, None)
            return None
        return CounterReservation(first, first + count, last_server)

    def _hold(self, reservation: CounterReservation | None, device_mrid: str,
              count: int) -> CounterReservation | None:
        """Keep all but the first `count` counters of a range reserved in the store."""
        if reservation is None:
            return None
        if len(self._held) >= self._max_held and device_mrid not in self._held:
            del self._held[next(iter(self._held))]
        self._held[device_mrid] = [reservation.first + count, reservation.limit]
        return CounterReservation(reservation.first, reservation.first + count,
                                  reservation.last_server_counter)

    def _refilled(self, result, device_mrid: str):
        """The calls that waited for this range: each from it now (held by `_hold`), or None
        (no row: each such session starts from the meter), or the store's failure."""
        for later, count in self._refilling.pop(device_mrid, []):
            if isinstance(result, Failure):
                later.errback(result)
            elif result is None:
                later.callback(None)
            else:
                self.reserve(device_mrid, count).chainDeferred(later)
        return result

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
