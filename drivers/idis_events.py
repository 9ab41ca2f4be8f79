"""IDIS event logs read by time range and typed as CIM EndDeviceEvents.

`EVENT_LOGS` is the table of the logs the driver reads (IDIS companion specification event logs,
OBIS as in ../shared/design/REFERENCE-FACTS.md): each a profile generic (class 7) whose rows are
(clock, event code) — the code being attribute 2 of the log's event code object, class 1,
0.0.96.11.x.255 — or, for the power failure log, (end of the failure, its duration in seconds).
`read_events` reads the chosen logs in one association, rows with start <= time <= end, and
types each code through `cimhes.cim.end_device_event_types.IDIS_EVENT_TYPES`; a code the table
does not know is still returned, typed `UNMAPPED_EVENT_TYPE` with its raw code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred

from cimhes.cim.end_device_event_types import (
    IDIS_EVENT_TYPES,
    LONG_POWER_FAILURE,
    UNMAPPED_EVENT_TYPE,
)
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.dlms_session import DataAccessError
from cimhes.drivers.errors import DeviceError, ObjectUnavailable, ProtocolError
from cimhes.drivers.idis_association import Conversation, column_of, in_association, located
from cimhes.drivers.limits import ConnectionPacer, SessionLimits
from cimhes.drivers.security import HeadEndSecurity

__all__ = ["EventLog", "EVENT_LOGS", "EventReadResult", "read_events", "log_event"]


@dataclass(frozen=True)
class EventLog:
    name: str
    obis: str
    value_class: int  # the captured column: class, OBIS, attribute 2
    value_obis: str
    is_power_failure: bool = False


EVENT_LOGS: dict[str, EventLog] = {log.name: log for log in (
    EventLog("standard", "0.0.99.98.0.255", 1, "0.0.96.11.0.255"),
    EventLog("fraud", "0.0.99.98.1.255", 1, "0.0.96.11.1.255"),
    EventLog("disconnector", "0.0.99.98.2.255", 1, "0.0.96.11.2.255"),
    EventLog("power quality", "0.0.99.98.4.255", 1, "0.0.96.11.4.255"),
    # Duration of the long power failure (Blue Book 0.0.96.7.19.255, seconds): verify per meter.
    EventLog("power failure", "1.0.99.97.0.255", 3, "0.0.96.7.19.255", is_power_failure=True),
)}
_BY_OBIS = {log.obis: log for log in EVENT_LOGS.values()}


@dataclass(frozen=True)
class EventReadResult:
    """The events read from one meter, and one DeviceError per log it could not read."""

    device_mrid: str
    events: tuple[EndDeviceEvent, ...]
    errors: tuple[DeviceError, ...] = ()


def log_event(device_mrid: str, log_obis: str, at: datetime, value: int) -> EndDeviceEvent:
    """The EndDeviceEvent of one event log row (`value`: the event code, or for the power
    failure log the duration in seconds). Used for rows read and rows pushed alike, so both
    give the same event."""
    log = _BY_OBIS.get(log_obis)
    if log is not None and log.is_power_failure:
        return EndDeviceEvent(
            device_mrid, at, LONG_POWER_FAILURE.event_type, f"{log_obis}:long power failure",
            f"{LONG_POWER_FAILURE.meaning}: {value} s", (("DurationSeconds", value),
                                                         ("EventLog", log_obis)))
    row = IDIS_EVENT_TYPES.get(value)
    name = log.name if log is not None else log_obis
    if row is None:
        return EndDeviceEvent(
            device_mrid, at, UNMAPPED_EVENT_TYPE, f"{log_obis}:{value}",
            f"IDIS event code {value} in the {name} log, not in the head-end's table",
            (("DlmsEventCode", value), ("EventLog", log_obis)))
    return EndDeviceEvent(device_mrid, at, row.event_type, f"{log_obis}:{value}", row.meaning,
                          (("DlmsEventCode", value), ("EventLog", log_obis)))


def read_events(reactor: Any, device: DeviceAddress, start: datetime, end: datetime | None,
                limits: SessionLimits | float, pacer: ConnectionPacer | None = None,
                logs: list[str] | None = None,
                security: HeadEndSecurity | None = None) -> Deferred:
    """Deferred[EventReadResult]: the events of `logs` (names of `EVENT_LOGS`, all when None)
    with start <= time <= end (end defaulting to the meter's clock), oldest first per log;
    `security` serves HLS-GMAC meters (see `in_association`).
    Fails with a DeviceError naming the device when the meter cannot be read at all."""
    if start.tzinfo is None or end is not None and end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    chosen = [EVENT_LOGS[name] for name in (logs or EVENT_LOGS)]  # KeyError names a bad log

    async def converse(conversation: Conversation) -> EventReadResult:
        until = end if end is not None else await conversation.clock()
        events: list[EndDeviceEvent] = []
        errors: list[DeviceError] = []
        for log in chosen:
            answer = await conversation.profile_rows(log.obis, start, until)
            if isinstance(answer, DataAccessError):
                errors.append(ObjectUnavailable(
                    device.mrid, f"event log {log.obis} ({log.name}): {answer.reason}",
                    f"event log {log.name}", answer.result))
                continue
            captures, rows = answer
            column = column_of(captures, log.value_obis, 2)
            if column is None:
                raise ProtocolError(device.mrid, f"{log.obis} does not capture {log.value_obis}")
            for at, row in rows:
                value = row[column]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ProtocolError(device.mrid, f"{log.obis} row value {value!r} is not "
                                        "an integer")
                if start <= at <= until:
                    events.append(log_event(device.mrid, log.obis, at, value))
        return EventReadResult(device.mrid, tuple(events), tuple(errors))

    limits = SessionLimits.of(limits)
    return located(Deferred.fromCoroutine(
        in_association(reactor, device, limits, pacer, converse, security)), device)
