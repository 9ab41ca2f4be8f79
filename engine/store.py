"""The head-end's store in SQLAlchemy 2.0: inventory, readings, events, requests and the outbox.

SQLite is the embedded default; the same models serve PostgreSQL. Every method here blocks (it
talks to the database), so the reactor reaches the store only through `StoreRunner`, which runs
each unit of work on one dedicated thread: SQLite allows one writer at a time, and a single worker
thread keeps writes ordered without lock contention.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cimhes.cim.meter_readings import MeterReading
from cimhes.drivers import DRIVERS, DeviceAddress
from cimhes.engine import schema
from cimhes.engine.inventory import Inventory, ServedPeriod
from cimhes.engine.reactor_turns import ReactorTurns
from cimhes.engine.sealed import Sealed, SecretBox, attach_secret_box, private_database_file


class EpochMillis(TypeDecorator):
    """Aware UTC datetimes kept as integer milliseconds since 1970 (the meters' clocks have
    hundredths), in every table. The reading table is the one that grows with the fleet: an
    integer is compact, sorts and indexes as time does, is the same on SQLite and PostgreSQL,
    and binds several times faster than SQLite's text dates (bench/store_readings.py)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the store; use aware UTC times")
        return (value - _UNIX_EPOCH) // _MILLISECOND

    def process_result_value(self, value, dialect):
        return None if value is None else _UNIX_EPOCH + value * _MILLISECOND


_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)


class Base(DeclarativeBase):
    pass


class Route(Base):
    """How devices are reached and which share a bottleneck: a data concentrator's segment, a
    cellular cell, a direct IP network. The per-route session bounds are configuration."""

    __tablename__ = "route"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str | None] = mapped_column(String(32))
    # A concentrator (kind "concentrator", drivers/concentrator.py): where it listens, its
    # network id, and the sessions its segment serves at once (the engine's bound for the
    # route; None: EngineSettings.max_sessions_per_route). Migration branch "gateway".
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    network_id: Mapped[int | None] = mapped_column(Integer)
    max_sessions: Mapped[int | None] = mapped_column(Integer)


class Device(Base):
    """A metering end device the head-end can reach: its CIM identity and its DLMS address."""

    __tablename__ = "device"
    id: Mapped[int] = mapped_column(primary_key=True)
    mrid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    device_type: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    client_address: Mapped[int] = mapped_column(Integer)
    server_address: Mapped[int] = mapped_column(Integer)
    security: Mapped[str] = mapped_column(String(16))  # none / low / hls-gmac
    # Secrets are sealed at rest (engine/sealed.py); their columns' names say they hold no
    # plain text.
    password: Mapped[str | None] = mapped_column("sealed_password", Sealed())
    route_id: Mapped[int | None] = mapped_column(ForeignKey("route.id"), index=True)
    # HLS-GMAC: the meter's system title and keys, hex (cimhes.drivers.address)
    system_title: Mapped[str | None] = mapped_column(String(16))
    encryption_key: Mapped[str | None] = mapped_column("sealed_encryption_key", Sealed())
    authentication_key: Mapped[str | None] = mapped_column("sealed_authentication_key", Sealed())
    # Behind a concentrator (host and port are then its): the meter's address there.
    physical_address: Mapped[str | None] = mapped_column(String(128))
    network_id: Mapped[int | None] = mapped_column(Integer)

    def address(self) -> DeviceAddress:
        return DeviceAddress(
            mrid=self.mrid, name=self.name, device_type=self.device_type, host=self.host,
            port=self.port, client_address=self.client_address,
            server_address=self.server_address, security=self.security,
            password=self.password, system_title=self.system_title,
            encryption_key=self.encryption_key, authentication_key=self.authentication_key,
            physical_address=self.physical_address, network_id=self.network_id,
        )


class DeviceGroup(Base):
    """A CIM EndDeviceGroup: devices read, scheduled or controlled together."""

    __tablename__ = "device_group"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    mrid: Mapped[str | None] = mapped_column(String(64), unique=True)


