"""What the head-end knows of each device's health: its last successful read, its last error (kind
and text), and whether an operator marked it broken (so SLA reports can leave it out).

The reading engine tells `DeviceOutcomeRecorder` the result of every device's read; the recorder
logs each failure (mRID, error kind), counts reads and failures in the metrics, and writes the
status rows on the store's thread, whatever queued while the previous write ran in one
transaction (as `ReadingWriter` does), so a read of 1,000 meters is a few writes, not 1,000.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Boolean, ForeignKey, String, func, or_, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from cimhes.drivers import DeviceAddress
from cimhes.engine import redaction
from cimhes.engine.store import (
    Base,
    Device,
    DeviceGroup,
    DeviceGroupMember,
    EndDeviceEventRecord,
    EpochMillis,
    ReadingRecord,
    Store,
    StoreRunner,
)

log = logging.getLogger(__name__)

MAX_SEARCH_RESULTS = 50
MAX_EVENTS_SHOWN = 50
MAX_ERROR_TEXT = 512


class DeviceStatusRecord(Base):
    __tablename__ = "device_status"
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"), primary_key=True)
    last_success_at: Mapped[datetime | None] = mapped_column(EpochMillis())
    last_error_at: Mapped[datetime | None] = mapped_column(EpochMillis())
    last_error_kind: Mapped[str | None] = mapped_column(String(64))
    last_error_message: Mapped[str | None] = mapped_column(String(MAX_ERROR_TEXT))
    broken: Mapped[bool] = mapped_column(Boolean, default=False)
    broken_note: Mapped[str | None] = mapped_column(String(255))


@dataclass(frozen=True)
class DeviceStatus:
    address: DeviceAddress
    last_success_at: datetime | None
    last_error_at: datetime | None
    last_error_kind: str | None
    last_error_message: str | None
    broken: bool
    broken_note: str | None
    last_value_read_at: datetime | None  # newest stored value's read time
    values_stored: int


@dataclass(frozen=True)
class DeviceOutcome:
    mrid: str
    at: datetime
    error_kind: str | None = None
    error_message: str | None = None


class DeviceStatusStore:
    """Blocking unit-of-work methods on device status."""

    def __init__(self, store: Store):
        self._session = sessionmaker(store.engine, expire_on_commit=False)

    def record(self, outcomes: list[DeviceOutcome]) -> None:
        with self._session.begin() as session:
            ids = dict(session.execute(select(Device.mrid, Device.id).where(
                Device.mrid.in_({o.mrid for o in outcomes}))).all())
            rows = {r.device_id: r for r in session.scalars(select(DeviceStatusRecord).where(
                DeviceStatusRecord.device_id.in_(ids.values())))}
            for outcome in outcomes:
                device_id = ids.get(outcome.mrid)
                if device_id is None:
                    continue  # removed from the inventory meanwhile
                row = rows.get(device_id)
                if row is None:
                    row = rows[device_id] = DeviceStatusRecord(device_id=device_id, broken=False)
                    session.add(row)
                if outcome.error_kind is None:
                    row.last_success_at = outcome.at
                else:
                    row.last_error_at = outcome.at
                    row.last_error_kind = outcome.error_kind
                    row.last_error_message = (outcome.error_message or "")[:MAX_ERROR_TEXT]

    def status(self, mrid: str) -> DeviceStatus | None:
        with self._session() as session:
            device = session.scalar(select(Device).where(Device.mrid == mrid))
            if device is None:
                return None
            row = session.get(DeviceStatusRecord, device.id)
            newest, count = session.execute(
                select(func.max(ReadingRecord.read_at), func.count())
                .where(ReadingRecord.device_id == device.id)).one()
            return DeviceStatus(
                address=device.address(),
                last_success_at=row.last_success_at if row else None,
                last_error_at=row.last_error_at if row else None,
                last_error_kind=row.last_error_kind if row else None,
                last_error_message=row.last_error_message if row else None,
                broken=bool(row and row.broken), broken_note=row.broken_note if row else None,
                last_value_read_at=newest, values_stored=count)

    def search(self, text: str, limit: int = MAX_SEARCH_RESULTS) -> list[DeviceStatus]:
        """Devices whose mRID or name contains ``text`` (all, when empty), by name."""
        pattern = f"%{_escape_like(text.strip())}%"
        with self._session() as session:
            query = (select(Device, DeviceStatusRecord)
                     .outerjoin(DeviceStatusRecord, DeviceStatusRecord.device_id == Device.id)
                     .where(or_(Device.mrid.like(pattern, escape="\\"),
                                Device.name.like(pattern, escape="\\")))
                     .order_by(Device.name).limit(limit))
            return [DeviceStatus(
                address=device.address(),
                last_success_at=row.last_success_at if row else None,
                last_error_at=row.last_error_at if row else None,
                last_error_kind=row.last_error_kind if row else None,
                last_error_message=row.last_error_message if row else None,
                broken=bool(row and row.broken), broken_note=row.broken_note if row else None,
                last_value_read_at=None, values_stored=0)
                for device, row in session.execute(query)]

    def set_broken(self, mrid: str, broken: bool, note: str | None = None) -> bool:
        """Mark a device broken (left out of SLA figures on request) or working; False when
        no such device."""
        with self._session.begin() as session:
            device = session.scalar(select(Device).where(Device.mrid == mrid))
            if device is None:
                return False
            row = session.get(DeviceStatusRecord, device.id)
            if row is None:
                row = DeviceStatusRecord(device_id=device.id)
                session.add(row)
            row.broken = broken
            row.broken_note = (note or None) if broken else None
            return True

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Each grouped device's mRID and the names of its device groups (EndDeviceGroups)."""
        found: dict[str, list[str]] = {}
        with self._session() as session:
            for mrid, group in session.execute(
                    select(Device.mrid, DeviceGroup.name)
                    .join(DeviceGroupMember, DeviceGroupMember.device_id == Device.id)
                    .join(DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
                    .order_by(DeviceGroup.name)):
                found.setdefault(mrid, []).append(group)
        return {mrid: tuple(groups) for mrid, groups in found.items()}

    def events(self, mrid: str, limit: int = MAX_EVENTS_SHOWN) -> list[tuple]:
        """The device's newest stored events: (created_at, event_type, dlms_code, log)."""
        with self._session() as session:
            return [tuple(row) for row in session.execute(
                select(EndDeviceEventRecord.created_at, EndDeviceEventRecord.event_type,
                       EndDeviceEventRecord.dlms_code, EndDeviceEventRecord.log)
                .join(Device, Device.id == EndDeviceEventRecord.device_id)
                .where(Device.mrid == mrid)
                .order_by(EndDeviceEventRecord.created_at.desc()).limit(limit))]

    def broken_mrids(self) -> set[str]:
        with self._session() as session:
            return set(session.scalars(
                select(Device.mrid).join(DeviceStatusRecord,
                                         DeviceStatusRecord.device_id == Device.id)
                .where(DeviceStatusRecord.broken.is_(True))))


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class DeviceOutcomeRecorder:
    """The reading engine's observer: log, count and store each device's read outcome."""

    def __init__(self, runner: StoreRunner, statuses: DeviceStatusStore, metrics=None,
                 now: Callable[[], datetime] | None = None):
        self._runner = runner
        self._statuses = statuses
        self._metrics = metrics
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._queued: list[DeviceOutcome] = []
        self._writing = False

    def device_read(self, device: DeviceAddress, error: BaseException | None) -> None:
        kind = None if error is None else type(error).__name__
        if error is not None:
            log.warning("device %s (%s) read failed: %s", device.mrid, device.name, kind,
                        extra={"mrid": device.mrid, "error_kind": kind,
                                                     "device_name": device.name})
        if self._metrics is not None:
            self._metrics.device_read(kind)
        self._queued.append(DeviceOutcome(device.mrid, self._now(), kind,
                                          None if error is None else str(error)))
        if not self._writing:
            self._write_queued()

    def _write_queued(self) -> None:
        batch, self._queued = self._queued, []
        self._writing = bool(batch)
        if not batch:
            return
        written = self._runner.call_bulk(self._statuses.record, batch)
        written.addErrback(lambda f: log.error("storing device status failed: %s",
                                               redaction.log_line(f)))
        written.addBoth(lambda _: self._write_queued())
