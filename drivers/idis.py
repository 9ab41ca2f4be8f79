"""IDIS meter driver: CIM reading types read from an IDIS meter's COSEM objects in one association.

`READING_TYPE_MAP` is the one table saying where each CIM ReadingType lives in the meter.
`IdisMeterDriver.read` opens one association (public client or LLS, as the inventory says), reads
the clock, the registers asked for (value and scaler_unit), the load profile by range when
interval types and a window are asked for, releases, and returns a `MeterReadResult`: the CIM
`MeterReading` plus one error per reading type it could not serve.

Values are converted exactly: CIM value = raw * 10**scaler / 10**cim_multiplier, in Decimal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cimhes.cim.meter_readings import DeviceRef, IntervalBlock, IntervalReading, MeterReading, Name, Reading
from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.dlms_session import ClientSession, DataAccessError, cosem_datetime
from cimhes.drivers.errors import DeviceError, ObjectUnavailable, ProtocolError, UnsupportedReadingType
from cimhes.drivers.limits import ConnectionPacer, SessionLimits
from cimhes.drivers.transport import DlmsConnection, connect

log = Logger()

CLOCK_OBIS = "0.0.1.0.0.255"
CLOCK_CLASS = 8
REGISTER_CLASS = 3
PROFILE_GENERIC_CLASS = 7
WH = 30  # DLMS unit enumeration: active energy, Wh


@dataclass(frozen=True)
class CosemSource:
    """Where one CIM reading type comes from in an IDIS meter.

    register_obis: the register (class 3) whose attribute 2 holds the raw value and attribute 3
        its scaler_unit; for an interval type, the register captured as a profile column.
    profile_obis: for interval types, the profile generic (class 7) whose buffer holds the
        column capturing register_obis attribute 2; None for register reads.
    unit: the DLMS unit the register must report (the reading type's unit, without multiplier).
    cim_multiplier: the reading type's power-of-ten multiplier (3 = k), divided out.
    """

    meaning: str
    register_obis: str
    profile_obis: str | None = None
    unit: int = WH
    cim_multiplier: int = 3

    @property
    def is_interval(self) -> bool:
        return self.profile_obis is not None


LOAD_PROFILE = "1.0.99.1.0.255"

# CIM ReadingType mRID (IEC 61968-9 ed.2, 18 parts) -> COSEM source. The contract's table:
# flowDirection 1 forward / 19 reverse, measuringPeriod 2 = fifteen minutes, tou 1/2 = tariffs,
# multiplier 3 = k, unit 72 = Wh.
READING_TYPE_MAP: dict[str, CosemSource] = {
    "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0":
        CosemSource("+A active energy import total register, kWh", "1.0.1.8.0.255"),
    "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0":
        CosemSource("-A active energy export total register, kWh", "1.0.2.8.0.255"),
    "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0":
        CosemSource("+A active energy import tariff 1 register, kWh", "1.0.1.8.1.255"),
    "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0":
        CosemSource("+A active energy import tariff 2 register, kWh", "1.0.1.8.2.255"),
    "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0":
        CosemSource("+A active energy import, 15-minute load profile, kWh", "1.0.1.8.0.255",
                    LOAD_PROFILE),
    "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0":
        CosemSource("-A active energy export, 15-minute load profile, kWh", "1.0.2.8.0.255",
                    LOAD_PROFILE),
}


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
    registers: list[str] = field(default_factory=list)     # OBIS whose value (attr 2) is read
    scaler_units: list[str] = field(default_factory=list)  # OBIS whose scaler_unit is read
    profiles: list[str] = field(default_factory=list)      # profile OBIS read by range
    errors: list[DeviceError] = field(default_factory=list)


@dataclass
class _Answers:
    """What the meter said, before conversion to CIM. A DataAccessError stands where the meter
    refused an object; it becomes an error for the reading types that needed it."""

    meter_time: datetime
    window: tuple[datetime, datetime] | None
    raw_values: dict[str, int | DataAccessError] = field(default_factory=dict)
    scaler_units: dict[str, tuple[int, int] | DataAccessError] = field(default_factory=dict)
    # profile OBIS -> (capture_objects, buffer rows)
    profiles: dict[str, tuple[Any, Any] | DataAccessError] = field(default_factory=dict)


class IdisMeterDriver:
    """Reads IDIS meters (device type "idis-meter")."""

    device_type = "idis-meter"

    def read(self, reactor: Any, device: DeviceAddress, reading_types: list[str],
             start: datetime | None, end: datetime | None, limits: SessionLimits | float,
             pacer: ConnectionPacer | None = None) -> Deferred:
        """Deferred[MeterReadResult]; fails with a DeviceError naming the device when the
        meter cannot be read at all (ConnectionFailed, Timeout, AssociationRefused,
        ProtocolError).

        `reading_types` empty means every type in READING_TYPE_MAP (the device's default set,
        as an empty GetMeterReadings ReadingType list asks). Interval types are read when
        `start` is given: the intervals lying inside [start, end], i.e. the rows stamped
        start < time <= end (a row's time is the end of its interval), `end` defaulting to the
        meter's clock.
        Without `start` they give no IntervalBlock (and no error). `limits` bound the session
        (`SessionLimits`; a number is the connect and response timeout, other limits at their
        defaults); `pacer` spaces new connections. Every DeviceError, raised or in the
        result, names the device by mRID, name and host:port. Cancelling the Deferred aborts
        the connection.
        """
        reading = Deferred.fromCoroutine(self._read(
            reactor, device, reading_types, start, end, SessionLimits.of(limits), pacer))
        return reading.addCallbacks(_located_result, _located_failure,
                                    callbackArgs=(device,), errbackArgs=(device,))

    def _plan(self, device: DeviceAddress, reading_types: list[str],
              with_profile: bool) -> _Plan:
        plan = _Plan()
        for reading_type in dict.fromkeys(reading_types or READING_TYPE_MAP):
            source = READING_TYPE_MAP.get(reading_type)
            if source is None:
                plan.errors.append(UnsupportedReadingType(
                    device.mrid, f"reading type {reading_type} is not mapped for "
                    f"{self.device_type}", reading_type))
                continue
            if source.is_interval and not with_profile:
                continue
            plan.wanted.append(reading_type)
            if source.is_interval:
                if source.profile_obis not in plan.profiles:
                    plan.profiles.append(source.profile_obis)
            elif source.register_obis not in plan.registers:
                plan.registers.append(source.register_obis)
            if source.register_obis not in plan.scaler_units:
                plan.scaler_units.append(source.register_obis)
        return plan

    async def _read(self, reactor: Any, device: DeviceAddress, reading_types: list[str],
                    start: datetime | None, end: datetime | None, limits: SessionLimits,
                    pacer: ConnectionPacer | None) -> MeterReadResult:
        if start is not None and start.tzinfo is None or end is not None and end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware")
        plan = self._plan(device, reading_types, with_profile=start is not None)
        session = ClientSession(device.mrid, device.client_address, device.server_address,
                                device.authentication, device.password)
        connection = await connect(reactor, device, session, limits, pacer)
        try:
            answers = await self._converse(connection, session, plan, start, end)
        finally:
            connection.close()
        return _meter_read_result(device, plan, answers)

    async def _converse(self, connection: DlmsConnection, session: ClientSession, plan: _Plan,
                        start: datetime | None, end: datetime | None) -> _Answers:
        """The one association: AARQ, clock, registers, profile by range, RLRQ."""
        mrid = session.device_mrid
        await connection.request(session.associate(), "AARQ")

        async def get(class_id: int, obis: str, attribute: int) -> Any:
            return await connection.request(session.get(class_id, obis, attribute),
                                            f"GET {obis} attribute {attribute}")

        clock = await get(CLOCK_CLASS, CLOCK_OBIS, 2)
        if isinstance(clock, DataAccessError):
            raise ProtocolError(mrid, f"clock unreadable: {clock.reason}")
        meter_time = _datetime_or_error(mrid, clock.value, "clock time")
        window = None
        if plan.profiles:
            window = (start, end if end is not None else meter_time)
        answers = _Answers(meter_time, window)

        for obis in plan.scaler_units:
            if obis in plan.registers:
                answers.raw_values[obis] = _register_value(
                    mrid, obis, await get(REGISTER_CLASS, obis, 2))
            answers.scaler_units[obis] = _scaler_unit(
                mrid, obis, await get(REGISTER_CLASS, obis, 3))

        for profile in plan.profiles:
            captures = await get(PROFILE_GENERIC_CLASS, profile, 3)
            if isinstance(captures, DataAccessError):
                answers.profiles[profile] = captures
                continue
            rows = await connection.request(
                session.get_rows_by_range(profile, *window),
                f"GET {profile} buffer from {window[0].isoformat()} to {window[1].isoformat()}")
            answers.profiles[profile] = (rows if isinstance(rows, DataAccessError)
                                         else (captures.value, rows.value))

        try:
            await connection.request(session.release(), "RLRQ")
        except DeviceError as failure:
            # Every answer is in; a meter that fumbles the release does not spoil them.
            log.info("release of {mrid} failed: {failure}", mrid=mrid, failure=failure)
        return answers


def _located_result(result: MeterReadResult, device: DeviceAddress) -> MeterReadResult:
    where = f"{device.host}:{device.port}"
    for error in result.errors:
        error.located(device.name, where)
    return result


def _located_failure(failure: Any, device: DeviceAddress) -> Any:
    if isinstance(failure.value, DeviceError):
        failure.value.located(device.name, f"{device.host}:{device.port}")
    return failure


def _meter_read_result(device: DeviceAddress, plan: _Plan, answers: _Answers) -> MeterReadResult:
    """Convert the meter's answers to CIM: values exact in the CIM unit, one error per
    reading type that could not be served."""
    mrid = device.mrid
    errors = list(plan.errors)
    readings: list[Reading] = []
    blocks: list[IntervalBlock] = []
    timed_rows: dict[str, tuple[list, list[tuple[datetime, list]]]] = {}
    for reading_type in plan.wanted:
        source = READING_TYPE_MAP[reading_type]
        scaler_unit = answers.scaler_units[source.register_obis]
        problem = _unusable(mrid, reading_type, source, scaler_unit)
        if problem is not None:
            errors.append(problem)
            continue
        scaler = scaler_unit[0]
        if not source.is_interval:
            raw = answers.raw_values[source.register_obis]
            if isinstance(raw, DataAccessError):
                errors.append(_unavailable(mrid, reading_type, source.register_obis, raw))
                continue
            readings.append(Reading(reading_type, cim_value(raw, scaler, source.cim_multiplier),
                                    answers.meter_time))
            continue
        profile = source.profile_obis
        answer = answers.profiles[profile]
        if isinstance(answer, DataAccessError):
            errors.append(_unavailable(mrid, reading_type, profile, answer))
            continue
        if profile not in timed_rows:  # both profile types share the rows' decoded times
            timed_rows[profile] = _timed_rows(mrid, profile, *answer, *answers.window)
        captures, rows = timed_rows[profile]
        column = _column(captures, source.register_obis, 2)
        if column is None:
            raise ProtocolError(mrid, f"{profile} does not capture {source.register_obis} "
                                "attribute 2")
        blocks.append(IntervalBlock(reading_type, [
            IntervalReading(at, cim_value(_integer(mrid, profile, row[column]), scaler,
                                          source.cim_multiplier))
            for at, row in rows]))
    meter_reading = MeterReading(DeviceRef(mrid, (Name(device.name),)), readings, blocks,
                                 answers.window)
    return MeterReadResult(meter_reading, tuple(errors))


def _datetime_or_error(mrid: str, value: Any, what: str) -> datetime:
    if not isinstance(value, (bytes, bytearray)):
        raise ProtocolError(mrid, f"{what} is {value!r}, not a date-time octet-string")
    try:
        return cosem_datetime(value)
    except ValueError as failure:
        raise ProtocolError(mrid, f"{what}: {failure}") from None


def _register_value(mrid: str, obis: str, answer: Any) -> int | DataAccessError:
    if isinstance(answer, DataAccessError):
        return answer
    if not isinstance(answer.value, int) or isinstance(answer.value, bool):
        raise ProtocolError(mrid, f"register {obis} value is {answer.value!r}, not an integer")
    return answer.value


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
        return _unavailable(mrid, reading_type, source.register_obis, scaler_unit)
    if scaler_unit[1] != source.unit:
        return UnsupportedReadingType(
            mrid, f"register {source.register_obis} reports unit {scaler_unit[1]}, reading type "
            f"{reading_type} needs unit {source.unit}", reading_type)
    return None


def _obis_bytes(obis: str) -> bytes:
    return bytes(int(part) for part in obis.split("."))


def _column(captures: list, obis: str, attribute: int) -> int | None:
    wanted = _obis_bytes(obis)
    for index, capture in enumerate(captures):
        if (isinstance(capture, list) and len(capture) == 4
                and bytes(capture[1]) == wanted and capture[2] == attribute):
            return index
    return None


def _integer(mrid: str, profile: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(mrid, f"{profile} row value {value!r} is not an integer")
    return value


def _timed_rows(mrid: str, profile: str, captures: Any, rows: Any, start: datetime,
                end: datetime) -> tuple[list, list[tuple[datetime, list]]]:
    """The buffer's rows with their clock column decoded, kept when start < time <= end.

    A row is stamped with the end of its interval, so the row at `start` closes the interval
    before the window and is dropped; the meter's range selection is inclusive at both ends, and
    a meter that over-delivers does not widen the window either."""
    if not isinstance(captures, list):
        raise ProtocolError(mrid, f"{profile} capture_objects is {captures!r}, not an array")
    time_column = _column(captures, CLOCK_OBIS, 2)
    if time_column is None:
        raise ProtocolError(mrid, f"{profile} does not capture {CLOCK_OBIS} attribute 2")
    if not isinstance(rows, list):
        raise ProtocolError(mrid, f"{profile} buffer is {rows!r}, not an array")
    width = len(captures)
    kept = []
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            raise ProtocolError(mrid, f"{profile} row {row!r} does not have {width} columns")
        # A null date-time (IDIS compressed profiles) would need the capture period: not read.
        at = _datetime_or_error(mrid, row[time_column], f"{profile} row time")
        if start < at <= end:
            kept.append((at, row))
    return captures, kept