class DeviceGroupMember(Base):
    __tablename__ = "device_group_member"
    group_id: Mapped[int] = mapped_column(ForeignKey("device_group.id"), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"), primary_key=True, index=True)


class UsagePoint(Base):
    """A CIM UsagePoint: the place that is metered, which outlives the meters that serve it."""

    __tablename__ = "usage_point"
    id: Mapped[int] = mapped_column(primary_key=True)
    mrid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(128), index=True)


class UsagePointMeter(Base):
    """Which meter served a usage point when: from `served_from` until `served_to` (excluded),
    `served_to` None while it still does."""

    __tablename__ = "usage_point_meter"
    __table_args__ = (UniqueConstraint("usage_point_id", "served_from"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    usage_point_id: Mapped[int] = mapped_column(ForeignKey("usage_point.id"))
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"), index=True)
    served_from: Mapped[datetime] = mapped_column(EpochMillis())
    served_to: Mapped[datetime | None] = mapped_column(EpochMillis())


class ReadingRecord(Base):
    """One value read from a device: a register reading or one interval of a profile.

    One row per device, reading type and time: the same value stored again changes nothing, a
    different one replaces it and the database itself records the change in
    `reading_correction` (a trigger made by the store's first migration)."""

    __tablename__ = "reading"
    __table_args__ = (UniqueConstraint("device_id", "reading_type", "timestamp"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"))
    reading_type: Mapped[str] = mapped_column(String(64))
    timestamp: Mapped[datetime] = mapped_column(EpochMillis())
    value: Mapped[str] = mapped_column(String(40))
    read_at: Mapped[datetime] = mapped_column(EpochMillis())
    source: Mapped[str] = mapped_column(String(32))


class ReadingCorrection(Base):
    """The trace of a stored value replaced by a different one: what it was, what it became,
    when and from where (written by the database's trigger on `reading`, never by code)."""

    __tablename__ = "reading_correction"
    id: Mapped[int] = mapped_column(primary_key=True)
    reading_id: Mapped[int] = mapped_column(ForeignKey("reading.id"), index=True)
    old_value: Mapped[str] = mapped_column(String(40))
    old_read_at: Mapped[datetime] = mapped_column(EpochMillis())
    old_source: Mapped[str] = mapped_column(String(32))
    new_value: Mapped[str] = mapped_column(String(40))
    corrected_at: Mapped[datetime] = mapped_column(EpochMillis())
    source: Mapped[str] = mapped_column(String(32))


class EndDeviceEventRecord(Base):
    """One CIM EndDeviceEvent: what a device logged (or pushed), when, in which log.

    `event_type` is the CIM EndDeviceEventType (four dotted numbers), `dlms_code` the device's
    own event code, `log` the event log it came from (the profile's OBIS code, or a name), and
    `details` the EndDeviceEventDetail name/value pairs. The same event fetched twice is stored
    once (by device, log, time and DLMS code)."""

    __tablename__ = "end_device_event"
    __table_args__ = (UniqueConstraint("device_id", "log", "created_at", "dlms_code"),
                      Index("ix_end_device_event_device_time", "device_id", "created_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"))
    created_at: Mapped[datetime] = mapped_column(EpochMillis())
    event_type: Mapped[str] = mapped_column(String(32))
    dlms_code: Mapped[int | None] = mapped_column(Integer)
    log: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict | None] = mapped_column(JSON)
    read_at: Mapped[datetime] = mapped_column(EpochMillis())


class RequestRecord(Base):
    """One CIM request and how it was answered: the ground the SLA reports will stand on.
    An asynchronous request is recorded when it arrives; `replied_at` and `result` stay empty
    until it is answered."""

    __tablename__ = "request"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[str | None] = mapped_column(String(128), index=True)
    correlation_id: Mapped[str | None] = mapped_column(String(128), index=True)
    noun: Mapped[str] = mapped_column(String(64))
    verb: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(128))
    reply_address: Mapped[str | None] = mapped_column(String(1024))
    received_at: Mapped[datetime] = mapped_column(EpochMillis())
    replied_at: Mapped[datetime | None] = mapped_column(EpochMillis())
    result: Mapped[str | None] = mapped_column(String(16))
    devices_asked: Mapped[int] = mapped_column(Integer)
    devices_failed: Mapped[int | None] = mapped_column(Integer)


class OutboxMessage(Base):
    """A message that must reach another system (MDM, DMS), written in the same transaction as
    the data it reports, and pending until published (a transactional
    outbox): a crash between storing and publishing loses nothing."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "destination", "published_at", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    destination: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(64))
    correlation_id: Mapped[str | None] = mapped_column(String(128))
    request_id: Mapped[int | None] = mapped_column(ForeignKey("request.id"), index=True)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(EpochMillis())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(EpochMillis())
    published_at: Mapped[datetime | None] = mapped_column(EpochMillis())
    last_error: Mapped[str | None] = mapped_column(String(1024))


@dataclass(frozen=True)
class OutboxEntry:
    """A message to publish: to which destination ("mdm", "dms", ...), what kind, the payload."""

    destination: str
    kind: str
    payload: str
    correlation_id: str | None = None
    request_id: int | None = None


@dataclass(frozen=True)
class PendingMessage:
    id: int
    entry: OutboxEntry
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class RequestSummary:
    message_id: str | None
    noun: str
    verb: str
    source: str | None
    received_at: datetime
    replied_at: datetime
    result: str
    devices_asked: int
    devices_failed: int


class StoreUnavailable(Exception):
    """The database cannot be used: no driver for its URL, not reachable, or its schema not
    current. The message is one line for an operator and never holds a password."""


class Store:
    """Blocking unit-of-work methods over one database URL.

    Opening it checks the schema: an embedded SQLite database is brought up to date by the
    migrations (created if new); any other must already be current (`cimhes db upgrade`), so
    that several processes sharing a server never race to alter it."""

    def __init__(self, url: str, secret_box: SecretBox | None = None):
        """`secret_box` seals the devices' passwords and keys (engine/sealed.py); without one
        they are sealed with a random key that dies with this object."""
        private_database_file(url)
        self.engine: Engine = open_database(url)
        attach_secret_box(self.engine, secret_box or SecretBox.ephemeral())
        try:
            if self.engine.dialect.name == "sqlite":
                schema.upgrade(self.engine)
            else:
                schema.require_current(self.engine)
        except (SQLAlchemyError, schema.SchemaOutOfDate) as exc:
            self.engine.dispose()
            raise StoreUnavailable(f"database {_shown(self.engine.url)}: {_first_line(exc)}") from exc
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._upsert_readings = _upsert_readings(self.engine.dialect.name)
        self._upsert_readings_positional = _positional_sql(self._upsert_readings, self.engine)
        # PostgreSQL through psycopg 3: rows as tuples by binary COPY (engine/reading_copy.py).
        self._copy_readings = None
        if self.engine.dialect.name == "postgresql" and self.engine.dialect.driver == "psycopg":
            from cimhes.engine.reading_copy import copy_readings
            self._copy_readings = copy_readings

    def load_inventory(self, inventory: Inventory | Iterable[DeviceAddress]) -> int:
        """Insert or update the inventory's devices (by mRID), routes and groups (by name) and
        usage points (by mRID), in one transaction; returns how many devices were given.

        The inventory is the truth for what it lists: a listed device's route and groups, and a
        listed usage point's meter periods, become exactly those given; devices and usage points
        it does not list are left as they are. A device whose type no driver serves, or a
        usage point served by a meter known nowhere, is refused (ValueError naming it) and
        nothing is loaded. A plain list of addresses is an inventory of devices alone."""
        if not isinstance(inventory, Inventory):
            inventory = Inventory.of_devices(inventory)
        inventory.check()
        for device in inventory.devices:
            address = device.address
            if address.device_type not in DRIVERS:
                raise ValueError(f"device {address.mrid} ({address.name}) has device type "
                                 f"{address.device_type!r}, which no driver serves; known: "
                                 f"{sorted(DRIVERS)}")
        with self._session.begin() as session:
            routes = _named(session, Route, {r.name: r for r in inventory.routes},
                            {d.route for d in inventory.devices if d.route})
            groups = _named(session, DeviceGroup, {g.name: g for g in inventory.groups},
                            {g for d in inventory.devices for g in d.groups})
            known = {d.mrid: d for d in session.scalars(select(Device).where(
                Device.mrid.in_([d.address.mrid for d in inventory.devices])))}
            rows = []
            for device in inventory.devices:
                address = device.address
                row = known.get(address.mrid) or Device(mrid=address.mrid)
                row.name = address.name
                row.device_type = address.device_type
                row.host = address.host
                row.port = address.port
                row.client_address = address.client_address
                row.server_address = address.server_address
                row.security = address.security
                row.password = address.password
                row.system_title = address.system_title
                row.encryption_key = address.encryption_key
                row.authentication_key = address.authentication_key
                row.physical_address = address.physical_address
                row.network_id = address.network_id
                row.route_id = routes[device.route].id if device.route else None
                session.add(row)
                rows.append(row)
            session.flush()
            ids = [row.id for row in rows]
            if ids:
                session.execute(delete(DeviceGroupMember).where(DeviceGroupMember.device_id.in_(ids)))
            session.add_all(DeviceGroupMember(group_id=groups[name].id, device_id=row.id)
                            for device, row in zip(inventory.devices, rows)
                            for name in device.groups)
            self._load_usage_points(session, inventory.usage_points)
            from cimhes.engine.feeder_outages import load_positions  # its tables use this Base
            load_positions(session, inventory.devices, rows)
        return len(inventory.devices)

    def _load_usage_points(self, session, usage_points) -> None:
        if not usage_points:
            return
        meters = {p.meter for u in usage_points for p in u.meters}
        device_ids = dict(session.execute(
            select(Device.mrid, Device.id).where(Device.mrid.in_(meters))).all())
        for usage_point in usage_points:
            for period in usage_point.meters:
                if period.meter not in device_ids:
                    raise ValueError(f"usage point {usage_point.mrid} names meter {period.meter}, "
                                     "which is neither in the inventory nor stored")
        known = {u.mrid: u for u in session.scalars(select(UsagePoint).where(
            UsagePoint.mrid.in_([u.mrid for u in usage_points])))}
        for entry in usage_points:
            row = known.get(entry.mrid) or UsagePoint(mrid=entry.mrid)
            row.name = entry.name
            session.add(row)
            session.flush()
            session.execute(delete(UsagePointMeter).where(UsagePointMeter.usage_point_id == row.id))
            session.add_all(UsagePointMeter(
                usage_point_id=row.id, device_id=device_ids[p.meter], served_from=p.served_from,
                served_to=p.served_to) for p in entry.meters)

    def devices_in_group(self, name: str) -> list[DeviceAddress]:
        """The devices of the EndDeviceGroup named, by mRID; [] for an unknown group."""
        with self._session() as session:
            query = (select(Device).join(DeviceGroupMember, DeviceGroupMember.device_id == Device.id)
                     .join(DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
                     .where(DeviceGroup.name == name).order_by(Device.mrid))
            return [row.address() for row in session.scalars(query)]

    def routes_of(self, mrids: Sequence[str]) -> dict[str, str | None]:
        """Each known device's route name (None: no route), keyed by mRID."""
        with self._session() as session:
            query = (select(Device.mrid, Route.name).outerjoin(Route, Route.id == Device.route_id)
                     .where(Device.mrid.in_(mrids)))
            return dict(session.execute(query).all())

    def route_session_limits(self) -> dict[str, int]:
        """The routes that bound their own sessions (a concentrator's segment): name -> bound."""
        with self._session() as session:
            return dict(session.execute(select(Route.name, Route.max_sessions)
                                        .where(Route.max_sessions.is_not(None))).all())

    def usage_point_meters(self, mrid: str, start: datetime | None = None,
                           end: datetime | None = None) -> list[ServedPeriod]:
        """The meters that served the usage point during [start, end) (all if not given), in
        time order: how a reading request by UsagePoint finds the devices to read."""
        with self._session() as session:
            query = (select(Device.mrid, UsagePointMeter.served_from, UsagePointMeter.served_to)
                     .join(UsagePointMeter, UsagePointMeter.device_id == Device.id)
                     .join(UsagePoint, UsagePoint.id == UsagePointMeter.usage_point_id)
                     .where(UsagePoint.mrid == mrid).order_by(UsagePointMeter.served_from))
            if end is not None:
                query = query.where(UsagePointMeter.served_from < end)
            if start is not None:
                query = query.where((UsagePointMeter.served_to.is_(None))
                                    | (UsagePointMeter.served_to > start))
            return [ServedPeriod(m, f, t) for m, f, t in session.execute(query)]

    def find_devices(self, mrids: Sequence[str], names: Sequence[str]) -> dict[str, DeviceAddress]:
        """Devices known by the given mRIDs or names, keyed by the mRID or name asked for."""
        found: dict[str, DeviceAddress] = {}
        with self._session() as session:
            if mrids:
                for row in session.scalars(select(Device).where(Device.mrid.in_(mrids))):
                    found[row.mrid] = row.address()
            if names:
                for row in session.scalars(select(Device).where(Device.name.in_(names))):
                    found[row.name] = row.address()
        return found

    def save_meter_readings(self, meter_readings: Sequence[MeterReading], read_at: datetime,
                            source: str = "read") -> int:
        """Store every value of the given meter readings in one transaction, in bulk: a value
        already stored is kept once, a different value for the same device, reading type and
        time replaces it (and the database traces the correction, see `ReadingCorrection`).
        `source` says what produced the values ("read", "push", ...). Returns the rows given."""
        with self._session.begin() as session:
            ids = dict(session.execute(
                select(Device.mrid, Device.id).where(
                    Device.mrid.in_([m.meter.mrid for m in meter_readings]))).all())
            # On SQLite the DB-API's executemany runs the compiled upsert itself, rows as
            # tuples with each instant converted once (a fleet's intervals share their times):
            # SQLAlchemy's per-row parameter processing cost more than SQLite's insert
            # (bench/store_readings.py). On PostgreSQL the same tuples go by COPY
            # (engine/reading_copy.py). Elsewhere the Core statement, rows as dicts.
            copy = self._copy_readings
            positional = self._upsert_readings_positional or (copy and "copy")
            if positional is not None:
                millis: dict[datetime, int] = {}
                to_millis = EpochMillis().process_bind_param

                def stamp(moment: datetime) -> int:
                    value = millis.get(moment)
                    if value is None:
                        value = millis[moment] = to_millis(moment, None)
                    return value

                def row(*values) -> tuple:
                    return values
            else:
                def stamp(moment: datetime) -> datetime:
                    return moment

                def row(*values) -> dict:
                    return dict(zip(_READING_COLUMNS, values))

            read_at_key = stamp(read_at)
            rows = []
            for meter_reading in meter_readings:
                device_id = ids.get(meter_reading.meter.mrid)
                if device_id is None:
                    raise ValueError(f"readings of device {meter_reading.meter.mrid}, which is not "
                                     "in the inventory; none of this batch is stored")
                for reading in meter_reading.readings:
                    rows.append(row(device_id, reading.reading_type, stamp(reading.timestamp),
                                    str(reading.value), read_at_key, source))
                for block in meter_reading.interval_blocks:
                    reading_type = block.reading_type
                    if positional is not None:  # the bulk of the rows: no call per row
                        get = millis.get
                        rows.extend(
                            (device_id, reading_type, get(interval.timestamp)
                             or stamp(interval.timestamp), str(interval.value), read_at_key,
                             source) for interval in block.readings)
                        continue
                    for interval in block.readings:
                        rows.append(row(device_id, reading_type, stamp(interval.timestamp),
                                        str(interval.value), read_at_key, source))
            if rows and copy is not None:
                copy(session.connection(), rows)
            elif rows and positional is not None:
                session.connection().exec_driver_sql(positional, rows)
            elif rows:
                session.connection().execute(self._upsert_readings, rows)
        return len(rows)

    def stored_values(self, mrid: str, reading_type: str) -> list[tuple[datetime, Decimal]]:
        with self._session() as session:
            query = (select(ReadingRecord.timestamp, ReadingRecord.value)
                     .join(Device, Device.id == ReadingRecord.device_id)
                     .where(Device.mrid == mrid, ReadingRecord.reading_type == reading_type)
                     .order_by(ReadingRecord.timestamp))
            return [(ts, Decimal(value)) for ts, value in session.execute(query)]

    def record_request(self, summary: RequestSummary) -> None:
        with self._session.begin() as session:
            session.add(RequestRecord(**summary.__dict__))

    def requests(self) -> list[RequestSummary]:
        with self._session() as session:
            return [
                RequestSummary(
                    message_id=r.message_id, noun=r.noun, verb=r.verb, source=r.source,
                    received_at=r.received_at, replied_at=r.replied_at, result=r.result,
                    devices_asked=r.devices_asked, devices_failed=r.devices_failed)
                for r in session.scalars(select(RequestRecord).order_by(RequestRecord.id))
            ]

    def add_to_outbox(self, entries: Iterable[OutboxEntry], now: datetime) -> None:
        """Queue messages to publish, due at once."""
        with self._session.begin() as session:
            self._add_to_outbox(session, list(entries), now)

    def _add_to_outbox(self, session, entries: list[OutboxEntry], now: datetime) -> None:
        session.add_all(OutboxMessage(**entry.__dict__, created_at=now, attempts=0,
                                      next_attempt_at=now) for entry in entries)

    def pending_outbox(self, destination: str, now: datetime, limit: int = 100
                       ) -> list[PendingMessage]:
        """Messages for `destination` not yet published and due by `now`, oldest first."""
        with self._session() as session:
            query = (select(OutboxMessage).where(
                OutboxMessage.destination == destination, OutboxMessage.published_at.is_(None),
                OutboxMessage.next_attempt_at <= now).order_by(OutboxMessage.id).limit(limit))
            return [PendingMessage(row.id, OutboxEntry(row.destination, row.kind, row.payload,
                                                       row.correlation_id, row.request_id),
                                   row.attempts, row.created_at)
                    for row in session.scalars(query)]

    def outbox_published(self, ids: Sequence[int], at: datetime) -> None:
        with self._session.begin() as session:
            session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids))
                            .values(published_at=at))

    def outbox_failed(self, message_id: int, error: str, retry_at: datetime) -> None:
        """One more failed attempt: the error is kept (cut to the column) and it is due again
        at `retry_at` (the publisher's backoff)."""
        with self._session.begin() as session:
            session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id).values(
                attempts=OutboxMessage.attempts + 1, last_error=error[:1024],
                next_attempt_at=retry_at))

    def close(self) -> None:
        self.engine.dispose()


