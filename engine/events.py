"""EndDeviceEvents in the store: each event once, however it arrived, and the pushes nobody owns.

`EventStore` (blocking; the reactor reaches it through `StoreRunner.call`) keeps:
- events in the store's `end_device_event` table (`EndDeviceEventRecord`, engine/store.py): one
  row per (device, event log, time, DLMS code), so an event read from an event log and the same
  event received by push are one row. `details` holds the EndDeviceEventDetail pairs, the
  event's `reason`, and how it first arrived (`receivedBy`: "log" or "push").
- `unrecognised_push` (this module's table): every push the head-end could not attribute or open
  (unknown device, undecryptable, malformed), with the peer, what identified it, why, and its
  first bytes, for discovery and security review. No key or plaintext is kept.

Event logs are read from meters by the engine's "events" jobs (engine/event_fetches.py), which
store what they read here.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Integer, String, and_, or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.drivers.meter_configuration import note_events
from cimhes.engine import event_outbox
from cimhes.engine.store import Base, Device, EndDeviceEventRecord, EpochMillis, Store

log = logging.getLogger(__name__)

# The first bytes of an unrecognised push kept for review (a push is at most a few kB).
UNRECOGNISED_PUSH_BYTES = 512


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
    """Blocking unit-of-work methods for events, over the head-end's store. `save_events` is
    the one way events are stored, whether read from a log or pushed."""

    def __init__(self, store: Store, subscribers: Sequence[str] = (), feeders=None):
        """``subscribers``: names of the MDMs every new event is published to (each gets an
        outbox row in the event's transaction, engine/event_outbox.py). ``feeders``: the
        FeederOutageDetector (engine/feeder_outages.py; default settings when None)."""
        self._subscribers = tuple(subscribers)
        self._engine = store.engine
        # Feeder-outage summaries made in the events' own transaction (engine/feeder_outages.py).
        from cimhes.engine.feeder_outages import FeederOutageDetector
        self._feeders = feeders or FeederOutageDetector()
        self._session = sessionmaker(store.engine, expire_on_commit=False)
        insert = postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        self._insert = insert(EndDeviceEventRecord.__table__).on_conflict_do_nothing(
            index_elements=["device_id", "log", "created_at", "dlms_code"])
        table = EndDeviceEventRecord.__table__
        self._insert_returning = self._insert.returning(
            table.c.device_id, table.c.log, table.c.created_at, table.c.dlms_code)

    def save_events(self, events: Sequence[EndDeviceEvent], received_by: str,
                    recorded_at: datetime) -> int:
        """Store the events of known devices, each once; returns how many were new. An event
        of a device the store does not know is a ValueError naming it (nothing is stored)."""
        if not events:
            return 0
        note_events(events)  # a meter reprogrammed: its remembered configuration goes
        with self._session.begin() as session:
            ids = dict(session.execute(select(Device.mrid, Device.id).where(
                Device.mrid.in_({e.device_mrid for e in events}))).all())
            unknown = {e.device_mrid for e in events} - set(ids)
            if unknown:
                raise ValueError(f"events of devices not in the inventory: {sorted(unknown)}")
            rows, seen = [], {}
            for event in events:
                log_name, code = _split_code(event.device_code)
                key = (ids[event.device_mrid], log_name, event.created, code)
                if key in seen:
                    continue
                seen[key] = event
                details = dict(event.details)
                details.update(reason=event.reason, receivedBy=received_by)
                rows.append({"device_id": key[0], "log": log_name, "created_at": event.created,
                             "dlms_code": code, "event_type": event.event_type,
                             "details": details, "read_at": recorded_at})
            # A NULL code never conflicts in a unique index: those rows are checked by hand.
            rows = self._without_stored_codeless(session, rows)
            if not rows:
                return 0
            # Each inserted event also gets its outbox rows, in this transaction (the AMQP relay
            # publishes them to the DMS, the MDM publisher to each subscriber:
            # engine/event_outbox.py).
            inserted = session.connection().execute(self._insert_returning, rows).all()
            by_key = {(d, g, _millis(c), k): e for (d, g, c, k), e in seen.items()}
            new = [(d, by_key[(d, g, _millis(c), k)]) for d, g, c, k in inserted]
            event_outbox.write(session, [event for _d, event in new], recorded_at,
                               self._subscribers)
            self._feeders.detect(session, new, recorded_at)
            return len(inserted)

    def _without_stored_codeless(self, session, rows: list[dict]) -> list[dict]:
        codeless = [(r["device_id"], r["log"], r["created_at"]) for r in rows
                    if r["dlms_code"] is None]
        if not codeless:
            return rows
        table = EndDeviceEventRecord
        stored = set(session.execute(select(table.device_id, table.log, table.created_at).where(
            table.dlms_code.is_(None),
            or_(*(and_(table.device_id == d, table.log == g, table.created_at == c)
                  for d, g, c in codeless)))).all())
        return [r for r in rows if r["dlms_code"] is not None
                or (r["device_id"], r["log"], r["created_at"]) not in stored]

    def events(self, mrid: str, start: datetime | None = None,
               end: datetime | None = None) -> list[tuple[EndDeviceEvent, str]]:
        """(event, how it first arrived) of device `mrid`, oldest first, start <= time <= end."""
        table = EndDeviceEventRecord
        with self._session() as session:
            query = (select(table).join(Device, Device.id == table.device_id)
                     .where(Device.mrid == mrid).order_by(table.created_at, table.id))
            if start is not None:
                query = query.where(table.created_at >= start)
            if end is not None:
                query = query.where(table.created_at <= end)
            return [event_of_record(r, mrid) for r in session.scalars(query)]

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


def event_of_record(record: EndDeviceEventRecord, mrid: str) -> tuple[EndDeviceEvent, str]:
    """(the EndDeviceEvent of a stored row of device ``mrid``, how it first arrived)."""
    details = dict(record.details or {})
    reason, received_by = details.pop("reason", ""), details.pop("receivedBy", "")
    code = (f"{record.log}:{record.dlms_code}" if record.dlms_code is not None else record.log)
    return (EndDeviceEvent(mrid, record.created_at, record.event_type, code, reason,
                           tuple(details.items())), received_by)


def _millis(at: datetime) -> int:
    """`at` as the store keeps it (whole milliseconds since the epoch, engine/store.py)."""
    return (at - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)


def _split_code(device_code: str) -> tuple[str, int | None]:
    """(log, DLMS code) of an event's `device_code` "<log>:<code>"; a code that is not a number
    (the power failure log's rows) is kept in the log part with no code."""
    log_name, _, code = device_code.rpartition(":")
    if log_name and code.isdigit():
        return log_name, int(code)
    return device_code, None
