"""On-demand meter reading: a GetMeterReadings request becomes one DLMS session per device.

Each device's read is a job (priority on-demand) run by the engine's dispatcher, so the same
limits, fairness and durability apply as to scheduled collection (a head-end must not open more
sessions than its network and meters bear, however many MDM calls arrive at once); the request
is still answered synchronously, once every job is finished.
A device that does not answer, refuses the association or sends garbage is an Error on that
device in the reply; the others are still read, stored and returned.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.python.failure import Failure

from cimhes.cim.message import Error, ErrorCase, ErrorCode, ErrorLevel, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings, MeterReading
from cimhes.cim.reading_type import ReadingType
from cimhes.drivers import DeviceAddress, needs_window
from cimhes.drivers.errors import (
    AnswerTooLarge,
    AssociationRefused,
    AuthenticationFailed,
    ConnectionFailed,
    CounterRejected,
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
from cimhes.drivers.limits import DEFAULT_CONNECTIONS_PER_SECOND, SessionLimits
from cimhes.engine import redaction
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.jobs import NewJob, Priority
from cimhes.engine.limits import EngineSettings
from cimhes.engine.store import StoreRunner

log = logging.getLogger(__name__)

BULK_JOBS = 50  # jobs of one request above which their creation is bulk work for the store

# The CIM Reply.Error code for each kind of device failure (codes: cimhes.cim.message.ErrorCode).
DEVICE_ERROR_CODES: dict[type[DeviceError], ErrorCase] = {
    Timeout: ErrorCode.DEVICE_TIMEOUT,
    ConnectionFailed: ErrorCode.DEVICE_UNREACHABLE,
    AssociationRefused: ErrorCode.DEVICE_REFUSED,
    AuthenticationFailed: ErrorCode.DEVICE_REFUSED,  # HLS-GMAC: keys or system titles differ
    ReplayDetected: ErrorCode.DEVICE_PROTOCOL_ERROR,  # refused, and recorded as security event
    CounterRejected: ErrorCode.DEVICE_PROTOCOL_ERROR,  # still refused after one resync
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
    # The mRIDs that gave values (also when their values were handed on, not kept here).
    answered: list[str] = field(default_factory=list)
    # A large request's values are left in the store and the reply is built from it part by
    # part (engine/reading_sources.py, StoredAnswer); then `meter_readings` is empty.
    in_store: object | None = None

    @property
    def result(self) -> ReplyResult:
        if not self.errors:
            return ReplyResult.OK
        if not self.meter_readings and not (self.in_store is not None and self.in_store):
            return ReplyResult.FAILED
        return ReplyResult.PARTIAL


class MeterReadingService:
    """Reads meters on demand: resolve the devices, make one job per device (priority on-demand),
    wait for the dispatcher to finish them under its limits, and report."""

    def __init__(self, reactor, store: StoreRunner, *, dispatcher: Dispatcher | None = None,
                 concurrency: int = 200, limits: SessionLimits | None = None,
                 timeout: float | None = None,
                 connections_per_second: float = DEFAULT_CONNECTIONS_PER_SECOND,
                 settings: EngineSettings | None = None,
                 now: Callable[[], datetime] | None = None,
                 security: HeadEndSecurity | None = None, observer=None):
        """Without `dispatcher`, one of its own is made and started: `concurrency` bounds the
        sessions open at once, `connections_per_second` the new connections (0: unpaced),
        `limits` each session (`timeout` alone is the short form: connect and response
        timeout, other limits at their defaults), `settings` the engine's other bounds,
        `security` what HLS-GMAC meters need (system title, counter book)."""
        self._reactor = reactor
        self._store = store
        self._now = now or (lambda: datetime.now(timezone.utc))
        if dispatcher is None:
            dispatcher = Dispatcher(
                reactor, store, settings, max_sessions=concurrency,
                session_limits=limits or (SessionLimits.of(timeout) if timeout is not None
                                          else SessionLimits()),
                connections_per_second=connections_per_second, security=security,
                now=self._now, observer=observer)
            dispatcher.start()
            reactor.addSystemEventTrigger("before", "shutdown", dispatcher.stop)
        self.dispatcher = dispatcher

    @property
    def sessions_open(self) -> int:
        """Meter sessions running now (for the metrics)."""
        return self.dispatcher.bounds.open

    @inlineCallbacks
    def read(self, request: GetMeterReadings,
             on_reading: Callable[[DeviceAddress, MeterReading, bool], None] | None = None):
        """Deferred[ReadOutcome]. With `on_reading`, each device's MeterReading is handed to it
        as soon as its job finishes (with whether it was stored) and not kept in the outcome,
        so a request's memory does not grow with the values of all its meters."""
        outcome = ReadOutcome()
        reading_types = readable_reading_types(request.reading_types, request.start is not None,
                                                outcome.errors)
        if request.reading_types and not reading_types:
            return outcome  # nothing asked for can be read; an empty list would mean "all"

        devices = yield self._resolve(request, outcome)
        outcome.devices_asked = len(devices) + outcome.devices_failed
        if not devices:
            return outcome

        settings = self.dispatcher.settings
        store, jobs_store, now = self._store.store, self.dispatcher.jobs, self._now()

        def create():  # on the store's thread: one unit of work, not two round trips
            # Each job carries its device's route, so the per-route bound (a concentrator's
            # segment) holds across every request.
            routes = store.routes_of([d.mrid for d in devices])
            jobs = [NewJob(device.mrid, tuple(reading_types), request.start, request.end,
                           route=routes.get(device.mrid))
                    for device in devices]
            return jobs_store.create_request(
                f"on-demand:{uuid.uuid4()}", "on-demand", jobs, priority=Priority.ON_DEMAND,
                max_attempts=settings.on_demand_attempts, now=now)
        # A large request's job rows go in the store's bulk lane, behind small requests' work.
        submit = self._store.call_bulk if len(devices) > BULK_JOBS else self._store.call
        ids, _ = yield submit(create)
        def hand_on(job, device):
            if job.result is not None:
                on_reading(device, job.result.meter_reading, job.error is None)
                job.result = replace(job.result, meter_reading=None)
            return job

        waiting = [self.dispatcher.wait(job_id) for job_id in ids]
        if on_reading is not None:
            for waiter, device in zip(waiting, devices):
                waiter.addCallback(hand_on, device)
        self.dispatcher.submitted(ids)
        results = yield gatherResults(waiting)

        not_stored = [r for r in results if r.result is not None and r.error is not None]
        for device, job in zip(devices, results):
            if job.result is not None:
                outcome.answered.append(device.mrid)
                if on_reading is None:
                    outcome.meter_readings.append(job.result.meter_reading)
                # Types the device could not serve are errors on it; its other values stand.
                outcome.errors.extend(_device_error(device, error) for error in job.result.errors)
            else:
                outcome.devices_failed += 1
                outcome.errors.append(_failed_device(device, job.error))
        if not_stored:  # the readings still go back to the caller
            outcome.errors.append(Error(
                code=ErrorCode.INTERNAL_ERROR, level=ErrorLevel.WARNING,
                reason=f"{len(not_stored)} of {len(results)} devices' readings below were "
                       f"read but not stored: {redaction.summary(not_stored[0].error)}"))
        return outcome

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


def _failed_device(device: DeviceAddress, exc: BaseException) -> Error:
    if isinstance(exc, DeviceError):
        return _device_error(device, exc)
    ref = redaction.reference()
    log.error("reading %s failed unexpectedly: %s", device.mrid,
              redaction.log_line(Failure(exc), ref))
    return Error(code=ErrorCode.INTERNAL_ERROR, reason=f"EndDevice {device.mrid}: internal error "
                 f"while reading ({redaction.summary(exc)}; log reference {ref})",
                 id=device.mrid, id_kind="uuid", object_type="EndDevice")
