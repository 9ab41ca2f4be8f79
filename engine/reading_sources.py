"""A GetMeterReadings request served from its source: the store, the meters, or both.

:class:`ReadingRequestService` is what the SOAP door calls. It

1. checks the request's ReadingTypes once (``readable_reading_types``: an Error per invalid one,
   or per interval type asked without a window);
2. expands what the request names into meters over windows: EndDevices as they are, each
   EndDeviceGroup into its members, each UsagePoint into the meters that served it in the window,
   each over the part of the window it served (``engine/usage_points.py``);
3. takes the values from the request's source (``ReadingSource``, Request.Option ``DataSource``):
   ``store`` only what is stored, a missing value being a 5.5 Error; ``meter`` every meter read
   on demand (:class:`~cimhes.engine.reading.MeterReadingService`); ``store-then-meter`` (the
   default) the store first, and the meters read on demand only for the (meter, ReadingType)
   pairs the store cannot answer completely: a register with no stored value in the window (any
   register when no window is given, since "now" is not in the store), an interval type with
   fewer stored intervals than the window holds.

A value read for a UsagePoint carries the UsagePoint in its MeterReading.

A large request (more meters than ``stream_above``) is served without holding its values: the
store pass looks at ``STORE_BATCH`` slices at a time and keeps only what is missing, each
meter's values are handed on (published) as its job finishes and left in the store, and the
outcome is a :class:`StoredAnswer`: the slices that have values and how many each has, counted
in the store. The door builds each reply part from the store (``StoredAnswer.part``), one part
at a time; a later page, which reads the store alone, counts the same way, so every page of
one request agrees on the parts.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import func, select
from twisted.internet.defer import DeferredList, inlineCallbacks, maybeDeferred

from cimhes.cim.message import Error, ErrorCode
from cimhes.cim.meter_readings import (
    DeviceRef,
    GetMeterReadings,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    Name,
    Reading,
    ReadingSource,
)
from cimhes.cim.reading_type import ReadingType
from cimhes.drivers import needs_window
from cimhes.drivers.idis import CLOCK_TOLERANCE
from cimhes.engine.reading import MeterReadingService, ReadOutcome, readable_reading_types
from cimhes.engine.store import Device, ReadingRecord, Store, StoreRunner
from cimhes.engine.usage_points import group_members, serving_periods

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slice:
    """One meter to answer for, over one window, possibly on behalf of a UsagePoint."""

    device: DeviceRef
    start: datetime | None
    end: datetime | None
    usage_point: DeviceRef | None = None


def _key(ref: DeviceRef) -> str | None:
    return ref.mrid or (ref.names[0].name if ref.names else None)


def _id_kind(ref: DeviceRef) -> str:
    return "uuid" if ref.mrid else "name"


def is_interval(code: str) -> bool:
    """Interval data (read over a window), as the driver serving it says, else by the code."""
    served = needs_window(code)
    return ReadingType.parse(code).is_interval if served is None else served


def expected_intervals(reading_type: str, start: datetime, end: datetime) -> int | None:
    """How many interval ends t with start < t <= end a complete profile has (None: unknown)."""
    minutes = ReadingType.parse(reading_type).interval_minutes
    if minutes is None:
        return None
    step = timedelta(minutes=minutes)
    first = (start - _EPOCH) // step + 1  # interval ends are aligned on the epoch
    last = (end - _EPOCH) // step
    return max(0, last - first + 1)


# ------------------------------------------------------------------------------ store side


def stored_meter_readings(store: Store, slices: Sequence[Slice], reading_types: Sequence[str],
                          ) -> dict[int, MeterReading]:
    """What the store holds for each slice (by its index): registers (the latest value in the
    window, or the latest at all without one) and intervals in the window."""
    codes = list(reading_types)
    interval_codes = {c for c in codes if is_interval(c)}
    register_codes = [c for c in codes if c not in interval_codes]
    found: dict[int, MeterReading] = {}
    with store._session() as session:  # noqa: SLF001 (a unit of work on the store's thread)
        mrids = {s.device.mrid for s in slices}
        devices = {d.mrid: d for d in session.scalars(select(Device).where(Device.mrid.in_(mrids)))}
        for index, piece in enumerate(slices):
            device = devices.get(piece.device.mrid)
            if device is None:
                continue
            window = []
            if piece.start is not None:
                window.append(ReadingRecord.timestamp > piece.start)
            register_window = list(window)
            if piece.end is not None:
                window.append(ReadingRecord.timestamp <= piece.end)
                # A meter answers a window reaching its clock with its present value, stamped
                # with its clock: up to CLOCK_TOLERANCE after the window's end (drivers/idis.py).
                register_window.append(ReadingRecord.timestamp <= piece.end + CLOCK_TOLERANCE)
            readings = []
            for code in register_codes:
                row = session.execute(
                    select(ReadingRecord.timestamp, ReadingRecord.value)
                    .where(ReadingRecord.device_id == device.id,
                           ReadingRecord.reading_type == code, *register_window)
                    .order_by(ReadingRecord.timestamp.desc()).limit(1)).first()
                if row is not None:
                    readings.append(Reading(reading_type=code, value=Decimal(row.value),
                                            timestamp=row.timestamp))
            blocks = []
            if interval_codes:
                rows: dict[str, list[IntervalReading]] = defaultdict(list)
                for code, stamp, value in session.execute(
                        select(ReadingRecord.reading_type, ReadingRecord.timestamp,
                               ReadingRecord.value)
                        .where(ReadingRecord.device_id == device.id,
                               ReadingRecord.reading_type.in_(interval_codes), *window)
                        .order_by(ReadingRecord.timestamp)):
                    rows[code].append(IntervalReading(timestamp=stamp, value=Decimal(value)))
                blocks = [IntervalBlock(reading_type=code, readings=tuple(rows[code]))
                          for code in codes if code in rows]
            if readings or blocks:
                found[index] = MeterReading(
                    meter=DeviceRef(mrid=device.mrid, names=(Name(device.name),)),
                    readings=tuple(readings), interval_blocks=tuple(blocks),
                    values_interval=(piece.start, piece.end)
                    if piece.start is not None and piece.end is not None else None)
    return found


def missing_reading_types(stored: MeterReading | None, piece: Slice,
                          reading_types: Sequence[str]) -> list[str]:
    """The reading types the store cannot answer completely for ``piece``."""
    have: dict[str, int] = {}
    if stored is not None:
        have.update((r.reading_type, 1) for r in stored.readings)
        have.update((b.reading_type, len(b.readings)) for b in stored.interval_blocks)
    return _missing_of(have, piece, reading_types)


def _merge(stored: MeterReading | None, read: MeterReading | None) -> MeterReading | None:
    """One MeterReading from the store's values and the meter's (the meter's win a tie)."""
    if stored is None or read is None:
        return read or stored
    registers = {r.reading_type: r for r in stored.readings}
    registers.update({r.reading_type: r for r in read.readings})
    blocks: dict[str, dict[datetime, IntervalReading]] = {}
    for source in (stored, read):
        for block in source.interval_blocks:
            rows = blocks.setdefault(block.reading_type, {})
            rows.update({r.timestamp: r for r in block.readings})
    return replace(read, readings=tuple(registers.values()), interval_blocks=tuple(
        IntervalBlock(reading_type=code, readings=tuple(rows[t] for t in sorted(rows)))
        for code, rows in blocks.items()), values_interval=read.values_interval or stored.values_interval)


STORE_BATCH = 500  # slices looked up in the store per unit of work (bounded memory, short)
PUBLISH_BATCH = 20_000  # values read from meters handed to `on_read` at once


def _values_of(meter_reading: MeterReading) -> int:
    return len(meter_reading.readings) + sum(len(b.readings) for b in meter_reading.interval_blocks)


def _missing_and_counts(store: Store, slices: Sequence[Slice], reading_types: Sequence[str]):
    """For each slice: the reading types the store cannot answer completely, and how many
    values `stored_meter_readings` would give for it (the same windows, counted in SQL: one
    per register type with a value, every interval row), without loading a value. Two
    GROUP BY queries per window the slices share."""
    codes = list(reading_types)
    interval_codes = [c for c in codes if is_interval(c)]
    register_codes = [c for c in codes if c not in interval_codes]
    have: dict[tuple[int, str], int] = {}  # (slice index, code) -> values
    with store._session() as session:  # noqa: SLF001 (a unit of work on the store's thread)
        mrids = {s.device.mrid for s in slices}
        ids = dict(session.execute(select(Device.mrid, Device.id)
                                   .where(Device.mrid.in_(mrids))).all())
        by_window: dict[tuple, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, piece in enumerate(slices):
            device_id = ids.get(piece.device.mrid)
            if device_id is not None:
                by_window[(piece.start, piece.end)][device_id].append(index)
        for (start, end), devices in by_window.items():
            window, register_window = _windows(Slice(None, start, end))
            queries = []
            if register_codes:  # a register type counts once if it has a value in the window
                queries.append((register_codes, register_window, func.min(1)))
            if interval_codes:
                queries.append((interval_codes, window, func.count()))
            for kinds, terms, measure in queries:
                for device_id, code, count in session.execute(
                        select(ReadingRecord.device_id, ReadingRecord.reading_type, measure)
                        .where(ReadingRecord.device_id.in_(list(devices)),
                               ReadingRecord.reading_type.in_(kinds), *terms)
                        .group_by(ReadingRecord.device_id, ReadingRecord.reading_type)):
                    for index in devices[device_id]:
                        have[(index, code)] = count
    out = []
    for index, piece in enumerate(slices):
        counts = {code: have[(index, code)] for code in codes if (index, code) in have}
        out.append((_missing_of(counts, piece, codes), sum(counts.values())))
    return out


def _windows(piece: Slice) -> tuple[list, list]:
    """The WHERE terms of a slice's interval window and register window (as
    `stored_meter_readings` uses them)."""
    window = []
    if piece.start is not None:
        window.append(ReadingRecord.timestamp > piece.start)
    register_window = list(window)
    if piece.end is not None:
        window.append(ReadingRecord.timestamp <= piece.end)
        register_window.append(ReadingRecord.timestamp <= piece.end + CLOCK_TOLERANCE)
    return window, register_window


def _missing_of(have: dict[str, int], piece: Slice, reading_types: Sequence[str]) -> list[str]:
    """The reading types not complete for ``piece`` given what is stored, as counts per reading
    type (an interval type must have every interval of the window; a register type any value)."""
    missing = []
    for code in reading_types:
        if is_interval(code):
            expected = (None if piece.start is None or piece.end is None
                        else expected_intervals(code, piece.start, piece.end))
            if expected is None or have.get(code, 0) < expected:
                missing.append(code)
        elif piece.start is None or piece.end is None or code not in have:
            missing.append(code)
    return missing


@dataclass
class StoredAnswer:
    """A request's answer left in the store: the slices with values (in reply order), how many
    values each has, and the few MeterReadings that were read but could not be stored."""

    slices: list[Slice]
    counts: list[int]
    reading_types: tuple[str, ...]
    unstored: dict[int, MeterReading] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.slices)

    def plan(self, max_values: int) -> list[list[int]]:
        """The slices of each reply part: consecutive, at most `max_values` values a part, a
        meter's slice never cut (one larger than the limit is a part of its own)."""
        parts: list[list[int]] = [[]]
        count = 0
        for index, values in enumerate(self.counts):
            if parts[-1] and count + values > max_values:
                parts.append([])
                count = 0
            parts[-1].append(index)
            count += values
        return parts

    def part(self, store: Store, indexes: Sequence[int]) -> list[MeterReading]:
        """The MeterReadings of one part, read from the store (on the store's thread)."""
        pieces = [self.slices[i] for i in indexes]
        stored = stored_meter_readings(store, pieces, self.reading_types)
        out = []
        for position, (index, piece) in enumerate(zip(indexes, pieces)):
            meter_reading = _merge(stored.get(position), self.unstored.get(index))
            if meter_reading is None:
                continue
            if piece.usage_point is not None:
                meter_reading = replace(meter_reading, usage_point=piece.usage_point)
            out.append(meter_reading)
        return out


# ------------------------------------------------------------------------------ the service


class ReadingRequestService:
    """Serves GetMeterReadings: expands groups and usage points, takes values from the source."""

    def __init__(self, meters: MeterReadingService, store: StoreRunner, on_read=None):
        """``on_read(meter_readings)`` is told of every set of values read from meters (e.g. to
        publish them to subscribers); its result is not waited for."""
        self._meters = meters
        self._store = store
        self._on_read = on_read

    @inlineCallbacks
    def read(self, request: GetMeterReadings, stream_above: int | None = None):
        """Deferred[ReadOutcome]. With more slices than `stream_above` (and ReadingTypes named)
        the values stay in the store and the outcome's `in_store` says where (StoredAnswer)."""
        outcome = ReadOutcome()
        reading_types = readable_reading_types(request.reading_types, request.start is not None,
                                            outcome.errors)
        if request.reading_types and not reading_types:
            return outcome  # nothing asked for can be served; an empty list would mean "all"
        slices = yield self._slices(request, outcome)
        if not slices:
            outcome.devices_asked = outcome.devices_failed
            return outcome
        if stream_above is not None and reading_types and len(slices) > stream_above:
            return (yield self._read_into_store(request, outcome, slices, reading_types))

        stored: dict[int, MeterReading] = {}
        to_read: dict[tuple, list[int]] = defaultdict(list)  # (start, end, types) -> slices
        # No ReadingType named means the device's default set: only the meter knows it, so
        # store-then-meter reads the meters; store answers with every type it holds.
        if request.source is ReadingSource.METER or (
                not reading_types and request.source is ReadingSource.STORE_THEN_METER):
            for index, piece in enumerate(slices):
                to_read[(piece.start, piece.end, tuple(reading_types))].append(index)
        else:
            if not reading_types:
                reading_types = yield self._store.call(_all_known_types, self._store.store)
            stored = yield self._store.call(stored_meter_readings, self._store.store, slices,
                                            reading_types)
            for index, piece in enumerate(slices):
                self._route_missing(request, outcome, to_read, index, piece,
                                    missing_reading_types(stored.get(index), piece, reading_types))

        read: dict[int, MeterReading] = {}
        failed: set[int] = set()
        keys = list(to_read)
        results = yield DeferredList([self._meters.read(GetMeterReadings(
            header=request.header, end_devices=tuple(slices[i].device for i in to_read[key]),
            reading_types=key[2], start=key[0], end=key[1], source=ReadingSource.METER))
            for key in keys], fireOnOneErrback=True, consumeErrors=True)
        for key, (_ok, part) in zip(keys, results):
            by_mrid = {m.meter.mrid: m for m in part.meter_readings}
            outcome.errors.extend(part.errors)
            for index in to_read[key]:
                if slices[index].device.mrid in by_mrid:
                    read[index] = by_mrid[slices[index].device.mrid]
                else:
                    failed.add(index)

        if self._on_read is not None and read:
            fresh = [replace(read[i], usage_point=slices[i].usage_point) for i in sorted(read)]
            maybeDeferred(self._on_read, fresh).addErrback(
                lambda f: log.error("telling of new readings failed: %s", f.getTraceback()))
        answered: set[str] = set()
        for index, piece in enumerate(slices):
            meter_reading = _merge(stored.get(index), read.get(index))
            if meter_reading is None:
                continue
            if piece.usage_point is not None:
                meter_reading = replace(meter_reading, usage_point=piece.usage_point)
            outcome.meter_readings.append(meter_reading)
            answered.add(piece.device.mrid)
        outcome.devices_asked = len({s.device.mrid for s in slices}) + outcome.devices_failed
        outcome.devices_failed += len({slices[i].device.mrid for i in failed} - answered)
        return outcome

    def _route_missing(self, request, outcome: ReadOutcome, to_read: dict, index: int,
                       piece: Slice, missing: list[str]) -> None:
        """What the store lacks for one slice: an Error per type when only the store may answer,
        otherwise a read of those types from the meter (grouped by period and types)."""
        if not missing:
            return
        if request.source is ReadingSource.STORE:
            outcome.errors.extend(self._unavailable(piece, code) for code in missing)
        else:
            to_read[(piece.start, piece.end, tuple(missing))].append(index)

    @inlineCallbacks
    def _read_into_store(self, request, outcome: ReadOutcome, slices: list[Slice],
                         reading_types: list[str]):
        """`read` for a large request: the same answer, left in the store (see the module)."""
        to_read: dict[tuple, list[int]] = defaultdict(list)
        counts: list[int] = [0] * len(slices)
        if request.source is ReadingSource.METER:
            for index, piece in enumerate(slices):
                to_read[(piece.start, piece.end, tuple(reading_types))].append(index)
        else:
            for first in range(0, len(slices), STORE_BATCH):
                batch = slices[first:first + STORE_BATCH]
                found = yield self._store.call_bulk(_missing_and_counts, self._store.store,
                                                    batch, reading_types)
                for index, (missing, count) in enumerate(found, start=first):
                    counts[index] = count
                    self._route_missing(request, outcome, to_read, index, slices[index], missing)

        unstored: dict[int, MeterReading] = {}
        fresh: list[MeterReading] = []
        fresh_values = [0]

        def publish(batch):
            if self._on_read is not None and batch:
                maybeDeferred(self._on_read, batch).addErrback(
                    lambda f: log.error("telling of new readings failed: %s", f.getTraceback()))

        def handed_on(indexes):
            by_mrid: dict[str, list[int]] = defaultdict(list)
            for index in indexes:
                by_mrid[slices[index].device.mrid].append(index)

            def on_reading(device, meter_reading, stored):
                for index in by_mrid.get(device.mrid, ()):
                    piece = slices[index]
                    if not stored:  # kept: the caller still gets what was read
                        unstored[index] = meter_reading
                    fresh.append(replace(meter_reading, usage_point=piece.usage_point))
                    fresh_values[0] += _values_of(meter_reading)
                if fresh_values[0] >= PUBLISH_BATCH:
                    batch, fresh[:] = list(fresh), []
                    fresh_values[0] = 0
                    publish(batch)
            return on_reading

        keys = list(to_read)
        failed: set[int] = set()
        results = yield DeferredList([self._meters.read(GetMeterReadings(
            header=request.header, end_devices=tuple(slices[i].device for i in to_read[key]),
            reading_types=key[2], start=key[0], end=key[1], source=ReadingSource.METER),
            on_reading=handed_on(to_read[key])) for key in keys],
            fireOnOneErrback=True, consumeErrors=True)
        publish(list(fresh))
        del fresh[:]
        for key, (_ok, part) in zip(keys, results):
            outcome.errors.extend(part.errors)
            answered_here = set(part.answered)
            failed.update(i for i in to_read[key] if slices[i].device.mrid not in answered_here)

        # What each slice has now, counted in the store as a later page counts it (nothing
        # was read: the first pass's counts are that already).
        if keys:
            counts = []
            for first in range(0, len(slices), STORE_BATCH):
                found = yield self._store.call_bulk(_missing_and_counts, self._store.store,
                                                    slices[first:first + STORE_BATCH],
                                                    reading_types)
                counts.extend(count for _missing, count in found)
        kept = [i for i in range(len(slices)) if counts[i] or i in unstored]
        renumber = {old: new for new, old in enumerate(kept)}
        outcome.in_store = StoredAnswer(
            slices=[slices[i] for i in kept],
            counts=[counts[i] + (_values_of(unstored[i]) if i in unstored else 0)
                    for i in kept],
            reading_types=tuple(reading_types),
            unstored={renumber[i]: m for i, m in unstored.items()})
        answered = {slices[i].device.mrid for i in kept}
        outcome.answered = sorted(answered)
        outcome.devices_asked = len({s.device.mrid for s in slices}) + outcome.devices_failed
        outcome.devices_failed += len({slices[i].device.mrid for i in failed} - answered)
        return outcome

    @staticmethod
    def _unavailable(piece: Slice, code: str) -> Error:
        return Error(code=ErrorCode.DATA_UNAVAILABLE,
                     reason=f"the store holds no complete {code} for EndDevice "
                            f"{piece.device.mrid} in the window, and the request's "
                            f"DataSource is 'store'", details=f"EndDevice {piece.device.mrid}",
                     id=code, object_type="ReadingType")

    @inlineCallbacks
    def _slices(self, request: GetMeterReadings, outcome: ReadOutcome):
        """Meters over windows for the request's EndDevices, groups and usage points."""
        slices = [Slice(ref, request.start, request.end) for ref in request.end_devices]
        if request.end_device_groups:
            keys = [_key(g) for g in request.end_device_groups]
            members = yield self._store.call(group_members, self._store.store, keys)
            for ref, key in zip(request.end_device_groups, keys):
                if key not in members:
                    outcome.errors.append(Error(
                        code=ErrorCode.UNKNOWN_GROUP, reason=f"EndDeviceGroup {key} is not known",
                        id=key, id_kind=_id_kind(ref), object_type="EndDeviceGroup"))
                    continue
                slices.extend(Slice(DeviceRef(mrid=m), request.start, request.end)
                              for m in members[key])
        if request.usage_points:
            keys = [_key(u) for u in request.usage_points]
            periods = yield self._store.call(serving_periods, self._store.store, keys)
            for ref, key in zip(request.usage_points, keys):
                serving = [p for p in periods.get(key, ()) if p.overlaps(request.start, request.end)
                           and (request.start is not None or p.end is None)]
                if not serving:
                    outcome.errors.append(Error(
                        code=ErrorCode.UNKNOWN_USAGE_POINT,
                        reason=f"UsagePoint {key} is not known" if key not in periods else
                               f"no meter served UsagePoint {key} in the window",
                        id=key, id_kind=_id_kind(ref), object_type="UsagePoint"))
                    continue
                point = DeviceRef(mrid=ref.mrid, names=ref.names)
                for period in serving:
                    start = request.start if request.start is None else max(request.start, period.start)
                    end = request.end if period.end is None else (
                        period.end if request.end is None else min(request.end, period.end))
                    slices.append(Slice(DeviceRef(mrid=period.device_mrid), start, end, point))
        # Resolve EndDevices (names, mismatches, unknown ones) the one way the engine does.
        resolved = yield self._meters.resolve(
            [s.device for s in slices], outcome)
        unique: dict[tuple, Slice] = {}
        for piece, device in zip(slices, resolved):
            if device is not None:
                piece = replace(piece, device=DeviceRef(mrid=device.mrid,
                                                        names=(Name(device.name),)))
                unique.setdefault((device.mrid, piece.start, piece.end, piece.usage_point), piece)
        return list(unique.values())


def _all_known_types(store: Store) -> list[str]:
    with store._session() as session:  # noqa: SLF001
        return list(session.scalars(select(ReadingRecord.reading_type).distinct()))
