"""Usage points and end device groups in the inventory, and which meters they stand for.

A usage point (a connection point of the network) is served by one meter at a time; a meter
exchange ends one period and starts another. A GetMeterReadings by UsagePoint reads, for each
meter that served it in the request's window, that meter over the part of the window it served.
An EndDeviceGroup is a named set of meters.

The tables are the store's (``usage_point``, ``usage_point_meter``, ``device_group``,
``device_group_member`` in engine/store.py), loaded from the inventory by engine/inventory.py and
``Store.load_inventory``; this module answers the two questions GetMeterReadings asks of them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from cimhes.engine.store import Device, DeviceGroup, DeviceGroupMember, Store, UsagePoint, UsagePointMeter


@dataclass(frozen=True)
class ServingPeriod:
    """A meter that served a usage point from ``start`` until ``end`` (None: open)."""

    device_mrid: str
    start: datetime
    end: datetime | None

    def overlaps(self, start: datetime | None, end: datetime | None) -> bool:
        return (end is None or self.start < end) and (self.end is None or start is None
                                                        or start < self.end)


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


def groups_of_devices(store: Store, mrids: Sequence[str]) -> dict[str, list[str]]:
    """For each device asked by mRID, the names of the EndDeviceGroups it belongs to, sorted
    (devices in no group are left out)."""
    found: dict[str, list[str]] = {}
    with store._session() as session:  # noqa: SLF001
        for mrid, name in session.execute(
                select(Device.mrid, DeviceGroup.name)
                .join(DeviceGroupMember, DeviceGroupMember.device_id == Device.id)
                .join(DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
                .where(Device.mrid.in_(list(mrids))).order_by(Device.mrid, DeviceGroup.name)):
            found.setdefault(mrid, []).append(name)
    return found
