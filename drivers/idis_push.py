"""What an IDIS meter's pushes say: the push setups the head-end configures, and their content as CIM.

`PUSH_SETUPS` is the table of the push setups (class 40, 0.x.25.9.0.255) whose DataNotifications
the head-end understands, each with its push_object_list in order. Every body is a structure
whose first element is the push setup's logical name (attribute 1) and whose second is the
meter's logical device name (0.0.42.0.0.255, attribute 2), which names the sender:

    alarm push    0.4.25.9.0.255   [setup, logical device name, alarm register 1
                                    (0.0.97.98.0.255, double-long-unsigned)]
    periodic push 0.1.25.9.0.255   [setup, logical device name, clock (0.0.1.0.0.255 attr 2),
                                    +A 1.0.1.8.0.255 value, its scaler_unit, -A 1.0.2.8.0.255
                                    value, its scaler_unit, load profile 1 (1.0.99.1.0.255)
                                    rows (clock, +A, -A) of the last hour]

`interpret(notification, device_mrid)` gives a `PushContent`: the EndDeviceEvents of an alarm
(one per set bit, typed by `IDIS_ALARM_BITS`; an unknown bit typed unmapped, kept) and the CIM
MeterReading of a periodic push (registers stamped with the pushed clock; the profile rows as
the catalogue's 15-minute cumulative interval types).
"""

from __future__ import annotations

from dataclasses import dataclass

from cimhes.cim.end_device_event_types import IDIS_ALARM_BITS, UNMAPPED_EVENT_TYPE
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.cim.meter_readings import DeviceRef, IntervalBlock, IntervalReading, MeterReading, Reading
from cimhes.drivers.dlms_session import cosem_datetime
from cimhes.drivers.idis import cim_value
from cimhes.drivers.push import DataNotification, PushError

ALARM_SETUP = "0.4.25.9.0.255"
PERIODIC_SETUP = "0.1.25.9.0.255"
ALARM_REGISTER_1 = "0.0.97.98.0.255"
PUSH_SETUPS = {
    ALARM_SETUP: ("alarm push", 3),
    PERIODIC_SETUP: ("periodic push", 8),
}
# Reading types a periodic push fills (drivers/idis_catalogue.py rows).
PLUS_A, MINUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_15, MINUS_A_15 = ("0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0",
                         "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0")
WH = 30


@dataclass(frozen=True)
class PushContent:
    setup: str
    events: tuple[EndDeviceEvent, ...] = ()
    meter_reading: MeterReading | None = None


def _obis(octets: bytes) -> str:
    return ".".join(str(b) for b in octets)


def sender(notification: DataNotification) -> tuple[str, str]:
    """(push setup OBIS, logical device name) of a push; PushError("malformed") otherwise."""
    body = notification.body
    if (not isinstance(body, list) or len(body) < 2 or not isinstance(body[0], bytes)
            or len(body[0]) != 6 or not isinstance(body[1], bytes)):
        raise PushError("malformed", "notification-body is not [push setup, logical device "
                        "name, ...]")
    setup = _obis(body[0])
    if setup not in PUSH_SETUPS:
        raise PushError("malformed", f"push setup {setup} is not one the head-end configures")
    name, width = PUSH_SETUPS[setup]
    if len(body) != width:
        raise PushError("malformed", f"{name} has {len(body)} elements, expected {width}")
    try:
        return setup, body[1].decode("ascii")
    except UnicodeDecodeError:
        raise PushError("malformed", "logical device name is not ASCII") from None


def interpret(notification: DataNotification, device_mrid: str, serial: str) -> PushContent:
    setup, _name = sender(notification)
    body = notification.body
    if setup == ALARM_SETUP:
        return PushContent(setup, _alarm_events(device_mrid, notification, body[2]))
    return PushContent(setup, meter_reading=_periodic(device_mrid, serial, body))


def _alarm_events(mrid: str, notification: DataNotification, bits) -> tuple[EndDeviceEvent, ...]:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise PushError("malformed", f"alarm register value {bits!r} is not an integer")
    if notification.at is None:
        raise PushError("malformed", "alarm push without a date-time")
    events = []
    for bit in range(32):
        if not bits >> bit & 1:
            continue
        row = IDIS_ALARM_BITS.get(bit)
        details = (("AlarmRegisterBit", bit), ("AlarmRegister", ALARM_REGISTER_1))
        if row is None:
            events.append(EndDeviceEvent(mrid, notification.at, UNMAPPED_EVENT_TYPE,
                                         f"{ALARM_REGISTER_1}:{bit}",
                                         f"alarm register 1 bit {bit}, not in the head-end's table",
                                         details))
        else:
            events.append(EndDeviceEvent(mrid, notification.at, row.event_type,
                                         f"{ALARM_REGISTER_1}:{bit}", row.meaning, details))
    return tuple(events)


def _periodic(mrid: str, serial: str, body: list) -> MeterReading:
    _setup, _name, clock, plus, plus_su, minus, minus_su, rows = body
    try:
        at = cosem_datetime(clock)
        scalers = []
        for value, scaler_unit in ((plus, plus_su), (minus, minus_su)):
            if (not isinstance(value, int) or not isinstance(scaler_unit, list)
                    or len(scaler_unit) != 2 or scaler_unit[1] != WH):
                raise ValueError("register value or scaler_unit (Wh expected) malformed")
            scalers.append(scaler_unit[0])
        readings = [Reading(PLUS_A, cim_value(plus, scalers[0], 3), at),
                    Reading(MINUS_A, cim_value(minus, scalers[1], 3), at)]
        plus_rows, minus_rows = [], []
        for row in rows:
            stamp, row_plus, row_minus = row
            row_at = cosem_datetime(stamp)
            plus_rows.append(IntervalReading(row_at, cim_value(row_plus, scalers[0], 3)))
            minus_rows.append(IntervalReading(row_at, cim_value(row_minus, scalers[1], 3)))
    except (TypeError, ValueError) as failure:
        raise PushError("malformed", f"periodic push: {failure}") from None
    window = (plus_rows[0].timestamp, plus_rows[-1].timestamp) if plus_rows else None
    return MeterReading(DeviceRef(mrid), readings,
                        [IntervalBlock(PLUS_A_15, plus_rows), IntervalBlock(MINUS_A_15, minus_rows)],
                        window)
