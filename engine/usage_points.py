"""Usage points and end device groups in the inventory, and which meters they stand for.

A usage point (a connection point of the network) is served by one meter at a time; a meter
exchange ends one period and starts another. A GetMeterReadings by UsagePoint reads, for each
meter that served it in the request's window, that meter over the part of the window it served.
An EndDeviceGroup is a named set of meters.

The tables are the store's (``usage_point``, ``usage_point_meter``, ``device_group``,
``device_group_member`` in engine/store.py); this module loads them from the inventory and answers
the two questions GetMeterReadings asks of them. The inventory file gives them as
``"usage_points": [{"mrid", "name", "meters": [{"mrid", "from", "to"}]}]`` and
``"groups": [{"mrid", "name", "members": [meter mRID, ...]}]``; unknown keys are refused.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from cimhes.engine.store import (
    Device,
    DeviceGroup,
    DeviceGroupMember,
    Store,
    UsagePoint,
    UsagePointMeter,
)


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
    usage_points, groups = list(usage_points), list(groups)
    with store._session.begin() as session:  # noqa: SLF001 (the store's own session factory)
        ids = dict(session.execute(select(Device.mrid, Device.id)).all())

        def device_id(mrid: str, what: str) -> int:
            if mrid not in ids:
                raise ValueError(f"{what}: meter {mrid} is not in the inventory")
            return ids[mrid]

        for model in (UsagePointMeter, UsagePoint, DeviceGroupMember, DeviceGroup):
            session.execute(delete(model))
        for entry in usage_points:
            _only(entry, {"mrid", "name", "meters"}, "usage point")
            point = UsagePoint(mrid=entry["mrid"], name=entry.get("name"))
            session.add(point)
            session.flush()
            for period in entry.get("meters", ()):
                _only(period, {"mrid", "from", "to"}, f"usage point {entry['mrid']} meter")
                session.add(UsagePointMeter(
                    usage_point_id=point.id,
                    device_id=device_id(period["mrid"], f"usage point {entry['mrid']}"),
                    served_from=_time(period["from"], "from"),
                    served_to=_time(period.get("to"), "to")))
        for entry in groups:
            _only(entry, {"mrid", "name", "members"}, "group")
            group = DeviceGroup(mrid=entry["mrid"], name=entry.get("name") or entry["mrid"])
            session.add(group)
            session.flush()
            for member in entry.get("members", ()):
                session.add(DeviceGroupMember(group_id=group.id,
                                              device_id=device_id(member, f"group {entry['mrid']}")))
    return len(usage_points), len(groups)


def serving_periods(store: Store, keys: Sequence[str]) -> dict[str, list[ServingPeriod]]:
    """For each usage point asked by mRID or name, the periods meters served it (by key asked)."""
    found: dict[str, list[ServingPeriod]] = {}
    with store._session() as session:  # noqa: SLF001
        points = session.scalars(select(UsagePoint).where(
            UsagePoint.mrid.in_(keys) | UsagePoint.name.in_(keys))).all()
        for point in points:
            periods = [ServingPeriod(mrid, start, end) for mrid, start, end in session.execute(
                select(Device.mrid, UsagePointMeter.served_from, UsagePointMeter.served_to)
                .join(Device, Device.id == UsagePointMeter.device_id)
                .where(UsagePointMeter.usage_point_id == point.id)
                .order_by(UsagePointMeter.served_from))]
            for key in (point.mrid, point.name):
                if key in keys:
                    found[key] = periods
    return found


def group_members(store: Store, keys: Sequence[str]) -> dict[str, list[str]]:
    """For each group asked by mRID or name, its members' mRIDs (by key asked)."""
    found: dict[str, list[str]] = {}
    with store._session() as session:  # noqa: SLF001
        for group in session.scalars(select(DeviceGroup).where(
                DeviceGroup.mrid.in_(keys) | DeviceGroup.name.in_(keys))):
            members = list(session.scalars(
                select(Device.mrid).join(DeviceGroupMember, DeviceGroupMember.device_id == Device.id)
                .where(DeviceGroupMember.group_id == group.id).order_by(Device.mrid)))
            for key in (group.mrid, group.name):
                if key in keys:
                    found[key] = members
    return found
