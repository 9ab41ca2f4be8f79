"""IDIS meter driver: CIM reading types read from an IDIS meter's COSEM objects in one association.

`READING_TYPE_MAP` (`cimhes.drivers.idis_catalogue`) is the one table saying where each CIM
ReadingType lives in the meter. `IdisMeterDriver.read` opens one association (public client or
LLS, as the inventory says), reads the clock, the registers asked for (value and scaler_unit), the
profiles by range when interval types and a window are asked for, releases, and returns a
`MeterReadResult`: the CIM `MeterReading` plus one error per reading type it could not serve
(and one `HistoryShortfall` warning per type whose window reaches past what the meter keeps).

Values are converted exactly: CIM value = raw * 10**scaler / 10**cim_multiplier, in Decimal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from operator import itemgetter, sub
from typing import Any

from twisted.internet.defer import Deferred

from cimhes.cim.meter_readings import (
    DeviceRef,
    IntervalBlock,
    MeterReading,
    Name,
    Reading,
    interval_readings,
)
from cimhes.drivers import stepping
from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.controls import ControlCommand, ControlOutcome, ControlStatus, checked
from cimhes.drivers.dlms_session import DataAccessError
from cimhes.drivers.errors import (
    DeviceError,
    HistoryShortfall,
    ObjectUnavailable,
    ProtocolError,
    UnsupportedReadingType,
)
from cimhes.drivers.idis_catalogue import (
    DEFAULT_READING_TYPES,
    PROFILE_PERIODS,
    READING_TYPE_MAP,
    CosemSource,
    Derivation,
    Period,
)
from cimhes.drivers.limits import ConnectionPacer, SessionLimits
from cimhes.drivers.meter_configuration import CONFIGURATIONS, ConfigurationCache
from cimhes.drivers.security import HeadEndSecurity
from cimhes.drivers.idis_controls import control_in_association
from cimhes.drivers.idis_association import (
    Conversation,
    column_of,
    datetime_or_error,
    in_association,
    located,
    location,
)


# A register's present value answers a window that reaches the meter's clock; this much clock
# difference between head-end and meter is tolerated before a window counts as past or future.
CLOCK_TOLERANCE = timedelta(seconds=60)

__all__ = ["READING_TYPE_MAP", "DEFAULT_READING_TYPES", "CosemSource", "IdisMeterDriver",
           "MeterReadResult", "cim_value"]


@dataclass(frozen=True)
class MeterReadResult:
    """What one read of one meter gave: the CIM MeterReading with everything that could be
    read, and one DeviceError (with `.reading_type`) per reading type that could not."""

    meter_reading: MeterReading
    errors: tuple[DeviceError, ...] = ()


def cim_value(raw: int, scaler: int, cim_multiplier: int) -> Decimal:
    """raw * 10**scaler / 10**cim_multiplier, exact, never in exponent notation."""
    exponent = scaler - cim_multiplier
    if exponent <= 0:
        return Decimal(raw).scaleb(exponent)
    return Decimal(raw * 10 ** exponent)


@dataclass
class _Plan:
    """What one read must fetch, worked out from the reading types before connecting."""

    wanted: list[str] = field(default_factory=list)        # supported reading types, in order
    errors: list[DeviceError] = field(default_factory=list)

    def sources(self) -> list[tuple[str, CosemSource]]:
        return [(reading_type, READING_TYPE_MAP[reading_type]) for reading_type in self.wanted]


@dataclass
class _Answers:
    """What the meter said, before conversion to CIM. A DataAccessError stands where the meter
    refused an object; it becomes an error for the reading types that needed it."""

    meter_time: datetime
    window: tuple[datetime, datetime] | None
    # Register types answered from their history profile (window wholly before the clock).
    historical: set[str] = field(default_factory=set)
    # (class, obis, attribute) -> the value the GET gave
    values: dict[tuple[int, str, int], Any] = field(default_factory=dict)
    # (class, obis) -> (scaler, unit) of attribute 3
    scaler_units: dict[tuple[int, str], tuple[int, int] | DataAccessError] = field(default_factory=dict)
    # profile OBIS -> (capture_objects, [(row time, row)]) with every row the meter sent
    profiles: dict[str, tuple[list, list[tuple[datetime, list]]] | DataAccessError] = field(
        default_factory=dict)


class IdisMeterDriver:
    """Reads IDIS meters (device type "idis-meter")."""

    device_type = "idis-meter"

    def __init__(self, configurations: ConfigurationCache = CONFIGURATIONS) -> None:
        # What it remembers of each meter between reads (cimhes.drivers.meter_configuration).
        self.configurations = configurations

    def serves(self, reading_type: str) -> bool:
        return reading_type in READING_TYPE_MAP

    def needs_window(self, reading_type: str) -> bool:
        """Whether `reading_type` is interval data, read over a time window."""
        return READING_TYPE_MAP[reading_type].is_interval

    def read(self, reactor: Any, device: DeviceAddress, reading_types: list[str],
             start: datetime | None, end: datetime | None, limits: SessionLimits | float,
             pacer: ConnectionPacer | None = None,
             security: HeadEndSecurity | None = None) -> Deferred:
        """Deferred[MeterReadResult]; fails with a DeviceError naming the device when the
        meter cannot be read at all (ConnectionFailed, Timeout, AssociationRefused,
        ProtocolError).

        `reading_types` empty means `DEFAULT_READING_TYPES`. Interval types are read when
        `start` is given: the intervals lying inside [start, end], i.e. the rows stamped
        start < time <= end (a row's time is the end of its interval), `end` defaulting to the
        meter's clock. Without `start` they give no IntervalBlock (and no error).
        Register types give their present value stamped with the meter's clock, unless a
        window is given that lies wholly before the clock (beyond `CLOCK_TOLERANCE`): then the
        billing values their history profile captured at start <= time <= end. A window the
        meter's history does not cover gives what exists and a `HistoryShortfall` per type.
        `limits` bound the session (`SessionLimits`; a number is the connect and response
        timeout, other limits at their defaults); `pacer` spaces new connections; `security`
        (the head-end's system title and counter book) serves HLS-GMAC meters. Every
        DeviceError, raised or in the result, names the device by mRID, name and host:port.
        Cancelling the Deferred aborts the connection.
        """
        return located(stepping.run(self._read(
            reactor, device, reading_types, start, end, SessionLimits.of(limits), pacer,
            security)), device)

    def control(self, reactor: Any, device: DeviceAddress, command: ControlCommand,
                limits: SessionLimits | float = SessionLimits(), security: HeadEndSecurity | None = None,
                *, pacer: ConnectionPacer | None = None,
                now: Callable[[], datetime] | None = None, resumed: bool = False) -> Deferred:
        """Deferred[ControlOutcome]: `command` carried out in one association (the SET/ACTION
        steps, then the read-back GETs; drivers/idis_controls.py). Never fails for a device
        problem: that is an outcome FAILED with the DeviceError (named and located). `now` is
        the head-end's clock (clock-sync sets the meter to it); `resumed` says an earlier
        attempt may have reached the meter, so its state is read first and a control already
        in effect is not sent again. A command with bad parameters raises ValueError."""
        command = checked(command)
        clock = now or (lambda: datetime.now(timezone.utc))

        async def converse(conversation: Conversation) -> ControlOutcome:
            return await control_in_association(conversation, command, clock, resumed)

        async def run() -> ControlOutcome:
            try:
                return await in_association(reactor, device, SessionLimits.of(limits), pacer,
                                            converse, security)
            except DeviceError as error:
                return ControlOutcome(device.mrid, command.kind, ControlStatus.FAILED,
                                      str(error), {}, error)

        where = location(device)

        def locate(outcome: ControlOutcome) -> ControlOutcome:
            # Every reason but DONE's names the device, as a DeviceError's text does.
            if outcome.error is not None:
                outcome.error.located(device.name, where)
                return replace(outcome, reason=str(outcome.error))
            if outcome.status is ControlStatus.REFUSED:
                named = ", ".join(part for part in (device.name, where) if part)
                return replace(outcome, reason=f"{command.kind.value} refused by device "
                               f"{device.mrid} ({named}): {outcome.reason}")
            return outcome
        return Deferred.fromCoroutine(run()).addCallback(locate)

    def _plan(self, device: DeviceAddress, reading_types: list[str],
              with_profile: bool) -> _Plan:
        plan = _Plan()
        for reading_type in dict.fromkeys(reading_types or DEFAULT_READING_TYPES):
            source = READING_TYPE_MAP.get(reading_type)
            if source is None:
                plan.errors.append(UnsupportedReadingType(
                    device.mrid, f"reading type {reading_type} is not mapped for "
                    f"{self.device_type}", reading_type))
                continue
            if source.is_interval and not with_profile:
                continue
            plan.wanted.append(reading_type)
        return plan

    async def _read(self, reactor: Any, device: DeviceAddress, reading_types: list[str],
                    start: datetime | None, end: datetime | None, limits: SessionLimits,
                    pacer: ConnectionPacer | None,
                    security: HeadEndSecurity | None) -> MeterReadResult:
        if start is not None and start.tzinfo is None or end is not None and end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware")
        plan = self._plan(device, reading_types, with_profile=start is not None)

        async def converse(conversation: Conversation) -> _Answers:
            return await self._converse(conversation, plan, start, end)

        try:
            answers = await in_association(reactor, device, limits, pacer, converse, security,
                                           stepped=True)
            result = _meter_read_result(device, plan, answers)
        except BaseException:
            self.configurations.forget(device.mrid)  # whatever failed may be what is cached
            raise
        if any(not isinstance(error, HistoryShortfall) for error in result.errors):
            self.configurations.forget(device.mrid)
        return result

    async def _converse(self, conversation: Conversation, plan: _Plan,
                        start: datetime | None, end: datetime | None) -> _Answers:
        """Inside the one association: clock, registers, profiles by range."""
        mrid = conversation.device_mrid
        get = conversation.get
        known = self.configurations.of(mrid)
        meter_time = await conversation.clock()
        window = None if start is None else (start, end if end is not None else meter_time)
        answers = _Answers(meter_time, window)

        values: dict[tuple[int, str, int], None] = {}
        scalers: dict[tuple[int, str], None] = {}
        profiles: dict[str, None] = {}
        for reading_type, source in plan.sources():
            if source.unit is not None:
                scalers[(source.class_id, source.obis)] = None
            if source.is_interval:
                profiles[source.profile_obis] = None
            elif (window is not None and source.history_profile is not None
                  and window[1] + CLOCK_TOLERANCE < meter_time):
                answers.historical.add(reading_type)
                profiles[source.history_profile] = None
            else:
                values[(source.class_id, source.obis, source.attribute)] = None
                if source.timestamp_attribute is not None:
                    values[(source.class_id, source.obis, source.timestamp_attribute)] = None

        for key in values:
            answer = await get(*key)
            answers.values[key] = answer if isinstance(answer, DataAccessError) else answer.value
        for key in scalers:
            scaler_unit = known.scaler_units.get(key)
            if scaler_unit is None:
                scaler_unit = _scaler_unit(mrid, key[1], await get(key[0], key[1], 3))
                if not isinstance(scaler_unit, DataAccessError):
                    known.scaler_units[key] = scaler_unit
            answers.scaler_units[key] = scaler_unit

        for profile in profiles:
            # From the capture before the window: a deltaData value needs the row before it.
            since = PROFILE_PERIODS[profile].floor(window[0])
            answer = await conversation.profile_rows(profile, since, window[1],
                                                     known.captures.get(profile))
            if not isinstance(answer, DataAccessError):
                known.captures[profile] = answer[0]
            answers.profiles[profile] = answer
        return answers


def _meter_read_result(device: DeviceAddress, plan: _Plan, answers: _Answers) -> MeterReadResult:
    """Convert the meter's answers to CIM: values exact in the CIM unit, one error per
    reading type that could not be served, one warning per type short of history."""
    mrid = device.mrid
    errors = list(plan.errors)
    readings: list[Reading] = []
    blocks: list[IntervalBlock] = []
    for reading_type, source in plan.sources():
        scaler = 0
        if source.unit is not None:
            scaler_unit = answers.scaler_units[(source.class_id, source.obis)]
            problem = _unusable(mrid, reading_type, source, scaler_unit)
            if problem is not None:
                errors.append(problem)
                continue
            scaler = scaler_unit[0]
        if source.is_interval or reading_type in answers.historical:
            profile = source.profile_obis or source.history_profile
            answer = answers.profiles[profile]
            if isinstance(answer, DataAccessError):
                errors.append(_unavailable(mrid, reading_type, profile, answer))
                continue
            captures, rows = answer
            column = column_of(captures, source.obis, source.attribute)
            if column is None:
                raise ProtocolError(mrid, f"{profile} does not capture {source.obis} "
                                    f"attribute {source.attribute}")
            if source.is_interval:
                values, expected = _interval_values(mrid, profile, source, rows, column,
                                                    answers)
                # cim_value inlined for the block's one exponent (192 values per full read):
                # raw * 10**exponent is the Decimal 10**exponent times raw, exact.
                exponent = scaler - source.cim_multiplier
                if exponent <= 0:
                    factor = _DECIMAL_POWERS.get(exponent) or Decimal(1).scaleb(exponent)
                    readings_of_block = interval_readings(
                        (at, factor * raw) for at, raw in values)
                else:
                    factor = 10 ** exponent
                    readings_of_block = interval_readings(
                        (at, Decimal(raw * factor)) for at, raw in values)
                blocks.append(IntervalBlock(reading_type, readings_of_block))
            else:
                values, expected = _billing_values(mrid, profile, rows, column, answers)
                readings.extend(Reading(reading_type, cim_value(raw, scaler, source.cim_multiplier),
                                        at) for at, raw in values)
            shortfall = _shortfall(mrid, reading_type, profile, expected, values, answers)
            if shortfall is not None:
                errors.append(shortfall)
            continue
        raw = answers.values[(source.class_id, source.obis, source.attribute)]
        if isinstance(raw, DataAccessError):
            errors.append(_unavailable(mrid, reading_type, source.obis, raw))
            continue
        at = answers.meter_time
        if source.timestamp_attribute is not None:
            stamp = answers.values[(source.class_id, source.obis, source.timestamp_attribute)]
            if isinstance(stamp, DataAccessError):
                errors.append(_unavailable(mrid, reading_type, source.obis, stamp))
                continue
            at = datetime_or_error(mrid, stamp, f"{source.obis} attribute "
                                    f"{source.timestamp_attribute}")
        raw = _integer(mrid, source.obis, raw)
        readings.append(Reading(reading_type, cim_value(raw, scaler, source.cim_multiplier), at))
    meter_reading = MeterReading(DeviceRef(mrid, (Name(device.name),)), readings, blocks,
                                 answers.window)
    return MeterReadResult(meter_reading, tuple(errors))


# 10**exponent as the Decimal with that exponent (Decimal("0.001") for -3), for the usual ones.
_DECIMAL_POWERS = {exponent: Decimal(1).scaleb(exponent) for exponent in range(-12, 1)}


def _interval_values(mrid: str, profile: str, source: CosemSource, rows: list, column: int,
                     answers: _Answers) -> tuple[list[tuple[datetime, int]], list[datetime]]:
    """(time, raw value) of each interval in the window, and the times the window spans."""
    start, end = answers.window
    period = PROFILE_PERIODS[profile]
    expected = _instants(period, start, min(end, answers.meter_time))
    consecutive = _consecutive(rows, column, expected, start, end, source.derivation,
                               _FIXED_STEPS.get(period))
    if consecutive is not None:
        return consecutive, expected
    by_time = {}
    for at, row in rows:
        raw = row[column]
        by_time[at] = raw if type(raw) is int else _integer(mrid, profile, raw)
    times = list(by_time)
    if any(a >= b for a, b in zip(times, times[1:])):  # meters send rows in time order
        times.sort()
    values = []
    if source.derivation is not Derivation.DELTA:
        return [(at, by_time[at]) for at in times if start < at <= end], expected
    step = _FIXED_STEPS.get(period)
    for at in times:
        if not start < at <= end:
            continue
        before = by_time.get(at - step if step is not None else period.previous(at))
        if before is None:
            continue  # the interval's start was not captured: no delta, counted as missing
        values.append((at, by_time[at] - before))
    return values, expected


def _consecutive(rows: list, column: int, expected: tuple[datetime, ...], start: datetime,
                 end: datetime, derivation: Derivation, step: timedelta | None
                 ) -> list[tuple[datetime, int]] | None:
    """`_interval_values`'s values when the rows are exactly the window's capture instants (for
    a delta, with the capture before the window first) and every value a plain integer, the
    usual answer, worked out without Python per row; None for any other answer."""
    if not expected:
        return None
    times = list(map(itemgetter(0), rows))
    raws = [row[column] for _, row in rows]
    if set(map(type, raws)) != {int}:
        return None
    if derivation is Derivation.DELTA:
        if (step is None or len(times) != len(expected) + 1 or times[0] != expected[0] - step
                or times[1:] != list(expected)):
            return None
        return list(zip(expected, map(sub, raws[1:], raws)))
    if len(times) == len(expected) + 1 and times[0] <= start:
        del times[0], raws[0]
    if times != list(expected) or times[-1] > end:
        return None
    return list(zip(times, raws))


_FIXED_STEPS = {Period.QUARTER_HOUR: timedelta(minutes=15), Period.DAY: timedelta(days=1)}
# Capture instants by (period, start, end): a fleet read over one window asks the same ones
# for every meter. Bounded; a pure cache of `Period.instants`.
_INSTANTS: dict[tuple, tuple[datetime, ...]] = {}
_INSTANTS_KEPT = 1000


def _instants(period: Period, start: datetime, end: datetime,
              include_start: bool = False) -> tuple[datetime, ...]:
    key = (period, start, end, include_start)
    found = _INSTANTS.get(key)
    if found is None:
        if len(_INSTANTS) >= _INSTANTS_KEPT:
            _INSTANTS.clear()
        found = _INSTANTS[key] = tuple(period.instants(start, end, include_start))
    return found


def _billing_values(mrid: str, profile: str, rows: list, column: int,
                    answers: _Answers) -> tuple[list[tuple[datetime, int]], list[datetime]]:
    """The register's values captured at start <= time <= end, and the capture times spanned."""
    start, end = answers.window
    expected = _instants(PROFILE_PERIODS[profile], start, min(end, answers.meter_time),
                         include_start=True)
    values = [(at, _integer(mrid, profile, row[column])) for at, row in rows if start <= at <= end]
    return values, expected


def _shortfall(mrid: str, reading_type: str, profile: str, expected: list[datetime],
               values: list[tuple[datetime, int]], answers: _Answers) -> HistoryShortfall | None:
    if len(values) == len(expected) and list(map(itemgetter(0), values)) == list(expected):
        return None  # every instant there (the usual case), known without a set
    got = {at for at, _ in values}
    missing = [at for at in expected if at not in got]
    if not missing:
        return None
    oldest = min(got).isoformat() if got else "none"
    return HistoryShortfall(
        mrid, f"{profile} gives {len(got)} of the {len(expected)} values of reading type "
        f"{reading_type} in {answers.window[0].isoformat()} .. {answers.window[1].isoformat()}; "
        f"{len(missing)} missing, from {missing[0].isoformat()} (the meter's history does not "
        f"reach them; oldest value returned: {oldest})", reading_type, len(missing), missing[0])


def _scaler_unit(mrid: str, obis: str, answer: Any) -> tuple[int, int] | DataAccessError:
    if isinstance(answer, DataAccessError):
        return answer
    value = answer.value
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(part, int) for part in value)):
        raise ProtocolError(mrid, f"register {obis} scaler_unit is {value!r}, "
                            "not structure{integer, enum}")
    return value[0], value[1]


def _unavailable(mrid: str, reading_type: str, obis: str,
                 answer: DataAccessError) -> ObjectUnavailable:
    return ObjectUnavailable(mrid, f"{obis} for reading type {reading_type}: {answer.reason}",
                             reading_type, answer.result)


def _unusable(mrid: str, reading_type: str, source: CosemSource,
              scaler_unit: tuple[int, int] | DataAccessError) -> DeviceError | None:
    if isinstance(scaler_unit, DataAccessError):
        return _unavailable(mrid, reading_type, source.obis, scaler_unit)
    if scaler_unit[1] != source.unit:
        return UnsupportedReadingType(
            mrid, f"register {source.obis} reports unit {scaler_unit[1]}, reading type "
            f"{reading_type} needs unit {source.unit}", reading_type)
    return None


def _integer(mrid: str, where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(mrid, f"{where} value {value!r} is not an integer")
    return value
