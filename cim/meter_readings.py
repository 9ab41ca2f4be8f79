"""CIM MeterReadings as plain Python: the GetMeterReadings request and the MeterReadings reply.

A request names devices (EndDevice, EndDeviceGroup or UsagePoint, by mRID and/or Names), reading types (18-part
codes) and a time window. A reply holds one MeterReading per meter: register Readings and
IntervalBlocks of IntervalReadings, each tied to a reading type code. The XML form lives in
:mod:`cimhes.cim.codec`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from cimhes.cim.message import Header, Reply

__all__ = [
    "ReadingSource",
    "SOURCE_OPTION",
    "PAGE_OPTION",
    "MESSAGE_INDEX_PROPERTY",
    "MESSAGE_COUNT_PROPERTY",
    "split_into_messages",
    "Name",
    "DeviceRef",
    "GetMeterReadings",
    "Reading",
    "IntervalReading",
    "interval_readings",
    "IntervalBlock",
    "MeterReading",
    "MeterReadingsResponse",
]


class ReadingSource(str, enum.Enum):
    """Where a GetMeterReadings takes its values from: the request's Option ``DataSource``."""

    STORE = "store"  # only what the store holds; nothing is read from meters
    METER = "meter"  # every device read on demand, whatever the store holds
    STORE_THEN_METER = "store-then-meter"  # the store, and meters read for what it lacks (default)


# Request.Option name choosing the source (61968-100 Request.Option: name/value pairs).
SOURCE_OPTION = "DataSource"
# Request.Option asking for one part of a reply split into several messages (1, 2, ...), and the
# Header.Property names saying which part a message is and how many there are.
PAGE_OPTION = "Page"
MESSAGE_INDEX_PROPERTY = "MessageIndex"
MESSAGE_COUNT_PROPERTY = "MessageCount"


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
    end_device_groups: tuple[DeviceRef, ...] = ()
    reading_types: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    reason: str | None = None
    source: ReadingSource = ReadingSource.STORE_THEN_METER
    page: int = 1  # which part of a reply split into several messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", ReadingSource(self.source))
        if self.page < 1:
            raise ValueError(f"GetMeterReadings.page counts from 1, got {self.page}")
        for name in ("end_devices", "usage_points", "end_device_groups", "reading_types"):
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


_new = object.__new__


def interval_readings(timestamped_values: Iterable[tuple[datetime, Decimal | str]]
                      ) -> list[IntervalReading]:
    """``[IntervalReading(timestamp, value) for timestamp, value in timestamped_values]``, the
    same objects (no qualities) made without a dataclass ``__init__`` and ``__post_init__`` per
    interval: a driver makes them by the hundred per meter read, and the two calls were most of
    their cost. A timestamp in UTC (every driver's) needs no further check; any other goes
    through the constructor and its check."""
    made: list[IntervalReading] = []
    append = made.append
    utc = timezone.utc
    for timestamp, value in timestamped_values:
        if timestamp.tzinfo is not utc:
            append(IntervalReading(timestamp, value))
            continue
        reading = _new(IntervalReading)
        fields = reading.__dict__  # where the frozen dataclass's __init__ puts them too
        fields["timestamp"] = timestamp
        fields["value"] = value
        fields["qualities"] = ()
        append(reading)
    return made


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
    usage_point: DeviceRef | None = None  # when read for a UsagePoint: the one it was read for

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


def _values(meter_reading: MeterReading) -> int:
    return len(meter_reading.readings) + sum(len(b.readings) for b in meter_reading.interval_blocks)


def split_into_messages(meter_readings: tuple[MeterReading, ...] | list[MeterReading],
                        max_values: int) -> list[tuple[MeterReading, ...]]:
    """The readings in consecutive parts of at most ``max_values`` values each (a MeterReading is
    never cut; one larger than the limit is a part of its own). Always at least one part."""
    parts: list[tuple[MeterReading, ...]] = []
    current: list[MeterReading] = []
    count = 0
    for meter_reading in meter_readings:
        values = _values(meter_reading)
        if current and count + values > max_values:
            parts.append(tuple(current))
            current, count = [], 0
        current.append(meter_reading)
        count += values
    parts.append(tuple(current))
    return parts