def _named(session, model, listed: dict, referenced: set[str]) -> dict:
    """Rows of a model with a unique `name` (routes, groups): those listed get their fields,
    those only referenced are made with their name alone; keyed by name."""
    names = set(listed) | referenced
    rows = {r.name: r for r in session.scalars(select(model).where(model.name.in_(names)))}
    for name in names:
        row = rows.get(name) or model(name=name)
        if name in listed:
            for key, value in listed[name].__dict__.items():
                setattr(row, key, value)
        session.add(row)
        rows[name] = row
    session.flush()
    return rows


def open_database(url: str) -> Engine:
    """An engine for `url`, connected once to prove it works; StoreUnavailable if it does not
    (a driver missing, a server down, a bad URL), in one line without the password."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreUnavailable(f"database URL {url.split('@')[-1]!r} is not valid: {exc}") from None
    options: dict = {}
    backend = parsed.drivername.split("+")[0]
    if backend != "sqlite":
        # A server that went away (restart, fail-over) costs a reconnect, not a failed unit of work.
        options["pool_pre_ping"] = True
    if backend == "postgresql":
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}  # libpq's, any driver
    try:
        engine = create_engine(parsed, **options)
    except (ImportError, NoSuchModuleError) as exc:
        raise StoreUnavailable(
            f"database {_shown(parsed)}: no driver for {parsed.drivername!r} ({_first_line(exc)}); "
            f"for PostgreSQL install cimhes[postgresql] and use postgresql+psycopg://") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StoreUnavailable(f"database {_shown(parsed)} is not reachable: "
                               f"{_first_line(exc.orig or exc)}") from None
    return engine


# How long opening a connection to a database server may take before it is called unreachable.
CONNECT_TIMEOUT_S = 10


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_READING_COLUMNS = ("device_id", "reading_type", "timestamp", "value", "read_at", "source")


def _positional_sql(statement, engine: Engine) -> str | None:
    """`statement` compiled for `engine` with its parameters in `_READING_COLUMNS` order, if the
    driver takes positional parameters (SQLite's qmark); else None."""
    compiled = statement.compile(dialect=engine.dialect, column_keys=list(_READING_COLUMNS))
    if engine.dialect.paramstyle != "qmark" or compiled.positiontup != list(_READING_COLUMNS):
        return None
    return compiled.string


def _upsert_readings(dialect: str):
    """INSERT .. ON CONFLICT (device, reading type, time) DO UPDATE the value, only where it
    differs: the same value twice writes nothing, a new one replaces the old (SQLite and
    PostgreSQL spell it alike)."""
    insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[dialect]
    table = ReadingRecord.__table__
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.device_id, table.c.reading_type, table.c.timestamp],
        set_={"value": statement.excluded.value, "read_at": statement.excluded.read_at,
              "source": statement.excluded.source},
        where=table.c.value != statement.excluded.value)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (reports) run beside the one writer; NORMAL sync is safe with WAL.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# Units of one batched function merged into one call at most (`batched_unit`).
