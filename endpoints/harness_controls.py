"""The harness's EndDeviceControls scenarios (ExecuteEndDeviceControls at BASE_URL/cim/...).

All but one leave the meters as they were: a disconnect scheduled a day ahead and cancelled, and
requests the head-end must refuse before it touches a device (an unknown meter, an unknown control
type, a wrong verb, a cancel of a control that does not exist). ``switch`` really disconnects and
reconnects a meter, so it runs only on the meter given with ``--control-meter`` (else it fails,
saying so). Every request sent and every reply received is validated against the project's
EndDeviceControlsMessage schema.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from lxml import etree

from cimhes.cim.codec import parse_xml
from cimhes.cim.codec import end_device_controls as codec
from cimhes.cim.end_device_controls import (
    ControlAction,
    ControlParameters,
    EndDeviceControl,
    EndDeviceControlsRequest,
    code_for,
)
from cimhes.cim.message import Header, Verb
from cimhes.cim.meter_readings import DeviceRef
from cimhes.endpoints.harness import (
    NounMessages,
    ScenarioFailed,
    Target,
    _envelope,
    _expect_fault_or_failed,
    _expect_response,
    _needs_meter,
    _post,
    _validate,
)

SCHEMA = codec.MESSAGE_SCHEMA
WRAPPER = codec.NS_END_DEVICE_CONTROLS_MESSAGE
ACTION = "http://iec.ch/TC57/2011/EndDeviceControls/{}"
CONTROLS = NounMessages(WRAPPER, "EndDeviceControls", SCHEMA)


def _service(target: Target) -> str:
    return f"{target.base_url}/cim/ExecuteEndDeviceControls"


def _request(operation, *controls, verb: Verb | None = None) -> etree._Element:
    element = codec.encode_request(operation, EndDeviceControlsRequest(
        header=Header(verb=verb or operation.verb, noun=codec.NOUN,
                      message_id=f"harness-{uuid.uuid4()}", source="cimhes-harness"),
        controls=controls))
    _validate(element, SCHEMA, "the request the harness sends")
    return element


def _send(target: Target, operation, element) -> tuple[int, etree._Element]:
    return _post(target, _envelope(element), action=ACTION.format(operation.name),
                 service=_service(target))


def _response(status: int, element) -> tuple[str, list, etree._Element]:
    result, errors = _expect_response(status, element, CONTROLS)
    return result, errors, element


def _failed(status: int, element, codes: set[str]) -> str:
    return _expect_fault_or_failed(status, element, codes, CONTROLS)


def _disconnect(meters, start=None) -> EndDeviceControl:
    return EndDeviceControl(code_for(ControlAction.DISCONNECT), ControlAction.DISCONNECT,
                            end_devices=tuple(DeviceRef(mrid=m) for m in meters),
                            parameters=ControlParameters(start=start))


def scenario_controls_wsdl(target: Target) -> str:
    response = target.session.get(f"{_service(target)}?wsdl", timeout=target.timeout)
    if response.status_code != 200:
        raise ScenarioFailed(f"GET ?wsdl answered HTTP {response.status_code}")
    wsdl = parse_xml(response.content)
    actions = {op.get("soapAction") for op in
               wsdl.iter("{http://schemas.xmlsoap.org/wsdl/soap/}operation")}
    wanted = {ACTION.format(op.name) for op in (codec.CREATE, codec.CANCEL)}
    if not wanted <= actions:
        raise ScenarioFailed(f"the WSDL lacks the SOAP actions {sorted(wanted - actions)}")
    return "Create and Cancel EndDeviceControls offered"


def scenario_schedule_and_cancel(target: Target) -> str:
    meter = _needs_meter(target)
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
    status, element = _send(target, codec.CREATE, _request(codec.CREATE, _disconnect([meter],
                                                                                     start)))
    result, errors, reply = _response(status, element)
    if result != "OK":
        raise ScenarioFailed(f"Result {result} with Errors {errors} for a disconnect of {meter} "
                             "scheduled a day ahead")
    mrid = reply.findtext(f".//{{{codec.NS_END_DEVICE_CONTROLS}}}EndDeviceControl/"
                          f"{{{codec.NS_END_DEVICE_CONTROLS}}}mRID")
    if not mrid:
        raise ScenarioFailed("the reply names no EndDeviceControl mRID to cancel the control by")
    cancel = EndDeviceControl(code_for(ControlAction.DISCONNECT), ControlAction.DISCONNECT,
                              mrid=mrid)
    status, element = _send(target, codec.CANCEL, _request(codec.CANCEL, cancel))
    result, errors, _ = _response(status, element)
    if result != "OK":
        raise ScenarioFailed(f"CancelEndDeviceControls of {mrid}: Result {result}, Errors "
                             f"{errors}")
    return f"scheduled as {mrid}, cancelled"


def scenario_control_unknown_meter(target: Target) -> str:
    status, element = _send(target, codec.CREATE, _request(
        codec.CREATE, _disconnect([f"harness-no-such-meter-{uuid.uuid4()}"])))
    return _failed(status, element, {"2.4"})


def scenario_control_unknown_type(target: Target) -> str:
    element = _request(codec.CREATE, _disconnect([target.meters[0] if target.meters else "x"]))
    for node in element.iter(f"{{{codec.NS_END_DEVICE_CONTROLS}}}EndDeviceControlType"):
        node.set("ref", "3.31.0.9999")
    status, answer = _send(target, codec.CREATE, element)
    return _failed(status, answer, {"5.2", "2.4", "1.8"})


def scenario_control_wrong_verb(target: Target) -> str:
    element = _request(codec.CREATE, _disconnect(["x"]), verb=Verb.GET)
    status, answer = _send(target, codec.CREATE, element)
    return _failed(status, answer, {"2.9"})


def scenario_cancel_unknown(target: Target) -> str:
    cancel = EndDeviceControl(code_for(ControlAction.DISCONNECT), ControlAction.DISCONNECT,
                              mrid=f"harness-no-such-control-{uuid.uuid4()}")
    status, answer = _send(target, codec.CANCEL, _request(codec.CANCEL, cancel))
    return _failed(status, answer, {"1.8", "2.4", "5.2"})


def scenario_switch(target: Target) -> str:
    if not target.control_meters:
        raise ScenarioFailed("this scenario disconnects and reconnects a meter: give one that "
                             "may be switched with --control-meter MRID")
    meter = target.control_meters[0]
    for action in (ControlAction.DISCONNECT, ControlAction.CONNECT):
        control = EndDeviceControl(code_for(action), action, end_devices=(DeviceRef(mrid=meter),))
        status, element = _send(target, codec.CREATE, _request(codec.CREATE, control))
        result, errors, _ = _response(status, element)
        if result != "OK":
            raise ScenarioFailed(f"{action.value} of {meter}: Result {result}, Errors {errors}")
    return f"{meter} disconnected and reconnected"


CONTROL_SCENARIOS: list[tuple[str, str, Callable[[Target], str]]] = [
    ("controls-wsdl", "the ExecuteEndDeviceControls WSDL offers Create and Cancel",
     scenario_controls_wsdl),
    ("control-schedule-cancel", "a disconnect scheduled a day ahead: OK with its mRID; "
     "cancelling it: OK", scenario_schedule_and_cancel),
    ("control-unknown-meter", "a disconnect of an unknown EndDevice: FAILED with 2.4",
     scenario_control_unknown_meter),
    ("control-unknown-type", "an EndDeviceControlType the head-end does not know: FAILED",
     scenario_control_unknown_type),
    ("control-wrong-verb", "CreateEndDeviceControls with Header.Verb get: refused with 2.9",
     scenario_control_wrong_verb),
    ("control-cancel-unknown", "a cancel of a control that does not exist: FAILED",
     scenario_cancel_unknown),
    ("control-switch", "disconnect then reconnect --control-meter: OK twice", scenario_switch),
]
