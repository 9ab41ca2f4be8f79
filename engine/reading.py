"""On-demand meter reading: a GetMeterReadings request becomes one DLMS session per device.

The devices are read concurrently under one bound shared by every request (a head-end must not
open more sessions than its network and meters bear, however many MDM calls arrive at once).
A device that does not answer, refuses the association or sends garbage is an Error on that
device in the reply; the others are still read, stored and returned.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from twisted.internet.defer import DeferredList, DeferredSemaphore, inlineCallbacks

from cimhes.cim.message import Error, ErrorCase, ErrorCode, ErrorLevel, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings, MeterReading
from cimhes.cim.reading_type import ReadingType
from cimhes.drivers import DeviceAddress, MeterReadResult, driver_for, needs_window
from cimhes.drivers.errors import (
    AnswerTooLarge,
    AssociationRefused,
    AuthenticationFailed,
    ConnectionFailed,
    DeviceError,
    HeadEndExhausted,
    HistoryShortfall,
    ObjectUnavailable,
    ProtocolError,
    ReplayDetected,
    Timeout,
    UnsupportedReadingType,
)
from cimhes.drivers.security import HeadEndSecurity
from cimhes.drivers.limits import DEFAULT_CONNECTIONS_PER_SECOND, ConnectionPacer, SessionLimits
from cimhes.engine import redaction
from cimhes.engine.store import ReadingWriter, StoreRunner

log = logging.getLogger(__name__)

# The CIM Reply.Error code for each kind of device failure (codes: cimhes.cim.message.ErrorCode).
DEVICE_ERROR_CODES: dict[type[DeviceError], ErrorCase] = {
    Timeout: ErrorCode.DEVICE_TIMEOUT,
    ConnectionFailed: ErrorCode.DEVICE_UNREACHABLE,
    AssociationRefused: ErrorCode.DEVICE_REFUSED,
    AuthenticationFailed: ErrorCode.DEVICE_REFUSED,  # HLS-GMAC: keys or system titles differ
    ReplayDetected: ErrorCode.DEVICE_PROTOCOL_ERROR,  # refused, and recorded as security event
    ProtocolError: ErrorCode.DEVICE_PROTOCOL_ERROR,
    UnsupportedReadingType: ErrorCode.UNSUPPORTED_READING_TYPE,
    ObjectUnavailable: ErrorCode.DATA_UNAVAILABLE,
    AnswerTooLarge: ErrorCode.DEVICE_PROTOCOL_ERROR,
    HeadEndExhausted: ErrorCode.HIGH_LOAD,  # the head-end's own limit, not the device's
    HistoryShortfall: ErrorCode.PARTIAL_RESULT,
}
# Device errors that are warnings: the values that exist were returned.
DEVICE_ERROR_LEVELS: dict[type[DeviceError], ErrorLevel] = {
    HistoryShortfall: ErrorLevel.WARNING,
}


@dataclass
class ReadOutcome:
    """What a read request produced: the readings, and one Error for each thing that failed."""

    meter_readings: list[MeterReading] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)
    devices_asked: int = 0
    devices_failed: int = 0

    @property
    def result(self) -> ReplyResult:
        if not self.errors:
            return ReplyResult.OK
        if not self.meter_readings:
            return ReplyResult.FAILED
        return ReplyResult.PARTIAL


class MeterReadingService:
    """Reads meters on demand: resolve the devices, read them under a bound, store, report."""

    def __init__(self, reactor, store: StoreRunner, *, concurrency: int = 200,
                 limits: SessionLimits | None = None, timeout: float | None = None,
                 connections_per_second: float = DEFAULT_CONNECTIONS_PER_SECOND,
                 now: Callable[[], datetime] | None = None,
                 security: HeadEndSecurity | None = None):
        """`concurrency` bounds the sessions open at once, `connections_per_second` the new
        connections (0: unpaced), `limits` each session (`timeout` alone is the short form:
        connect and response timeout, other limits at their defaults)."""
        self._reactor = reactor
        self._store = store
        self._sessions = DeferredSemaphore(concurrency)
        self._limits = limits or (SessionLimits.of(timeout) if timeout is not None
                                  else SessionLimits())
        self._pacer = ConnectionPacer(reactor, connections_per_second)
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._security = security  # for HLS-GMAC meters: system title, counter book
        self._writer = ReadingWriter(store, self._now)

    @inlineCallbacks
    def read(self, request: GetMeterReadings):
        outcome = ReadOutcome()
        reading_types = readable_reading_types(request.reading_types, request.start is not None,
                                                outcome.errors)
        if request.reading_types and not reading_types:
            return outcome  # nothing asked for can be read; an empty list would mean "all"

        devices = yield self._resolve(request, outcome)
        outcome.devices_asked = len(devices) + outcome.devices_failed
        if not devices:
            return outcome

        saves = []

        def store(result: MeterReadResult) -> MeterReadResult:
            saves.append(self._writer.save(result.meter_reading))
            return result

        reads = [self._sessions.run(self._read_device, device, reading_types,
                                    request.start, request.end).addCallback(store)
                 for device in devices]
        results = yield DeferredList(reads, consumeErrors=True)
        for device, (succeeded, value) in zip(devices, results):
            if succeeded:
                outcome.meter_readings.append(value.meter_reading)
                # Types the device could not serve are errors on it; its other values stand.
                outcome.errors.extend(_device_error(device, error) for error in value.errors)
            else:
                outcome.devices_failed += 1
                outcome.errors.append(_failed_device(device, value))

        stored = yield DeferredList(saves, consumeErrors=True)
        failures = [value for succeeded, value in stored if not succeeded]
        if failures:  # the readings still go back to the caller
            log.error("storing readings failed: %s", redaction.log_line(failures[0]))
            outcome.errors.append(Error(
                code=ErrorCode.INTERNAL_ERROR, level=ErrorLevel.WARNING,
                reason=f"{len(failures)} of {len(saves)} devices' readings below were read "
                       f"but not stored: {redaction.summary(failures[0].value)}"))
        return outcome

    def _read_device(self, device: DeviceAddress, reading_types, start, end):
        driver = driver_for(device.device_type)
        return driver.read(self._reactor, device, reading_types, start, end, self._limits,
                           self._pacer, self._security)

    @inlineCallbacks
    def _resolve(self, request: GetMeterReadings, outcome: ReadOutcome):
        """The inventory's devices for the request's EndDevice refs, each once."""
        found = yield self.resolve(request.end_devices, outcome)
        devices: list[DeviceAddress] = []
        seen: set[str] = set()
        for device in found:
            if device is not None and device.mrid not in seen:
                seen.add(device.mrid)
                devices.append(device)
        return devices

    @inlineCallbacks
    def resolve(self, refs, outcome: ReadOutcome):
        """Deferred[list]: the inventory's device for each EndDevice ref (None where there is
        none), with an Error in ``outcome`` for each unknown ref (2.4) and each whose mRID and
        Names point at different devices (2.4, mrid-names-mismatch)."""
        # The codec has made sure every reference has an mRID or a name.
        mrids = [ref.mrid for ref in refs if ref.mrid]
        names = [_first_name(ref) for ref in refs if ref.names]
        found = yield self._store.run("find_devices", mrids, names)
        devices: list[DeviceAddress | None] = []
        for ref in refs:
            key = ref.mrid or _first_name(ref)
            device = found.get(key)
            if device is not None and ref.mrid and ref.names:
                named = found.get(_first_name(ref))
                if named is None or named.mrid != device.mrid:
                    # Two identifiers, two answers: neither is chosen silently.
                    outcome.devices_failed += 1
                    outcome.errors.append(Error(
                        code=ErrorCode.DEVICE_MISMATCH,
                        reason=f"EndDevice mRID {ref.mrid} is {device.name or device.mrid}, but its "
                               f"Names {_first_name(ref)!r} "
                               + ("name no device" if named is None else f"name {named.mrid}"),
                        id=ref.mrid, id_kind="uuid", object_type="EndDevice"))
                    devices.append(None)
                    continue
            if device is None:
                outcome.devices_failed += 1
                outcome.errors.append(Error(
                    code=ErrorCode.INVALID_METER,
                    reason=f"EndDevice {key} is not known to this head-end",
                    id=key, id_kind="uuid" if ref.mrid else "name", object_type="EndDevice"))
            devices.append(device)
        return devices


def readable_reading_types(codes: list[str], has_window: bool, errors: list[Error]) -> list[str]:
    """The codes that can be read, in order; an Error for each that is not a ReadingType, and for
    each interval type asked without a time window (interval data is read over a window)."""
    readable = []
    for code in codes:
        try:
            reading_type = ReadingType.parse(code)
        except ValueError as exc:
            errors.append(Error(code=ErrorCode.INVALID_READING_TYPE,
                                reason=f"ReadingType {code!r}: {exc}", id=code,
                                object_type="ReadingType"))
            continue
        interval = needs_window(reading_type.mrid)
        if interval is None:
            interval = bool(reading_type.measuring_period or reading_type.macro_period)
        if not has_window and interval:
            errors.append(Error(
                code=ErrorCode.TIME_WINDOW_MISSING,
                reason=f"ReadingType {code} is interval data and needs a time window "
                       "(Request StartTime/EndTime or GetMeterReadings Reading.timePeriod)",
                id=code, object_type="ReadingType"))
            continue
        readable.append(reading_type.mrid)
    return readable


def _first_name(ref: DeviceRef) -> str | None:
    return ref.names[0].name if ref.names else None


def _device_error(device: DeviceAddress, error: DeviceError) -> Error:
    code = DEVICE_ERROR_CODES.get(type(error), ErrorCode.DEVICE_PROTOCOL_ERROR)
    level = DEVICE_ERROR_LEVELS.get(type(error), ErrorLevel.FATAL)
    if isinstance(error, UnsupportedReadingType):
        # An error about a ReadingType names the ReadingType; the reason names the device.
        return Error(code=code, level=level, reason=str(error), details=f"EndDevice {device.mrid}",
                     id=error.reading_type, object_type="ReadingType")
    return Error(code=code, level=level, reason=str(error), id=device.mrid, id_kind="uuid",
                 object_type="EndDevice")


def _failed_device(device: DeviceAddress, failure) -> Error:
    if isinstance(failure.value, DeviceError):
        return _device_error(device, failure.value)
    ref = redaction.reference()
    log.error("reading %s failed unexpectedly: %s", device.mrid, redaction.log_line(failure, ref))
    exc = failure.value
    return Error(code=ErrorCode.INTERNAL_ERROR, reason=f"EndDevice {device.mrid}: internal error "
                 f"while reading ({redaction.summary(exc)}; log reference {ref})",
                 id=device.mrid, id_kind="uuid", object_type="EndDevice")