BATCH_MAX_UNITS = 500


def batched_unit(batch: Callable[[list[tuple[tuple, dict]]], list]):
    """Marks a unit of work (a function for `StoreRunner.call`) as having a batch form:
    ``batch([(args, kwargs), ...])`` does what calling the function with each would, in one
    transaction, and returns their results in order. When several calls of the function are
    queued one behind the other, the store thread makes them one batch call (group commit:
    a burst of 200 requests' request-log rows is one transaction, not 200). If the batch
    fails, each call is made alone, so only the bad one fails."""

    def mark(function):
        function.store_batch = batch
        return function

    return mark


def _fire_all(outcomes: list[tuple[Deferred, object]]) -> None:
    for done, outcome in outcomes:
        if isinstance(outcome, Failure):
            done.errback(outcome)
        else:
            done.callback(outcome)


class StoreRunner:
    """Runs `Store` methods off the reactor thread, one at a time, and returns Deferreds.

    Two lanes: `run`/`call` (a request's own lookups and small writes) go ahead of
    `run_bulk`/`call_bulk` (batched writes of readings, job outcomes, device status), so a
    small request waits for at most the one bulk batch being written, not for a large
    request's whole backlog (engine/dispatch.py, "Order")."""

    def __init__(self, reactor, store: Store):
        self.store = store
        self._reactor = reactor
        self._lanes: tuple[deque, deque] = (deque(), deque())  # first, bulk
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="cimhes-store")
        # Units of work give way to the reactor's turn in progress: engine/reactor_turns.py.
        self._turns = ReactorTurns.of(reactor)
        self._pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def run(self, method_name: str, *args, **kwargs) -> Deferred:
        return self._queue(0, getattr(self.store, method_name), args, kwargs)

    def call(self, function, *args, **kwargs) -> Deferred:
        """Run a blocking callable (a unit of work on this store) on the store's thread."""
        return self._queue(0, function, args, kwargs)

    def run_bulk(self, method_name: str, *args, **kwargs) -> Deferred:
        return self._queue(1, getattr(self.store, method_name), args, kwargs)

    def call_bulk(self, function, *args, **kwargs) -> Deferred:
        """`call` in the bulk lane: after every unit of work queued by `call`/`run`."""
        return self._queue(1, function, args, kwargs)

    def _queue(self, lane: int, function, args, kwargs) -> Deferred:
        done = Deferred()
        self._lanes[lane].append((done, function, args, kwargs))
        # One pool task per queued unit; each runs whichever unit comes first at that time.
        self._pool.callInThread(self._next)
        return done

    def _next(self) -> None:  # on the store's thread
        lane = self._lanes[0] if self._lanes[0] else self._lanes[1]
        if not lane:
            return  # its unit went with an earlier one's batch (`batched_unit`)
        done, function, args, kwargs = lane.popleft()
        if self._turns is None:
            self._run(lane, done, function, args, kwargs)
            return
        bulk = lane is self._lanes[1]
        self._turns.before_work(bulk)
        if bulk:
            self._run(lane, done, function, args, kwargs)
            return
        turn, started = self._turns.turn, time.perf_counter()
        try:
            self._run(lane, done, function, args, kwargs)
        finally:
            self._turns.after_work(turn, time.perf_counter() - started)

    def _run(self, lane: deque, done: Deferred, function, args, kwargs) -> None:
        batch = getattr(function, "store_batch", None)
        if batch is not None:
            self._run_batch(lane, batch, function, [(done, args, kwargs)])
            return
        try:
            result = function(*args, **kwargs)
        except BaseException:  # noqa: BLE001 (handed to the Deferred, as deferToThread does)
            failure = Failure()
            self._reactor.callFromThread(done.errback, failure)
        else:
            self._reactor.callFromThread(done.callback, result)

    def _run_batch(self, lane: deque, batch, function, units: list) -> None:
        # The units of the same function queued right behind this one (only the store thread
        # takes from the left of a lane, so looking at lane[0] then taking it is safe).
        while lane and len(units) < BATCH_MAX_UNITS and lane[0][1] is function:
            done, _, args, kwargs = lane.popleft()
            units.append((done, args, kwargs))
        try:
            results = batch([(args, kwargs) for _, args, kwargs in units])
        except BaseException:  # noqa: BLE001
            if len(units) == 1:
                results = [Failure()]
            else:
                # One bad call must not fail the others queued with it: each alone, as if
                # they had never been batched.
                results = []
                for _, args, kwargs in units:
                    try:
                        results.append(function(*args, **kwargs))
                    except BaseException:  # noqa: BLE001
                        results.append(Failure())
        self._reactor.callFromThread(
            _fire_all, [(done, result) for (done, _, _), result in zip(units, results)])

    def stop(self) -> None:
        if self._pool.started:
            self._pool.stop()


