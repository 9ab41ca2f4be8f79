"""Meter controls: what can be asked of a meter (kinds and their parameters), what comes back
(outcomes with read-back), and where each kind lives in an IDIS meter. Sans-IO: no socket here.

`CONTROL_OBJECTS` is the one table of control kind -> COSEM object, the methods invoked or the
attributes written, and the attributes read back; docs/controls.md explains each row and its
source. `checked(command)` validates a command's parameters before anything is stored or sent
(ValueError naming the parameter), `command_to_json`/`command_from_json` are the form a durable
job keeps, and `ControlOutcome` is the one result type every driver's `control` gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timezone
from enum import Enum
from typing import Any

from cimhes.drivers.errors import DeviceError

__all__ = ["ControlKind", "ControlCommand", "ControlStatus", "ControlOutcome", "ControlObject",
           "CONTROL_OBJECTS", "checked", "command_to_json", "command_from_json",
           "DEFAULT_CALENDAR", "CONTROL_STATES", "NO_LIMIT"]


class ControlKind(str, Enum):
    CONNECT = "connect"            # disconnector remote_reconnect (class 70 method 2)
    DISCONNECT = "disconnect"      # remote_disconnect (method 1)
    ARM = "arm"                    # "ready for reconnection": the meter waits for the customer's
                                   # button; done by the disconnector's control mode + state
    LOAD_LIMIT_SET = "load-limit-set"      # limiter (class 71) threshold(s), duration, emergency profile
    LOAD_LIMIT_CLEAR = "load-limit-clear"
    CLOCK_SYNC = "clock-sync"      # clock (class 8) set from the head-end's time; deviation reported
    TOU_ACTIVATE = "tou-activate"  # activity calendar (class 20): passive calendar + activation time


@dataclass(frozen=True)
class ControlCommand:
    kind: ControlKind
    parameters: Mapping[str, Any] = field(default_factory=dict)  # per kind: docs/controls.md


class ControlStatus(str, Enum):
    DONE = "done"          # executed and confirmed by read-back
    REFUSED = "refused"    # the meter refused (action-result / data-access-result), reason kept
    FAILED = "failed"      # could not be carried out (device error: timeout, unreachable, auth, ...)


@dataclass(frozen=True)
class ControlOutcome:
    device_mrid: str
    kind: ControlKind
    status: ControlStatus
    reason: str = ""                       # device-named, no secrets, no raw bytes
    read_back: Mapping[str, Any] = field(default_factory=dict)
    error: DeviceError | None = None       # set when FAILED (drivers/errors.py class)


@dataclass(frozen=True)
class ControlObject:
    """Where one control kind acts in an IDIS meter."""

    class_id: int
    obis: str
    name: str
    acts: str        # the methods invoked / attributes written, in order
    reads_back: str  # the attributes read back to confirm


DISCONNECT_CONTROL = ControlObject(
    70, "0.0.96.3.10.255", "disconnect control", "", "2 output_state, 3 control_state, "
    "4 control_mode")
CONTROL_OBJECTS: dict[ControlKind, ControlObject] = {
    ControlKind.DISCONNECT: ControlObject(
        70, "0.0.96.3.10.255", "disconnect control", "method 1 remote_disconnect",
        DISCONNECT_CONTROL.reads_back),
    ControlKind.CONNECT: ControlObject(
        70, "0.0.96.3.10.255", "disconnect control",
        "method 1 remote_disconnect if ready for reconnection, then method 2 remote_reconnect",
        DISCONNECT_CONTROL.reads_back),
    ControlKind.ARM: ControlObject(
        70, "0.0.96.3.10.255", "disconnect control",
        "method 1 remote_disconnect if connected; attribute 4 control_mode 2->1 / 4->3 if the "
        "mode reconnects directly; method 2 remote_reconnect; control_mode set back",
        DISCONNECT_CONTROL.reads_back),
    ControlKind.LOAD_LIMIT_SET: ControlObject(
        71, "0.0.17.0.0.255", "limiter",
        "attributes 4 threshold_normal, 6 min_over_threshold_duration; with an emergency "
        "threshold 5 threshold_emergency, 8 emergency_profile, 9 emergency_profile_group_id_list",
        "3 threshold_active, 4, 5, 6, 8, 9, 10 emergency_profile_active"),
    ControlKind.LOAD_LIMIT_CLEAR: ControlObject(
        71, "0.0.17.0.0.255", "limiter",
        "attributes 4 and 5 set to 4294967295 (no limit), 9 emptied",
        "3 threshold_active, 4, 5, 9, 10"),
    ControlKind.CLOCK_SYNC: ControlObject(
        8, "0.0.1.0.0.255", "clock", "attribute 2 time", "2 time (before and after)"),
    ControlKind.TOU_ACTIVATE: ControlObject(
        20, "0.0.13.0.0.255", "activity calendar",
        "attributes 9 day_profile_table_passive, 8 week_profile_table_passive, "
        "7 season_profile_passive, 6 calendar_name_passive, then 10 "
        "activate_passive_calendar_time, or method 1 activate_passive_calendar when no time",
        "6 calendar_name_passive, 10 activate_passive_calendar_time, 2 calendar_name_active"),
}

# Disconnect control control_state values (Blue Book) as the read-back names them.
CONTROL_STATES = {0: "disconnected", 1: "connected", 2: "ready-for-reconnection"}
NO_LIMIT = 0xFFFFFFFF  # a limiter threshold never exceeded: how load-limit-clear clears
TARIFF_SCRIPT_TABLE = "0.0.10.0.100.255"

# The calendar tou-activate writes when the command gives no seasons/weeks/days: one season from
# 1 January, one week, one day profile: tariff 1 from 06:00, tariff 2 from 22:00 (UTC).
DEFAULT_CALENDAR: dict[str, Any] = {
    "seasons": [{"name": "S1", "start": "01-01", "week": "W1"}],
    "weeks": [{"name": "W1", "days": [1, 1, 1, 1, 1, 1, 1]}],
    "days": [{"id": 1, "actions": [
        {"start": "06:00", "script": TARIFF_SCRIPT_TABLE, "selector": 1},
        {"start": "22:00", "script": TARIFF_SCRIPT_TABLE, "selector": 2}]}],
}

_PARAMETERS: dict[ControlKind, dict[str, tuple[type, bool]]] = {
    # name: (type, required)
    ControlKind.CONNECT: {},
    ControlKind.DISCONNECT: {},
    ControlKind.ARM: {},
    ControlKind.LOAD_LIMIT_SET: {
        "threshold_w": (int, True), "duration_s": (int, True),
        "emergency_threshold_w": (int, False), "emergency_duration_s": (int, False),
        "emergency_profile_id": (int, False), "emergency_start": (datetime, False)},
    ControlKind.LOAD_LIMIT_CLEAR: {},
    ControlKind.CLOCK_SYNC: {"tolerance_s": (float, False)},
    ControlKind.TOU_ACTIVATE: {
        "calendar_name": (str, True), "activate_at": (datetime, False),
        "seasons": (list, False), "weeks": (list, False), "days": (list, False)},
}
_UINT32 = 0xFFFFFFFF
DEFAULT_CLOCK_TOLERANCE_S = 2.0


def checked(command: ControlCommand) -> ControlCommand:
    """`command` with its parameters validated and normalised (datetimes aware UTC, calendar
    filled in with `DEFAULT_CALENDAR`); ValueError naming the first bad parameter."""
    kind = ControlKind(command.kind)
    allowed = _PARAMETERS[kind]
    parameters = dict(command.parameters)
    unknown = sorted(set(parameters) - set(allowed))
    if unknown:
        raise ValueError(f"{kind.value}: unknown parameter(s) {', '.join(unknown)}; known: "
                         f"{', '.join(allowed) or 'none'}")
    for name, (kind_of, required) in allowed.items():
        if name not in parameters:
            if required:
                raise ValueError(f"{kind.value}: parameter {name} is required")
            continue
        value = parameters[name]
        if kind_of is datetime:
            if isinstance(value, str):
                try:
                    value = datetime.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"{kind.value}: {name} {value!r} is not an ISO 8601 "
                                     "date-time") from None
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise ValueError(f"{kind.value}: {name} must be a date-time with a time zone")
            value = value.astimezone(timezone.utc)
        elif kind_of is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{kind.value}: {name} must be a number >= 0")
            value = float(value)
        elif kind_of is int:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32:
                raise ValueError(f"{kind.value}: {name} must be an integer 0..{_UINT32}")
        elif not isinstance(value, kind_of):
            raise ValueError(f"{kind.value}: {name} must be a {kind_of.__name__}")
        parameters[name] = value
    if kind is ControlKind.LOAD_LIMIT_SET:
        if ("emergency_threshold_w" in parameters) != ("emergency_duration_s" in parameters):
            raise ValueError("load-limit-set: emergency_threshold_w and emergency_duration_s go "
                             "together")
        if "emergency_profile_id" in parameters and parameters["emergency_profile_id"] > 0xFFFF:
            raise ValueError("load-limit-set: emergency_profile_id must be 0..65535")
    if kind is ControlKind.TOU_ACTIVATE:
        name = parameters["calendar_name"]
        if not name or len(name) > 32 or not name.isascii() or not name.isprintable():
            raise ValueError("tou-activate: calendar_name must be 1..32 printable ASCII characters")
        for part in ("seasons", "weeks", "days"):
            parameters[part] = _calendar_part(part, parameters.get(part, DEFAULT_CALENDAR[part]))
    return ControlCommand(kind, parameters)


def _calendar_part(part: str, entries: list) -> list[dict]:
    if not isinstance(entries, list) or not entries or len(entries) > 32:
        raise ValueError(f"tou-activate: {part} must be a list of 1..32 entries")
    out = []
    for index, entry in enumerate(entries):
        where = f"tou-activate: {part}[{index}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object")
        if part == "seasons":
            _keys(where, entry, {"name", "start", "week"})
            _month_day(where, entry["start"])
            out.append({"name": _name(where, entry["name"]), "start": entry["start"],
                        "week": _name(where, entry["week"])})
        elif part == "weeks":
            _keys(where, entry, {"name", "days"})
            days = entry["days"]
            if (not isinstance(days, list) or len(days) != 7
                    or not all(isinstance(d, int) and 0 <= d <= 255 for d in days)):
                raise ValueError(f"{where}: days must be 7 day ids 0..255, Monday first")
            out.append({"name": _name(where, entry["name"]), "days": list(days)})
        else:
            _keys(where, entry, {"id", "actions"})
            if not isinstance(entry["id"], int) or not 0 <= entry["id"] <= 255:
                raise ValueError(f"{where}: id must be 0..255")
            actions = entry["actions"]
            if not isinstance(actions, list) or not 1 <= len(actions) <= 32:
                raise ValueError(f"{where}: actions must be a list of 1..32")
            checked_actions = []
            for action in actions:
                if not isinstance(action, Mapping):
                    raise ValueError(f"{where}: each action must be an object")
                _keys(where, action, {"start", "script", "selector"})
                try:
                    time.fromisoformat(action["start"])
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: start {action['start']!r} is not HH:MM") from None
                _obis(where, action["script"])
                if not isinstance(action["selector"], int) or not 0 <= action["selector"] <= 0xFFFF:
                    raise ValueError(f"{where}: selector must be 0..65535")
                checked_actions.append(dict(action))
            out.append({"id": entry["id"], "actions": checked_actions})
    return out


def _keys(where: str, entry: Mapping, keys: set[str]) -> None:
    if set(entry) != keys:
        raise ValueError(f"{where} needs exactly the keys {', '.join(sorted(keys))}")


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 32 or not value.isascii():
        raise ValueError(f"{where}: names are 1..32 ASCII characters")
    return value


def _month_day(where: str, value: Any) -> None:
    try:
        month, day = (int(part) for part in str(value).split("-"))
        datetime(2024, month, day)
    except ValueError:
        raise ValueError(f"{where}: start {value!r} is not MM-DD") from None


def _obis(where: str, value: Any) -> None:
    parts = str(value).split(".")
    if len(parts) != 6 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise ValueError(f"{where}: script {value!r} is not an OBIS code a.b.c.d.e.f")


def command_to_json(command: ControlCommand) -> dict:
    """The command as JSON (datetimes as ISO 8601 text), as a durable job keeps it."""
    return {"kind": command.kind.value, "parameters": {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in command.parameters.items()}}


def command_from_json(value: dict) -> ControlCommand:
    return checked(ControlCommand(ControlKind(value["kind"]), value.get("parameters", {})))
