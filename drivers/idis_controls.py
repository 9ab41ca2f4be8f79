"""The controls of an IDIS meter, each done inside one association: the SET/ACTION steps of
`drivers.controls.CONTROL_OBJECTS`, then the read-back GETs that confirm them.

`control_in_association(conversation, command, now, resumed)` gives the `ControlOutcome`:
DONE when the read-back shows the state the control should bring, REFUSED when the meter
refused a step (its action-result or data-access-result is the reason; the state read back is
still reported), FAILED with `ControlNotConfirmed` when the meter accepted every step but the
read-back disagrees. A device failure (timeout, connection, protocol) is raised as a DeviceError
and becomes FAILED in `IdisMeterDriver.control`.

`resumed` is set when an earlier attempt of the same control may have reached the meter (an
engine restart or a retry after a failure whose outcome is unknown): the state is then read
first, and a meter already in the state the control brings gets nothing sent (outcome DONE,
`read_back["already"] = True`). A fresh control is always sent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from cimhes.drivers import axdr
from cimhes.drivers.controls import (
    CONTROL_OBJECTS,
    CONTROL_STATES,
    DEFAULT_CLOCK_TOLERANCE_S,
    NO_LIMIT,
    ControlCommand,
    ControlKind,
    ControlOutcome,
    ControlStatus,
)
from cimhes.drivers.dlms_session import DataAccessError, LocalProtocolError, cosem_datetime
from cimhes.drivers.errors import ControlNotConfirmed, ProtocolError
from cimhes.drivers.idis_association import Conversation, datetime_or_error

DISCONNECT_CONTROL = CONTROL_OBJECTS[ControlKind.DISCONNECT]
LIMITER = CONTROL_OBJECTS[ControlKind.LOAD_LIMIT_SET]
CLOCK = CONTROL_OBJECTS[ControlKind.CLOCK_SYNC]
CALENDAR = CONTROL_OBJECTS[ControlKind.TOU_ACTIVATE]
REMOTE_DISCONNECT, REMOTE_RECONNECT, ACTIVATE_PASSIVE_CALENDAR = 1, 2, 1
# Control modes whose remote_reconnect connects directly -> the mode with the same
# disconnection rights whose remote_reconnect goes to ready_for_reconnection (Blue Book).
ARMING_TWIN = {2: 1, 4: 3}
_DATE_TIME = struct.Struct(">HBBBBBBBhB")
Now = Callable[[], datetime]


class _Refused(Exception):
    """A step the meter refused; the reason names the step and the meter's result."""


async def control_in_association(conversation: Conversation, command: ControlCommand, now: Now,
                                 resumed: bool) -> ControlOutcome:
    kind = command.kind
    steps = _KINDS[kind]
    mrid = conversation.device_mrid
    try:
        status, reason, read_back = await steps(conversation, command.parameters, now, resumed)
    except LocalProtocolError as problem:  # a request this client cannot send to this meter
        error = ProtocolError(mrid, f"{kind.value}: {problem}")
        return ControlOutcome(mrid, kind, ControlStatus.FAILED, str(problem), {}, error)
    if status is ControlStatus.FAILED:
        error = ControlNotConfirmed(mrid, reason)
        return ControlOutcome(mrid, kind, status, reason, read_back, error)
    return ControlOutcome(mrid, kind, status, reason, read_back)


# --- the steps ----------------------------------------------------------------------------

async def _expect(answer: Any, what: str) -> None:  # noqa: RUF029 (awaited like the others)
    if not answer.ok:
        raise _Refused(f"the meter refused {what}: {answer.reason}")


async def _read(conversation: Conversation, class_id: int, obis: str, attribute: int,
                what: str) -> Any:
    answer = await conversation.get(class_id, obis, attribute)
    if isinstance(answer, DataAccessError):
        raise _Refused(f"the meter refused to read {what}: {answer.reason}")
    return answer.value


async def _disconnector(conversation: Conversation) -> dict:
    obj = DISCONNECT_CONTROL
    output = await _read(conversation, obj.class_id, obj.obis, 2, "the disconnector's output_state")
    state = await _read(conversation, obj.class_id, obj.obis, 3, "the disconnector's control_state")
    mode = await _read(conversation, obj.class_id, obj.obis, 4, "the disconnector's control_mode")
    if not isinstance(output, bool) or state not in CONTROL_STATES or not isinstance(mode, int):
        raise ProtocolError(conversation.device_mrid, f"disconnect control answered output_state "
                            f"{output!r}, control_state {state!r}, control_mode {mode!r}")
    return {"output_state": output, "control_state": CONTROL_STATES[state], "control_mode": mode}


