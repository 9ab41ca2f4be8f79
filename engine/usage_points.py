"""Usage points and end device groups in the inventory, and which meters they stand for.

A usage point (a connection point of the network) is served by one meter at a time; a meter
exchange ends one period and starts another. A GetMeterReadings by UsagePoint reads, for each
meter that served it in the request's window, that meter over the part of the window it served.
An EndDeviceGroup is a named set of meters.

Tables of this module's own (on the store's ``Base``, so Alembic and ``create_all`` see them):
``usage_point``, ``usage_point_meter`` (usage point, meter mRID, served from, served until or
open), ``end_device_group``, ``end_device_group_member``. The inventory file gives them as
``"usage_points": [{"mrid", "name", "meters": [{"mrid", "from", "to"}]}]`` and
``"groups": [{"mrid", "name", "members": [meter mRID, ...]}]``; unknown keys are refused.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, mapped_column

from cimhes.engine.store import Base, EpochMillis, Store


class UsagePointRecord(Base):
    __tablename__ = "usage_point"
    id: Mapped[int] = mapped_column(primary_key=True)
    mrid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(128), index=True)


class UsagePointMeterRecord(Base):
    """One period during which a meter served a usage point (``served_until`` None: still)."""

    __tablename__ = "usage_point_meter"
    id: Mapped[int] = mapped_column(primary_key=True)
    usage_point_id: Mapped[int] = mapped_column(ForeignKey("usage_point.id"), index=True)
    device_mrid: Mapped[str] = mapped_column(String(64))
    served_from: Mapped[datetime] = mapped_column(EpochMillis())
    served_until: Mapped[datetime | None] = mapped_column(EpochMillis(), nullable=True)


class EndDeviceGroupRecord(Base):
    __tablename__ = "end_device_group"
    id: Mapped[int] = mapped_column(primary_key=True)
    mrid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(128), index=True)


class EndDeviceGroupMemberRecord(Base):
    __tablename__ = "end_device_group_member"
    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("end_device_group.id"), index=True)
    device_mrid: Mapped[str] = mapped_column(String(64))


_TABLES = [UsagePointRecord.__table__, UsagePointMeterRecord.__table__,
           EndDeviceGroupRecord.__table__, EndDeviceGroupMemberRecord.__table__]


@dataclass(frozen=True)
class ServingPeriod:
    """A meter that served a usage point from ``start`` until ``end`` (None: open)."""

    device_mrid: str
    start: datetime
    end: datetime | None

    def overlaps(self, start: datetime | None, end: datetime | None) -> bool:
        return (end is None or self.start < end) and (self.end is None or start is None
                                                        or start < self.end)


def _only(entry: Mapping, allowed: set[str], what: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _time(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.utcoffset() is None:
        raise ValueError(f"{what}: {text!r} has no time zone")
    return value


def load_links(store: Store, usage_points: Iterable[Mapping] = (),
               groups: Iterable[Mapping] = ()) -> tuple[int, int]:
    """Replace the usage points and groups with the inventory's; (usage points, groups) loaded.

    Refuses (ValueError) unknown keys, times without zone, and meters not in the inventory."""
    _TABLES[0].metadata.create_all(store.engine, tables=_TABLES)
    usage_points, groups = list(usage_points), list(groups)
    known = set(store.find_devices([m for e in usage_points for m in
                                    (p["mrid"] for p in e.get("meters", ()))]
                                   + [m for g in groups for m in g.get("members", ())], []))
    with store._session.begin() as session:  # noqa: SLF001 (the store's own session factory)
        for table in reversed(_TABLES):
            session.execute(table.delete())
        for entry in usage_points:
            _only(entry, {"mrid", "name", "meters"}, "usage point")
            record = UsagePointRecord(mrid=entry["mrid"], name=entry.get("name"))
            session.add(record)
            session.flush()
            for period in entry.get("meters", ()):
                _only(period, {"mrid", "from", "to"}, f"usage point {entry['mrid']} meter")
                if period["mrid"] not in known:
                    raise ValueError(f"usage point {entry['mrid']}: meter {period['mrid']} "
                                     "is not in the inventory")
                session.add(UsagePointMeterRecord(
                    usage_point_id=record.id, device_mrid=period["mrid"],
                    served_from=_time(period["from"], "from"),
                    served_until=_time(period.get("to"), "to")))
        for entry in groups:
            _only(entry, {"mrid", "name", "members"}, "group")
            record = EndDeviceGroupRecord(mrid=entry["mrid"], name=entry.get("name"))
            session.add(record)
            session.flush()
            for member in entry.get("members", ()):
                if member not in known:
                    raise ValueError(f"group {entry['mrid']}: meter {member} is not in the inventory")
                session.add(EndDeviceGroupMemberRecord(group_id=record.id, device_mrid=member))
    return len(usage_points), len(groups)


def serving_periods(store: Store, keys: Sequence[str]) -> dict[str, list[ServingPeriod]]:
    """For each usage point asked by mRID or name, the periods meters served it (by key asked)."""
    _TABLES[0].metadata.create_all(store.engine, tables=_TABLES)
    found: dict[str, list[ServingPeriod]] = {}
    with store._session() as session:  # noqa: SLF001
        points = session.scalars(select(UsagePointRecord).where(
            UsagePointRecord.mrid.in_(keys) | UsagePointRecord.name.in_(keys))).all()
        for point in points:
            periods = [ServingPeriod(r.device_mrid, r.served_from, r.served_until)
                       for r in session.scalars(select(UsagePointMeterRecord).where(
                           UsagePointMeterRecord.usage_point_id == point.id).order_by(
                           UsagePointMeterRecord.served_from))]
            for key in (point.mrid, point.name):
                if key in keys:
                    found[key] = periods
    return found


def group_members(store: Store, keys: Sequence[str]) -> dict[str, list[str]]:
    """For each group asked by mRID or name, its members' mRIDs (by key asked)."""
    _TABLES[0].metadata.create_all(store.engine, tables=_TABLES)
    found: dict[str, list[str]] = {}
    with store._session() as session:  # noqa: SLF001
        for group in session.scalars(select(EndDeviceGroupRecord).where(
                EndDeviceGroupRecord.mrid.in_(keys) | EndDeviceGroupRecord.name.in_(keys))):
            members = list(session.scalars(select(EndDeviceGroupMemberRecord.device_mrid).where(
                EndDeviceGroupMemberRecord.group_id == group.id)))
            for key in (group.mrid, group.name):
                if key in keys:
                    found[key] = members
    return found