class ReadingWriter:
    """Saves meter readings while the meters are still being read (group commit).

    Each `save` queues one device's readings; the store thread writes whatever has queued while
    it wrote the previous batch, in one transaction. Under load that is a few large batches,
    when idle it is one small one at once, and the store's work overlaps the waiting on meters
    instead of following the last answer.
    """

    # ~0.1 s of SQLite upserts: the store thread is never held long by one batch.
    MAX_BATCH_VALUES = 5_000
    # A request with at most this many meters' readings waiting, beside one with more, is
    # written in a batch of its own in the store's first lane (a small call beside a large
    # request's backlog waits for its own rows only); every other batch is round-robin.
    FEW = 4

    def __init__(self, runner: StoreRunner, now):
        self._runner = runner
        self._now = now
        # Waiting readings per key (the request they serve), taken round-robin into batches.
        self._queued: dict[object, deque[tuple[MeterReading, Deferred]]] = {}
        self._writing = False
        self._small_turn = True  # the next batch may be the small requests' own

    def save(self, meter_reading: MeterReading, key: object = None) -> Deferred:
        """Deferred firing once these readings are stored (failing if the store failed).
        Readings of different `key`s (requests) share each batch round-robin, so a small
        request's values are in the next batch, not behind a large one's backlog; a request
        with few waiting beside a larger one gets a batch of its own, every other turn."""
        stored = Deferred()
        self._queued.setdefault(key, deque()).append((meter_reading, stored))
        if not self._writing:
            self._write_queued()
        return stored

    def _write_queued(self) -> None:
        # At most MAX_BATCH_VALUES values a transaction (a meter's readings are not split):
        # each bulk unit stays short, so the store's other work waits for little.
        keys = list(self._queued)
        few = [key for key in keys if len(self._queued[key]) <= self.FEW]
        small = self._small_turn and 0 < len(few) < len(keys)
        self._small_turn = not small
        if small:
            keys = few
        batch: list[tuple[MeterReading, Deferred]] = []
        values = 0
        while keys and values < self.MAX_BATCH_VALUES:
            for key in list(keys):
                waiting = self._queued[key]
                meter_reading, stored = waiting.popleft()
                if not waiting:
                    del self._queued[key]
                    keys.remove(key)
                batch.append((meter_reading, stored))
                values += len(meter_reading.readings) + sum(
                    len(b.readings) for b in meter_reading.interval_blocks)
                if values >= self.MAX_BATCH_VALUES:
                    break
        self._writing = bool(batch)
        if not batch:
            return
        run = self._runner.run if small else self._runner.run_bulk
        written = run("save_meter_readings", [m for m, _ in batch], self._now())

        def settle(result):
            for _, stored in batch:
                if isinstance(result, Failure):
                    stored.errback(result)
                else:
                    stored.callback(None)
            self._write_queued()

        written.addBoth(settle)

