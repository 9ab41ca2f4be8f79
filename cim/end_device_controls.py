"""CIM EndDeviceControls as plain Python: the control types cimhes executes, and the requests.

`END_DEVICE_CONTROL_TYPES` is the one table of EndDeviceControlType codes (``type.domain.subDomain.
eventOrAction``, IEC 61968-9 Annex E enumerations) cimhes carries out, each row with the action it
stands for and where its code comes from. The actions' values are the ones of
`cimhes.drivers.controls.ControlKind`: `cim/` is the floor of the layers and imports nothing above
it, so the SOAP door turns an action into the driver's kind by value (a test checks that both sides
have the same members).

Sources, as each row names them:
- "REFERENCE-FACTS": ../shared/design/REFERENCE-FACTS.md, "control types used by the standard's
  examples and a public implementation";
- "Connexo <NAME>": the code a public head-end assigns, in chandangeek/Connexo_Code
  comu/com.energyict.mdc.device.data/src/main/java/com/energyict/mdc/device/data/impl/ami/
  EndDeviceControlTypeMapping.java (row NAME). That source writes EndDeviceType 0 (not
  applicable); here the type is 3 (electric meter), as in cim/end_device_event_types.py;
- "composed": no public control code was found; the row combines the standard's enumeration
  values (EndDeviceDomain, EndDeviceSubDomain, EndDeviceEventOrAction, as listed in Connexo's
  com.elster.jupiter.cbo enums) named in the row. Check against 61968-9 Annex E before relying on it.

A request may give the type with EndDeviceType 0 ("not applicable": any device type); it is read
as the same control for the electric meter (3), and replies name the table's code.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

from cimhes.cim.message import Header, Reply
from cimhes.cim.meter_readings import DeviceRef

__all__ = [
    "ControlAction",
    "ControlTypeRow",
    "END_DEVICE_CONTROL_TYPES",
    "UnknownControlType",
    "action_for",
    "code_for",
    "ControlParameters",
    "EndDeviceControl",
    "EndDeviceControlsRequest",
    "EndDeviceControlsResponse",
]


class ControlAction(str, enum.Enum):
    """What a control does to a meter (values: `cimhes.drivers.controls.ControlKind`)."""

    CONNECT = "connect"
    DISCONNECT = "disconnect"
    ARM = "arm"
    LOAD_LIMIT_SET = "load-limit-set"
    LOAD_LIMIT_CLEAR = "load-limit-clear"
    CLOCK_SYNC = "clock-sync"
    TOU_ACTIVATE = "tou-activate"


@dataclass(frozen=True)
class ControlTypeRow:
    code: str
    action: ControlAction
    meaning: str
    source: str


_CODE = re.compile(r"(\d+)\.(\d+)\.(\d+)\.(\d+)")
ELECTRIC_METER = "3"  # EndDeviceType 3, electric meter
NOT_APPLICABLE = "0"  # EndDeviceType 0: any device type

_C = "Connexo "
END_DEVICE_CONTROL_TYPES: tuple[ControlTypeRow, ...] = (
    ControlTypeRow("3.31.0.18", ControlAction.CONNECT, "RCDSwitch Connect: close the supply switch",
                   "REFERENCE-FACTS connect 3.31.0.18; " + _C + "CLOSE_REMOTE_SWITCH 0.31.0.18"),
    ControlTypeRow("3.31.0.23", ControlAction.DISCONNECT,
                   "RCDSwitch Disconnect: open the supply switch",
                   "REFERENCE-FACTS disconnect 3.31.0.23; " + _C + "OPEN_REMOTE_SWITCH 0.31.0.23"),
    ControlTypeRow("3.31.0.5", ControlAction.ARM,
                   "RCDSwitch ArmForClosure: ready for reconnection by the customer's button",
                   _C + "ARM_REMOTE_SWITCH_FOR_CLOSURE 0.31.0.5 (eventOrAction 5 ArmForClosure)"),
    ControlTypeRow("3.15.0.54", ControlAction.LOAD_LIMIT_SET,
                   "LoadControl Start: set the limiter's threshold (and duration)",
                   _C + "LOAD_CONTROL_INITIATE 0.15.0.54 (set load limit threshold and duration)"),
    ControlTypeRow("3.15.0.55", ControlAction.LOAD_LIMIT_CLEAR,
                   "LoadControl Stop: clear the limiter's threshold (no limit)",
                   _C + "LOAD_CONTROL_TERMINATE 0.15.0.55 (disable load limiting)"),
    ControlTypeRow("3.36.116.13", ControlAction.CLOCK_SYNC,
                   "Clock TimeSync Change: set the meter's clock from the head-end's",
                   "composed: domain 36 Clock, subdomain 116 TimeSync, eventOrAction 13 Change "
                   "(the command whose completion the meter reports as 3.36.116.24 TimeSync "
                   "Changed, cim/end_device_event_types.py row 5)"),
    ControlTypeRow("3.20.121.13", ControlAction.TOU_ACTIVATE,
                   "Billing TOU Change: write the passive calendar with its activation time",
                   "composed: domain 20 Billing, subdomain 121 TOU, eventOrAction 13 Change (as "
                   + _C + "CHANGE_STEP_TARIFF 0.20.140.13 changes a billing item; the meter "
                   "reports 3.20.121.24 passive TOU programmed, 3.20.121.4 TOU activated)"),
)

_BY_CODE = {row.code: row for row in END_DEVICE_CONTROL_TYPES}
_BY_ACTION = {row.action: row for row in END_DEVICE_CONTROL_TYPES}


class UnknownControlType(ValueError):
    """An EndDeviceControlType code that is not one of `END_DEVICE_CONTROL_TYPES`."""

    def __init__(self, code: str):
        known = ", ".join(f"{r.code} ({r.action.value})" for r in END_DEVICE_CONTROL_TYPES)
        super().__init__(f"EndDeviceControlType {code!r} is not one this head-end executes; "
                         f"it executes {known}")
        self.code = code


def action_for(code: str) -> ControlAction:
    """The action of an EndDeviceControlType code (EndDeviceType 0 read as 3)."""
    text = (code or "").strip()
    match = _CODE.fullmatch(text)
    if match is None:
        raise UnknownControlType(text)
    device_type, rest = match.group(1), text.partition(".")[2]
    if device_type == NOT_APPLICABLE:
        text = f"{ELECTRIC_METER}.{rest}"
    row = _BY_CODE.get(text)
    if row is None:
        raise UnknownControlType(code.strip())
    return row.action


def code_for(action: ControlAction) -> str:
    """The EndDeviceControlType code cimhes writes for ``action``."""
    return _BY_ACTION[ControlAction(action)].code


@dataclass(frozen=True)
class ControlParameters:
    """What a control needs besides its type, read from the standard's EndDeviceControl fields
    (docs/controls-cim.md):

    ``start``: primaryDeviceTiming/interval/start, when the control is to be carried out (a time
    in the future schedules it; for a TOU activation it is the calendar's activation time);
    ``threshold_w``: priceSignal, the load limit in W (load-limit-set), the standard's one
    numeric "parameter for this end device control";
    ``duration_s``: primaryDeviceTiming/duration (minutes in the message), how long the load may
    stay above the threshold before the limiter acts (load-limit-set, required);
    ``calendar_name``: issuerTrackingID, the identifier of "the subject of the control action",
    here the TOU calendar (tou-activate).
    """

    start: datetime | None = None
    threshold_w: int | None = None
    duration_s: int | None = None
    calendar_name: str | None = None


@dataclass(frozen=True)
class EndDeviceControl:
    """One EndDeviceControl of a request: its type code and action, the devices and groups it is
    for, its parameters; ``mrid`` names a control already made (CancelEndDeviceControls)."""

    control_type: str
    action: ControlAction
    end_devices: tuple[DeviceRef, ...] = ()
    end_device_groups: tuple[DeviceRef, ...] = ()
    parameters: ControlParameters = field(default_factory=ControlParameters)
    mrid: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", ControlAction(self.action))
        object.__setattr__(self, "end_devices", tuple(self.end_devices))
        object.__setattr__(self, "end_device_groups", tuple(self.end_device_groups))


@dataclass(frozen=True)
class EndDeviceControlsRequest:
    """A Create (verb create) or Cancel (verb cancel) EndDeviceControls request."""

    header: Header
    controls: tuple[EndDeviceControl, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "controls", tuple(self.controls))


@dataclass(frozen=True)
class EndDeviceControlsResponse:
    """An EndDeviceControlsResponseMessage: Header, Reply and, when the head-end made or
    cancelled controls, the controls it made (each with the mRID later requests name it by)."""

    header: Header
    reply: Reply
    controls: tuple[EndDeviceControl, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "controls", tuple(self.controls))
