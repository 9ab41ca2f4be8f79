"""CIM MeterReadings as plain Python: the GetMeterReadings request and the MeterReadings reply.

A request names devices (EndDevice or UsagePoint, by mRID and/or Names), reading types (18-part
codes) and a time window. A reply holds one MeterReading per meter: register Readings and
IntervalBlocks of IntervalReadings, each tied to a reading type code. The XML form lives in
:mod:`cimhes.cim.codec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from cimhes.cim.message import Header, Reply

__all__ = [
    "Name",
    "DeviceRef",
    "GetMeterReadings",
    "Reading",
    "IntervalReading",
    "IntervalBlock",
    "MeterReading",
    "MeterReadingsResponse",
]


@dataclass(frozen=True)
class Name:
    """A CIM Name of an object, e.g. a meter's serial, with the kind of name it is (NameType.name)."""

    name: str
    name_type: str | None = None


@dataclass(frozen=True)
class DeviceRef:
    """A reference to a meter (EndDevice) or a UsagePoint by mRID and/or Names."""

    mrid: str | None = None
    names: tuple[Name, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))


def _aware(value: datetime | None, what: str) -> None:
    # UTC first: the drivers' times all are, and this runs for every interval of every meter.
    if value is not None and value.tzinfo is not timezone.utc and value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {value!r}")


@dataclass(frozen=True)
class GetMeterReadings:
    """A 'get MeterReadings' request.

    ``reading_types`` are 18-part codes (empty: the device's default set); ``start``/``end`` bound
    the readings wanted (None: not given); ``reason`` is Reading.reason (ReadingReasonKind) if sent.
    """

    header: Header
    end_devices: tuple[DeviceRef, ...] = ()
    usage_points: tuple[DeviceRef, ...] = ()
    reading_types: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        for name in ("end_devices", "usage_points", "reading_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _aware(self.start, "GetMeterReadings.start")
        _aware(self.end, "GetMeterReadings.end")


@dataclass(frozen=True)
class Reading:
    """A register reading: the value of ``reading_type`` at ``timestamp`` (kWh etc. as a decimal string)."""

    reading_type: str
    value: Decimal | str
    timestamp: datetime
    qualities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "qualities", tuple(self.qualities))
        _aware(self.timestamp, "Reading.timestamp")


@dataclass(frozen=True)
class IntervalReading:
    """One interval's value; ``timestamp`` is the end of the interval."""

    timestamp: datetime
    value: Decimal | str
    qualities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if type(self.qualities) is not tuple:
            object.__setattr__(self, "qualities", tuple(self.qualities))
        _aware(self.timestamp, "IntervalReading.timestamp")


@dataclass(frozen=True)
class IntervalBlock:
    """The interval readings of one reading type (e.g. the 15-minute +A profile)."""

    reading_type: str
    readings: tuple[IntervalReading, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "readings", tuple(self.readings))


@dataclass(frozen=True)
class MeterReading:
    """What one meter gave: register readings, interval blocks, and the time span they cover."""

    meter: DeviceRef
    readings: tuple[Reading, ...] = ()
    interval_blocks: tuple[IntervalBlock, ...] = ()
    values_interval: tuple[datetime, datetime] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "readings", tuple(self.readings))
        object.__setattr__(self, "interval_blocks", tuple(self.interval_blocks))
        if self.values_interval is not None:
            start, end = self.values_interval
            _aware(start, "MeterReading.values_interval start")
            _aware(end, "MeterReading.values_interval end")
            object.__setattr__(self, "values_interval", (start, end))


@dataclass(frozen=True)
class MeterReadingsResponse:
    """The reply to a GetMeterReadings: header (verb reply, noun MeterReadings), Reply and the readings."""

    header: Header
    reply: Reply
    meter_readings: tuple[MeterReading, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "meter_readings", tuple(self.meter_readings))
