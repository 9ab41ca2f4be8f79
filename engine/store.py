"""The head-end's store: devices, readings and the log of CIM requests, in SQLAlchemy 2.0.

SQLite is the embedded default; the same models serve PostgreSQL. Every method here blocks (it
talks to the database), so the reactor reaches the store only through `StoreRunner`, which runs
each unit of work on one dedicated thread: SQLite allows one writer at a time, and a single worker
thread keeps writes ordered without lock contention.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cimhes.cim.meter_readings import MeterReading
from cimhes.drivers import DRIVERS, DeviceAddress


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
    authentication: Mapped[str] = mapped_column(String(16))
    password: Mapped[str | None] = mapped_column(String(64))

    def address(self) -> DeviceAddress:
        return DeviceAddress(
            mrid=self.mrid, name=self.name, device_type=self.device_type, host=self.host,
            port=self.port, client_address=self.client_address,
            server_address=self.server_address, authentication=self.authentication,
            password=self.password,
        )


class ReadingRecord(Base):
    """One value read from a device: a register reading or one interval of a profile."""

    __tablename__ = "reading"
    __table_args__ = (UniqueConstraint("device_id", "reading_type", "timestamp"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"))
    reading_type: Mapped[str] = mapped_column(String(64))
    timestamp: Mapped[datetime] = mapped_column(EpochMillis())
    value: Mapped[str] = mapped_column(String(40))
    read_at: Mapped[datetime] = mapped_column(EpochMillis())


class RequestRecord(Base):
    """One CIM request and how it was answered: the ground the SLA reports will stand on."""

    __tablename__ = "request"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[str | None] = mapped_column(String(128), index=True)
    noun: Mapped[str] = mapped_column(String(64))
    verb: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(EpochMillis())
    replied_at: Mapped[datetime] = mapped_column(EpochMillis())
    result: Mapped[str] = mapped_column(String(16))
    devices_asked: Mapped[int] = mapped_column(Integer)
    devices_failed: Mapped[int] = mapped_column(Integer)


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


class Store:
    """Blocking unit-of-work methods over one database URL."""

    def __init__(self, url: str):
        self.engine: Engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def load_inventory(self, devices: Iterable[DeviceAddress]) -> int:
        """Insert or update devices by mRID; returns how many were given. A device whose type
        no driver serves is refused (ValueError naming it) and nothing is loaded."""
        devices = list(devices)
        for address in devices:
            if address.device_type not in DRIVERS:
                raise ValueError(f"device {address.mrid} ({address.name}) has device type "
                                 f"{address.device_type!r}, which no driver serves; known: "
                                 f"{sorted(DRIVERS)}")
        count = 0
        with self._session.begin() as session:
            known = {d.mrid: d for d in session.scalars(select(Device))}
            for address in devices:
                row = known.get(address.mrid) or Device(mrid=address.mrid)
                row.name = address.name
                row.device_type = address.device_type
                row.host = address.host
                row.port = address.port
                row.client_address = address.client_address
                row.server_address = address.server_address
                row.authentication = address.authentication
                row.password = address.password
                session.add(row)
                count += 1
        return count

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

    def save_meter_readings(self, meter_readings: Sequence[MeterReading], read_at: datetime) -> int:
        """Store every value of the given meter readings; a value already stored is kept once."""
        with self._session.begin() as session:
            ids = dict(session.execute(
                select(Device.mrid, Device.id).where(
                    Device.mrid.in_([m.meter.mrid for m in meter_readings]))).all())
            rows = []
            for meter_reading in meter_readings:
                device_id = ids[meter_reading.meter.mrid]
                for reading in meter_reading.readings:
                    rows.append(_row(device_id, reading.reading_type, reading.timestamp,
                                     reading.value, read_at))
                for block in meter_reading.interval_blocks:
                    for interval in block.readings:
                        rows.append(_row(device_id, block.reading_type, interval.timestamp,
                                         interval.value, read_at))
            if rows:
                # A Core insert on the table: the ORM's bulk path costs more than SQLite itself.
                session.connection().execute(self._insert_ignoring_duplicates(), rows)
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

    def _insert_ignoring_duplicates(self):
        insert = postgresql_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        return insert(ReadingRecord.__table__).on_conflict_do_nothing(
            index_elements=["device_id", "reading_type", "timestamp"])

    def close(self) -> None:
        self.engine.dispose()


def _row(device_id: int, reading_type: str, timestamp: datetime, value, read_at: datetime) -> dict:
    return {"device_id": device_id, "reading_type": reading_type, "timestamp": timestamp,
            "value": str(value), "read_at": read_at}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (reports) run beside the one writer; NORMAL sync is safe with WAL.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class StoreRunner:
    """Runs `Store` methods off the reactor thread, one at a time, and returns Deferreds."""

    def __init__(self, reactor, store: Store):
        self.store = store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="cimhes-store")
        self._pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def run(self, method_name: str, *args, **kwargs) -> Deferred:
        method = getattr(self.store, method_name)
        return deferToThreadPool(self._reactor, self._pool, method, *args, **kwargs)

    def call(self, function, *args, **kwargs) -> Deferred:
        """Run a blocking callable (a unit of work on this store) on the store's thread."""
        return deferToThreadPool(self._reactor, self._pool, function, *args, **kwargs)

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

    def __init__(self, runner: StoreRunner, now):
        self._runner = runner
        self._now = now
        self._queued: list[tuple[MeterReading, Deferred]] = []
        self._writing = False

    def save(self, meter_reading: MeterReading) -> Deferred:
        """Deferred firing once these readings are stored (failing if the store failed)."""
        stored = Deferred()
        self._queued.append((meter_reading, stored))
        if not self._writing:
            self._write_queued()
        return stored

    def _write_queued(self) -> None:
        batch, self._queued = self._queued, []
        self._writing = bool(batch)
        if not batch:
            return
        written = self._runner.run("save_meter_readings", [m for m, _ in batch], self._now())

        def settle(result):
            for _, stored in batch:
                if isinstance(result, Failure):
                    stored.errback(result)
                else:
                    stored.callback(None)
            self._write_queued()

        written.addBoth(settle)