async def _method(conversation: Conversation, method: int, what: str) -> None:
    obj = DISCONNECT_CONTROL
    await _expect(await conversation.action(obj.class_id, obj.obis, method, axdr.integer(0)), what)


async def _switch(conversation: Conversation, parameters, now: Now, resumed: bool,
                  kind: ControlKind):
    """disconnect, connect, arm: see CONTROL_OBJECTS and docs/controls.md."""
    target = {ControlKind.DISCONNECT: "disconnected", ControlKind.CONNECT: "connected",
              ControlKind.ARM: "ready-for-reconnection"}[kind]
    try:
        before = await _disconnector(conversation)
        if resumed and before["control_state"] == target:
            return ControlStatus.DONE, f"already {target}", {**before, "already": True}
        mode = before["control_mode"]
        if kind is ControlKind.DISCONNECT:
            await _method(conversation, REMOTE_DISCONNECT, "remote_disconnect")
        elif kind is ControlKind.CONNECT:
            if before["control_state"] == "ready-for-reconnection":
                # No remote transition leads from ready_for_reconnection to connected.
                await _method(conversation, REMOTE_DISCONNECT, "remote_disconnect")
            await _method(conversation, REMOTE_RECONNECT, "remote_reconnect")
        else:
            if before["control_state"] == "connected":
                await _method(conversation, REMOTE_DISCONNECT, "remote_disconnect")
            twin = ARMING_TWIN.get(mode)
            if twin is not None:
                await _set_mode(conversation, twin)
            try:
                await _method(conversation, REMOTE_RECONNECT, "remote_reconnect")
            finally:
                if twin is not None:
                    await _set_mode(conversation, mode)
    except _Refused as refusal:
        return ControlStatus.REFUSED, str(refusal), await _disconnector_or_nothing(conversation)
    after = await _disconnector(conversation)
    if after["control_state"] == target:
        return ControlStatus.DONE, "", after
    if kind is ControlKind.CONNECT and after["control_state"] == "ready-for-reconnection":
        return (ControlStatus.REFUSED, f"control mode {after['control_mode']} reconnects "
                "remotely only to ready-for-reconnection: the customer's button connects", after)
    return (ControlStatus.FAILED, f"{kind.value} accepted, but the disconnector reads back "
            f"{after['control_state']}", after)


async def _set_mode(conversation: Conversation, mode: int) -> None:
    obj = DISCONNECT_CONTROL
    await _expect(await conversation.set(obj.class_id, obj.obis, 4, axdr.enum(mode)),
                  f"SET control_mode {mode}")


async def _disconnector_or_nothing(conversation: Conversation) -> dict:
    try:
        return await _disconnector(conversation)
    except _Refused:
        return {}


