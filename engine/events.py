"""EndDeviceEvents in the store: each event once, however it arrived, and the pushes nobody owns.

`EventStore` (blocking; the reactor reaches it through `StoreRunner.call`) keeps:
- `end_device_event`: one row per (device, the meter's own code for the event, time). An event
  read from an event log and the same event received by push are one row; `source` says how it
  first arrived.
- `unrecognised_push`: every push the head-end could not attribute or open (unknown device,
  undecryptable, malformed), with the peer, what identified it, why, and its first bytes, for
  discovery and security review. No key or plaintext is kept.

`EventReadingService` reads event logs on demand through the device's driver and stores them.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker
from twisted.internet.defer import DeferredList, DeferredSemaphore, inlineCallbacks

from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.cim.message import Error, ErrorCode
from cimhes.drivers import DeviceAddress
from cimhes.drivers.errors import DeviceError
from cimhes.engine.reading import DEVICE_ERROR_CODES
from cimhes.drivers.idis_events import read_events
from cimhes.engine.store import Base, Device, EpochMillis, Store, StoreRunner

log = logging.getLogger(__name__)

# The first bytes of an unrecognised push kept for review (a push is at most a few kB).
UNRECOGNISED_PUSH_BYTES = 512


class EventRecord(Base):
    __tablename__ = "end_device_event"
    __table_args__ = (UniqueConstraint("device_id", "device_code", "created"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"), index=True)
    created: Mapped[datetime] = mapped_column(EpochMillis())
    event_type: Mapped[str] = mapped_column(String(32), index=True)
    device_code: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(255))
    details: Mapped[str] = mapped_column(String(1024))  # JSON [[name, value], ...]
    source: Mapped[str] = mapped_column(String(16))     # "log" or "push"
    recorded_at: Mapped[datetime] = mapped_column(EpochMillis())


class UnrecognisedPushRecord(Base):
    __tablename__ = "unrecognised_push"
    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime] = mapped_column(EpochMillis())
    peer: Mapped[str] = mapped_column(String(64))
    identity: Mapped[str | None] = mapped_column(String(128))  # system title, logical device name
    problem: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(String(255))
    length: Mapped[int] = mapped_column(Integer)
    head: Mapped[str] = mapped_column(String(2 * UNRECOGNISED_PUSH_BYTES))  # hex


@dataclass(frozen=True)
class UnrecognisedPush:
    received_at: datetime
    peer: str
    identity: str | None
    problem: str  # "unknown device", "undecryptable", "malformed"
    reason: str
    length: int
    head: bytes


class EventStore:
    """Blocking unit-of-work methods for events, over the head-end's store."""

    def __init__(self, store: Store):
        self._engine = store.engine
        Base.metadata.create_all(self._engine, tables=[EventRecord.__table__,
                                                       UnrecognisedPushRecord.__table__])
        self._session = sessionmaker(store.engine, expire_on_commit=False)

    def save_events(self, events: Sequence[EndDeviceEvent], source: str,
                    recorded_at: datetime) -> int:
        """Store the events of known devices, each once; returns how many were new. An event
        of a device the store does not know is a ValueError naming it (nothing is stored)."""
        if not events:
            return 0
        with self._session.begin() as session:
            ids = dict(session.execute(select(Device.mrid, Device.id).where(
                Device.mrid.in_({e.device_mrid for e in events}))).all())
            unknown = {e.device_mrid for e in events} - set(ids)
            if unknown:
                raise ValueError(f"events of devices not in the inventory: {sorted(unknown)}")
            rows = [{"device_id": ids[e.device_mrid], "created": e.created,
                     "event_type": e.event_type, "device_code": e.device_code,
                     "reason": e.reason[:255], "details": json.dumps([list(d) for d in e.details]),
                     "source": source, "recorded_at": recorded_at} for e in events]
            insert = (postgresql_insert if self._engine.dialect.name == "postgresql"
                      else sqlite_insert)
            result = session.connection().execute(
                insert(EventRecord.__table__).on_conflict_do_nothing(
                    index_elements=["device_id", "device_code", "created"]), rows)
            return max(result.rowcount, 0)

    def events(self, mrid: str, start: datetime | None = None,
               end: datetime | None = None) -> list[tuple[EndDeviceEvent, str]]:
        """(event, source) of device `mrid`, oldest first, start <= created <= end."""
        with self._session() as session:
            query = (select(EventRecord).join(Device, Device.id == EventRecord.device_id)
                     .where(Device.mrid == mrid).order_by(EventRecord.created, EventRecord.id))
            if start is not None:
                query = query.where(EventRecord.created >= start)
            if end is not None:
                query = query.where(EventRecord.created <= end)
            return [(EndDeviceEvent(mrid, r.created, r.event_type, r.device_code, r.reason,
                                    tuple(tuple(d) for d in json.loads(r.details))), r.source)
                    for r in session.scalars(query)]

    def record_unrecognised(self, push: UnrecognisedPush) -> None:
        with self._session.begin() as session:
            session.add(UnrecognisedPushRecord(
                received_at=push.received_at, peer=push.peer[:64],
                identity=None if push.identity is None else push.identity[:128],
                problem=push.problem, reason=push.reason[:255], length=push.length,
                head=push.head[:UNRECOGNISED_PUSH_BYTES].hex()))

    def unrecognised(self) -> list[UnrecognisedPush]:
        with self._session() as session:
            return [UnrecognisedPush(r.received_at, r.peer, r.identity, r.problem, r.reason,
                                     r.length, bytes.fromhex(r.head))
                    for r in session.scalars(select(UnrecognisedPushRecord)
                                             .order_by(UnrecognisedPushRecord.id))]


@dataclass
class EventReadOutcome:
    events: list[EndDeviceEvent] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)
    stored: int = 0


class EventReadingService:
    """Reads meters' event logs on demand under a concurrency bound, and stores the events."""

    def __init__(self, reactor, runner: StoreRunner, event_store: EventStore, *,
                 concurrency: int = 50, limits=20.0, now=None):
        self._reactor = reactor
        self._runner = runner
        self._events = event_store
        self._sessions = DeferredSemaphore(concurrency)
        self._limits = limits
        self._now = now or (lambda: datetime.now(timezone.utc))

    @inlineCallbacks
    def read(self, devices: Sequence[DeviceAddress], start: datetime, end: datetime | None = None,
             logs: list[str] | None = None):
        """Deferred[EventReadOutcome]: every device's events in the window, stored once."""
        outcome = EventReadOutcome()
        reads = [self._sessions.run(read_events, self._reactor, device, start, end,
                                    self._limits, None, logs) for device in devices]
        results = yield DeferredList(reads, consumeErrors=True)
        for device, (succeeded, value) in zip(devices, results):
            if not succeeded:
                error = value.value
                if not isinstance(error, DeviceError):
                    log.error("event read of %s failed: %s", device.mrid, value.getTraceback())
                outcome.errors.append(_device_error(device, error))
                continue
            outcome.events.extend(value.events)
            outcome.errors.extend(_device_error(device, error) for error in value.errors)
        outcome.stored = yield self._runner.call(self._events.save_events, outcome.events, "log",
                                                 self._now())
        return outcome


def _device_error(device: DeviceAddress, error: Exception) -> Error:
    code = (DEVICE_ERROR_CODES.get(type(error), ErrorCode.DEVICE_PROTOCOL_ERROR)
            if isinstance(error, DeviceError) else ErrorCode.INTERNAL_ERROR)
    return Error(code=code, reason=str(error), id=device.mrid, id_kind="uuid",
                 object_type="EndDevice")