async def _load_limit(conversation: Conversation, parameters, now: Now, resumed: bool,
                      clear: bool):
    obj = LIMITER
    if clear:
        wanted = {"threshold_w": NO_LIMIT, "emergency_threshold_w": NO_LIMIT,
                  "emergency_group_ids": []}
    else:
        wanted = {"threshold_w": parameters["threshold_w"], "duration_s": parameters["duration_s"]}
        if "emergency_threshold_w" in parameters:
            profile_id = parameters.get("emergency_profile_id", 1)
            start = parameters.get("emergency_start") or now()
            start = start.replace(microsecond=start.microsecond // 10_000 * 10_000)
            wanted.update(emergency_threshold_w=parameters["emergency_threshold_w"],
                          emergency_profile={"id": profile_id, "start": _iso(start),
                                             "duration_s": parameters["emergency_duration_s"]},
                          emergency_group_ids=[profile_id])
    try:
        if resumed:
            before = await _limiter(conversation)
            if all(before.get(key) == value for key, value in wanted.items()):
                return ControlStatus.DONE, "limiter already set so", {**before, "already": True}
        u32 = axdr.double_long_unsigned
        writes = [(4, u32(wanted["threshold_w"]), "threshold_normal")]
        if "duration_s" in wanted:
            writes.append((6, u32(wanted["duration_s"]), "min_over_threshold_duration"))
        if "emergency_threshold_w" in wanted:
            writes.append((5, u32(wanted["emergency_threshold_w"]), "threshold_emergency"))
        if "emergency_profile" in wanted:
            profile = wanted["emergency_profile"]
            writes.append((8, axdr.structure([
                axdr.long_unsigned(profile["id"]),
                axdr.octet_string(_date_time_octets(datetime.fromisoformat(profile["start"]))),
                u32(profile["duration_s"])]), "emergency_profile"))
        if "emergency_group_ids" in wanted:
            writes.append((9, axdr.array([axdr.long_unsigned(i)
                                          for i in wanted["emergency_group_ids"]]),
                           "emergency_profile_group_id_list"))
        for attribute, value, name in writes:
            await _expect(await conversation.set(obj.class_id, obj.obis, attribute, value),
                          f"SET limiter {name}")
    except _Refused as refusal:
        return ControlStatus.REFUSED, str(refusal), await _limiter_or_nothing(conversation)
    after = await _limiter(conversation)
    wrong = [key for key, value in wanted.items() if after.get(key) != value]
    if wrong:
        return (ControlStatus.FAILED, f"limiter reads back other values for "
                f"{', '.join(wrong)}", after)
    return ControlStatus.DONE, "", after


async def _limiter(conversation: Conversation) -> dict:
    obj = LIMITER

    async def read(attribute: int, name: str) -> Any:
        return await _read(conversation, obj.class_id, obj.obis, attribute, f"limiter {name}")
    active = await read(3, "threshold_active")
    normal = await read(4, "threshold_normal")
    emergency = await read(5, "threshold_emergency")
    duration = await read(6, "min_over_threshold_duration")
    profile = await read(8, "emergency_profile")
    groups = await read(9, "emergency_profile_group_id_list")
    emergency_active = await read(10, "emergency_profile_active")
    try:
        profile_id, start, profile_duration = profile
        shown = {"id": profile_id, "start": _instant_or_none(start), "duration_s": profile_duration}
        read_back = {"threshold_active_w": int(active), "threshold_w": int(normal),
                     "emergency_threshold_w": int(emergency), "duration_s": int(duration),
                     "emergency_profile": shown, "emergency_group_ids": list(groups),
                     "emergency_active": bool(emergency_active)}
    except (TypeError, ValueError) as problem:
        raise ProtocolError(conversation.device_mrid, f"limiter attributes do not have their "
                            f"standard types ({problem})") from None
    return read_back


async def _limiter_or_nothing(conversation: Conversation) -> dict:
    try:
        return await _limiter(conversation)
    except _Refused:
        return {}


async def _clock_sync(conversation: Conversation, parameters, now: Now, resumed: bool):
    tolerance = parameters.get("tolerance_s", DEFAULT_CLOCK_TOLERANCE_S)
    try:
        before = await _deviation(conversation, now)
        if resumed and abs(before) <= tolerance:
            return (ControlStatus.DONE, "clock already within tolerance",
                    {"deviation_s": round(before, 2), "already": True})
        await _expect(await conversation.set(CLOCK.class_id, CLOCK.obis, 2,
                                             axdr.octet_string(_date_time_octets(now()))),
                      "SET clock time")
    except _Refused as refusal:
        return ControlStatus.REFUSED, str(refusal), {}
    after = await _deviation(conversation, now)
    read_back = {"deviation_s": round(before, 2), "deviation_after_s": round(after, 2)}
    if abs(after) > tolerance:
        return (ControlStatus.FAILED, f"clock set, but it reads back {after:+.2f} s from the "
                f"head-end's time (tolerance {tolerance:g} s)", read_back)
    return ControlStatus.DONE, "", read_back


async def _deviation(conversation: Conversation, now: Now) -> float:
    """Meter clock minus head-end time, in seconds, taken at the middle of the GET."""
    sent = now()
    meter = await _read(conversation, CLOCK.class_id, CLOCK.obis, 2, "the clock")
    received = now()
    meter_time = datetime_or_error(conversation.device_mrid, meter, "clock time")
    return (meter_time - (sent + (received - sent) / 2)).total_seconds()


async def _tou(conversation: Conversation, parameters, now: Now, resumed: bool):
    obj = CALENDAR
    name = parameters["calendar_name"]
    activate_at = parameters.get("activate_at")
    if activate_at is not None:  # a COSEM date-time holds hundredths
        activate_at = activate_at.replace(microsecond=activate_at.microsecond // 10_000 * 10_000)
    wanted_time = _iso(activate_at) if activate_at is not None else None
    try:
        if resumed:
            before = await _calendar(conversation)
            if _calendar_done(before, name, wanted_time):
                return ControlStatus.DONE, "calendar already so", {**before, "already": True}
        writes = [
            (9, _days(parameters["days"]), "day_profile_table_passive"),
            (8, _weeks(parameters["weeks"]), "week_profile_table_passive"),
            (7, _seasons(parameters["seasons"]), "season_profile_passive"),
            (6, axdr.octet_string(name.encode("ascii")), "calendar_name_passive"),
        ]
        if activate_at is not None:
            writes.append((10, axdr.octet_string(_date_time_octets(activate_at)),
                           "activate_passive_calendar_time"))
        for attribute, value, what in writes:
            await _expect(await conversation.set(obj.class_id, obj.obis, attribute, value),
                          f"SET activity calendar {what}")
        if activate_at is None:
            await _expect(await conversation.action(obj.class_id, obj.obis,
                                                    ACTIVATE_PASSIVE_CALENDAR, axdr.integer(0)),
                          "activate_passive_calendar")
    except _Refused as refusal:
        return ControlStatus.REFUSED, str(refusal), await _calendar_or_nothing(conversation)
    after = await _calendar(conversation)
    if _calendar_done(after, name, wanted_time):
        return ControlStatus.DONE, "", after
    return (ControlStatus.FAILED, f"calendar reads back passive {after['calendar_name_passive']!r} "
            f"activating at {after['activate_at']}, active {after['calendar_name_active']!r}", after)


def _calendar_done(state: dict, name: str, wanted_time: str | None) -> bool:
    if state["calendar_name_active"] == name:
        return True  # activated (now, or its time has come)
    return (wanted_time is not None and state["calendar_name_passive"] == name
            and state["activate_at"] == wanted_time)


async def _calendar(conversation: Conversation) -> dict:
    obj = CALENDAR
    passive = await _read(conversation, obj.class_id, obj.obis, 6, "calendar_name_passive")
    at = await _read(conversation, obj.class_id, obj.obis, 10, "activate_passive_calendar_time")
    active = await _read(conversation, obj.class_id, obj.obis, 2, "calendar_name_active")
    if not all(isinstance(v, bytes) for v in (passive, at, active)):
        raise ProtocolError(conversation.device_mrid, "activity calendar names or activation "
                            "time are not octet-strings")
    return {"calendar_name_passive": passive.decode("ascii", "replace"),
            "activate_at": _instant_or_none(at),
            "calendar_name_active": active.decode("ascii", "replace")}


async def _calendar_or_nothing(conversation: Conversation) -> dict:
    try:
        return await _calendar(conversation)
    except _Refused:
        return {}


# --- encodings --------------------------------------------------------------------------------

def _date_time_octets(moment: datetime) -> bytes:
    """12 date-time octets of `moment` in UTC, to the hundredth, deviation 0, status 0."""
    utc = moment.astimezone(timezone.utc)
    return _DATE_TIME.pack(utc.year, utc.month, utc.day, utc.isoweekday(), utc.hour, utc.minute,
                           utc.second, utc.microsecond // 10_000, 0, 0)


def _instant_or_none(octets: Any) -> str | None:
    try:
        return _iso(cosem_datetime(octets))
    except (TypeError, ValueError):
        return None  # not specified


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def _seasons(seasons: list[dict]) -> bytes:
    items = []
    for season in seasons:
        month, day = (int(part) for part in season["start"].split("-"))
        start = _DATE_TIME.pack(0xFFFF, month, day, 0xFF, 0, 0, 0, 0, -0x8000, 0xFF)
        items.append(axdr.structure([axdr.octet_string(season["name"].encode("ascii")),
                                     axdr.octet_string(start),
                                     axdr.octet_string(season["week"].encode("ascii"))]))
    return axdr.array(items)


def _weeks(weeks: list[dict]) -> bytes:
    return axdr.array([axdr.structure([axdr.octet_string(week["name"].encode("ascii")),
                                       *(axdr.unsigned(day) for day in week["days"])])
                       for week in weeks])


def _days(days: list[dict]) -> bytes:
    def action(entry: dict) -> bytes:
        hour, minute = (int(part) for part in entry["start"].split(":")[:2])
        script = bytes(int(part) for part in entry["script"].split("."))
        return axdr.structure([axdr.octet_string(bytes((hour, minute, 0, 0))),
                               axdr.octet_string(script), axdr.long_unsigned(entry["selector"])])
    return axdr.array([axdr.structure([axdr.unsigned(day["id"]),
                                       axdr.array([action(a) for a in day["actions"]])])
                       for day in days])


def _switching(kind: ControlKind):
    async def steps(conversation, parameters, now, resumed):
        return await _switch(conversation, parameters, now, resumed, kind)
    return steps


async def _load_limit_set(conversation, parameters, now, resumed):
    return await _load_limit(conversation, parameters, now, resumed, clear=False)


async def _load_limit_clear(conversation, parameters, now, resumed):
    return await _load_limit(conversation, parameters, now, resumed, clear=True)


_KINDS = {
    ControlKind.DISCONNECT: _switching(ControlKind.DISCONNECT),
    ControlKind.CONNECT: _switching(ControlKind.CONNECT),
    ControlKind.ARM: _switching(ControlKind.ARM),
    ControlKind.LOAD_LIMIT_SET: _load_limit_set,
    ControlKind.LOAD_LIMIT_CLEAR: _load_limit_clear,
    ControlKind.CLOCK_SYNC: _clock_sync,
    ControlKind.TOU_ACTIVATE: _tou,
}
