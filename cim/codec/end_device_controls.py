"""XML codec of the EndDeviceControls noun: the Execute pattern's requests (Create, Change, Cancel,
Close, Delete EndDeviceControls), EndDeviceControlsResponseMessage and EndDeviceControlsFaultMessage
(the EndDeviceControlsMessage wrappers).

``decode_request`` validates against the project's own schema before reading anything and raises a
:class:`~cimhes.cim.codec.document.CodecError` naming the element (and, for a control type, the
type as Error.ID); nothing of a request is acted on unless all of it can be. The mapping of
EndDeviceControlType codes to actions is data, in `cimhes.cim.end_device_controls`; what is read
from which EndDeviceControl field is documented in docs/controls-cim.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from lxml import etree

from cimhes.cim.codec.document import (
    BadNoun,
    BadVerb,
    SchemaInvalid,
    child,
    child_text,
    children,
    invalid,
    optional_element,
    parse_datetime,
    path_of,
    qname,
    sub_element,
    validate,
)
from cimhes.cim.codec.envelope import (
    NS_MESSAGE,
    decode_device,
    decode_header,
    decode_reply,
    encode_device,
    encode_header,
    encode_reply,
)
from cimhes.cim.end_device_controls import (
    ControlAction,
    ControlParameters,
    EndDeviceControl,
    EndDeviceControlsRequest,
    EndDeviceControlsResponse,
    UnknownControlType,
    action_for,
)
from cimhes.cim.message import ErrorCode, Reply, Verb
from cimhes.cim.meter_readings import DeviceRef

NS_END_DEVICE_CONTROLS_MESSAGE = "http://iec.ch/TC57/2011/EndDeviceControlsMessage"
NS_END_DEVICE_CONTROLS = "http://iec.ch/TC57/2011/EndDeviceControls#"
MESSAGE_SCHEMA = "EndDeviceControlsMessage.xsd"
NOUN = "EndDeviceControls"

_PREFIXES = {"msg": NS_MESSAGE, "edcm": NS_END_DEVICE_CONTROLS_MESSAGE,
             "edc": NS_END_DEVICE_CONTROLS}


@dataclass(frozen=True)
class Operation:
    """One operation of the ExecuteEndDeviceControls WSDL: its request element and Header.Verb."""

    name: str
    verb: Verb

    @property
    def element(self) -> str:
        return qname(NS_END_DEVICE_CONTROLS_MESSAGE, self.name)


CREATE = Operation("CreateEndDeviceControls", Verb.CREATE)
CHANGE = Operation("ChangeEndDeviceControls", Verb.CHANGE)
CANCEL = Operation("CancelEndDeviceControls", Verb.CANCEL)
CLOSE = Operation("CloseEndDeviceControls", Verb.CLOSE)
DELETE = Operation("DeleteEndDeviceControls", Verb.DELETE)
OPERATIONS: tuple[Operation, ...] = (CREATE, CHANGE, CANCEL, CLOSE, DELETE)
_BY_ELEMENT = {op.element: op for op in OPERATIONS}

# Parts of an EndDeviceControl cimhes does not act on. Refused with a clear error rather than
# ignored, so a client never takes the outcome of a narrower control for the one it asked.
_UNSUPPORTED = ("PanDemandResponse", "PanDisplay", "PanPricing", "UsagePointGroups", "UsagePoints",
                "secondaryDeviceTiming", "drProgramLevel", "drProgramMandatory")

# Which parameters each action takes (docs/controls-cim.md); any other given is refused.
_TAKES: dict[ControlAction, frozenset[str]] = {
    ControlAction.CONNECT: frozenset(),
    ControlAction.DISCONNECT: frozenset(),
    ControlAction.ARM: frozenset(),
    ControlAction.LOAD_LIMIT_SET: frozenset({"threshold_w", "duration_s"}),
    ControlAction.LOAD_LIMIT_CLEAR: frozenset(),
    ControlAction.CLOCK_SYNC: frozenset(),
    ControlAction.TOU_ACTIVATE: frozenset({"calendar_name"}),
}
_NEEDS: dict[ControlAction, tuple[str, ...]] = {
    ControlAction.LOAD_LIMIT_SET: ("threshold_w", "duration_s"),
    ControlAction.TOU_ACTIVATE: ("calendar_name",)}
# Where each parameter is in the message (for errors).
_FIELD = {"threshold_w": "priceSignal", "duration_s": "primaryDeviceTiming/duration",
          "calendar_name": "issuerTrackingID"}
MAX_THRESHOLD_W = 2**32 - 1  # the limiter's threshold is a double-long-unsigned at most
MAX_DURATION_S = 2**32 - 1


def operation_of(element: etree._Element) -> Operation:
    """The operation whose request ``element`` is (SchemaInvalid for any other element)."""
    operation = _BY_ELEMENT.get(element.tag)
    if operation is None:
        known = ", ".join(op.name for op in OPERATIONS)
        raise SchemaInvalid(f"expected one of the EndDeviceControlsMessage requests ({known}), "
                            f"got {element.tag}", xpath=path_of(element), line=element.sourceline,
                            element=element.tag if isinstance(element.tag, str) else None)
    return operation


def decode_request(element: etree._Element) -> tuple[Operation, EndDeviceControlsRequest]:
    """The operation and request in an EndDeviceControlsMessage request ``element``, validated
    first. Create needs at least one control with its devices or groups; Cancel names each
    control to cancel by the mRID the head-end gave it. Change, Close and Delete are decoded
    as far as their Header (the head-end does not carry them out)."""
    operation = operation_of(element)
    validate(element, MESSAGE_SCHEMA)
    wrapper, m = NS_END_DEVICE_CONTROLS_MESSAGE, NS_MESSAGE
    header_node = child(element, wrapper, "Header")
    header = decode_header(header_node)
    if header.verb is not operation.verb:
        node = child(header_node, m, "Verb")
        raise BadVerb(f"Header.Verb is {header.verb.value!r}; {operation.name} takes "
                      f"{operation.verb.value!r}", xpath=path_of(node), line=node.sourceline,
                      element=node.tag)
    if header.noun.strip() != NOUN:
        node = child(header_node, m, "Noun")
        raise BadNoun(f"Header.Noun is {header.noun!r}; {operation.name} takes {NOUN!r}",
                      xpath=path_of(node), line=node.sourceline, element=node.tag)
    if operation not in (CREATE, CANCEL):
        return operation, EndDeviceControlsRequest(header=header, controls=())
    request = child(element, wrapper, "Request")
    if request is not None and len(request):
        raise invalid(f"{operation.name} takes its controls in the Payload; Request parameters "
                      "are not used by this head-end", request, ErrorCode.UNSUPPORTED_REQUEST)
    payload = child(element, wrapper, "Payload")
    controls_node = None if payload is None else child(payload, NS_END_DEVICE_CONTROLS,
                                                       "EndDeviceControls")
    nodes = [] if controls_node is None else list(
        children(controls_node, NS_END_DEVICE_CONTROLS, "EndDeviceControl"))
    if not nodes:
        raise invalid(f"{operation.name} names no EndDeviceControl (Payload/EndDeviceControls/"
                      "EndDeviceControl)", payload if payload is not None else element,
                      ErrorCode.PAYLOAD_MISSING)
    controls = tuple(_decode_control(node, operation) for node in nodes)
    return operation, EndDeviceControlsRequest(header=header, controls=controls)


def _decode_control(node: etree._Element, operation: Operation) -> EndDeviceControl:
    c = NS_END_DEVICE_CONTROLS
    for local in _UNSUPPORTED:
        found = child(node, c, local)
        if found is not None:
            raise invalid(f"EndDeviceControl/{local} is not supported by this head-end",
                          found, ErrorCode.UNSUPPORTED_REQUEST)
    type_node = child(node, c, "EndDeviceControlType")
    code = (type_node.get("ref") or "").strip()
    if not code:
        raise invalid("EndDeviceControlType needs its code in the ref attribute "
                      "(type.domain.subDomain.eventOrAction, e.g. 3.31.0.23)", type_node,
                      ErrorCode.PAYLOAD_MISSING)
    try:
        action = action_for(code)
    except UnknownControlType as exc:
        raise invalid(str(exc), type_node, ErrorCode.UNKNOWN_CONTROL_TYPE, object_id=code[:128],
                      object_type="EndDeviceControlType") from None
    mrid = (child_text(node, c, "mRID") or "").strip() or None
    devices = tuple(_reference(n, "EndDevices") for n in children(node, c, "EndDevices"))
    groups = tuple(_reference(n, "EndDeviceGroups") for n in children(node, c, "EndDeviceGroups"))
    if operation is CANCEL:
        if mrid is None:
            raise invalid("a control to cancel is named by its mRID (the one the head-end "
                          "answered its CreateEndDeviceControls with)", node,
                          ErrorCode.PAYLOAD_MISSING)
        for local in ("EndDevices", "EndDeviceGroups", "primaryDeviceTiming", "priceSignal",
                      "issuerTrackingID"):
            found = child(node, c, local)
            if found is not None:
                raise invalid(f"CancelEndDeviceControls cancels a whole control by its mRID; "
                              f"EndDeviceControl/{local} is not taken", found,
                              ErrorCode.UNSUPPORTED_REQUEST)
        return EndDeviceControl(control_type=code, action=action, mrid=mrid,
                                reason=child_text(node, c, "reason"))
    if mrid is not None:
        found = child(node, c, "mRID")
        raise invalid("a new control gets its mRID from the head-end (the reply names it); "
                      "EndDeviceControl/mRID is not taken by CreateEndDeviceControls", found,
                      ErrorCode.UNSUPPORTED_REQUEST)
    if not devices and not groups:
        raise invalid("the EndDeviceControl names no EndDevices or EndDeviceGroups", node,
                      ErrorCode.REQUEST_MISSING)
    return EndDeviceControl(control_type=code, action=action, end_devices=devices,
                            end_device_groups=groups, parameters=_parameters(node, action),
                            reason=child_text(node, c, "reason"))


def _reference(node: etree._Element, what: str) -> DeviceRef:
    ref = decode_device(node, NS_END_DEVICE_CONTROLS)
    if not ref.mrid and not ref.names:
        raise invalid(f"{what} must have an mRID or a Names", node, ErrorCode.REQUEST_MISSING)
    return ref


def _parameters(node: etree._Element, action: ControlAction) -> ControlParameters:
    c = NS_END_DEVICE_CONTROLS
    given: dict[str, tuple[object, etree._Element]] = {}
    price = child(node, c, "priceSignal")
    if price is not None:
        given["threshold_w"] = (_whole(price, "priceSignal (the load limit in W)", MAX_THRESHOLD_W),
                                price)
    tracking = child(node, c, "issuerTrackingID")
    if tracking is not None and (tracking.text or "").strip():
        given["calendar_name"] = ((tracking.text or "").strip(), tracking)
    start = None
    timing = child(node, c, "primaryDeviceTiming")
    if timing is not None:
        for local in ("durationIndefinite", "randomisation"):
            found = child(timing, c, local)
            if found is not None:
                raise invalid(f"primaryDeviceTiming/{local} is not supported by this head-end",
                              found, ErrorCode.UNSUPPORTED_REQUEST)
        duration = child(timing, c, "duration")
        if duration is not None:
            minutes = _number(duration, "primaryDeviceTiming/duration (minutes)")
            seconds = round(minutes * 60)
            if seconds < 0 or seconds > MAX_DURATION_S:
                raise invalid(f"primaryDeviceTiming/duration {minutes:g} min is outside 0.."
                              f"{MAX_DURATION_S // 60} min", duration)
            given["duration_s"] = (seconds, duration)
        interval = child(timing, c, "interval")
        if interval is not None:
            end = child(interval, c, "end")
            if end is not None:
                raise invalid("primaryDeviceTiming/interval/end is not supported: a control "
                              "runs once, at interval/start", end, ErrorCode.UNSUPPORTED_REQUEST)
            start_node = child(interval, c, "start")
            start = None if start_node is None else parse_datetime(start_node)
    takes = _TAKES[action]
    for name, (_value, where) in given.items():
        if name not in takes:
            raise invalid(f"EndDeviceControl/{_FIELD[name]} is not a parameter of a "
                          f"{action.value} control", where)
    for name in _NEEDS.get(action, ()):
        if name not in given:
            raise invalid(f"a {action.value} control needs EndDeviceControl/{_FIELD[name]}", node,
                          ErrorCode.CONTROL_PARAMETER_MISSING)
    values = {name: value for name, (value, _where) in given.items()}
    return ControlParameters(start=start, **values)


def _number(node: etree._Element, what: str) -> float:
    text = (node.text or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise invalid(f"{what} is {text!r}, not a number", node) from None
    if not math.isfinite(value):
        raise invalid(f"{what} is {text!r}, not a finite number", node)
    return value


def _whole(node: etree._Element, what: str, most: int) -> int:
    value = _number(node, what)
    if value != int(value) or not 0 <= value <= most:
        raise invalid(f"{what} is {node.text.strip()!r}; it takes a whole number 0..{most}", node)
    return int(value)


# --------------------------------------------------------------------------------------- encode


def _message_root(local: str) -> etree._Element:
    return etree.Element(qname(NS_END_DEVICE_CONTROLS_MESSAGE, local), nsmap=_PREFIXES)


def _encode_controls(parent: etree._Element, controls) -> None:
    c = NS_END_DEVICE_CONTROLS
    node = sub_element(sub_element(parent, NS_END_DEVICE_CONTROLS_MESSAGE, "Payload"), c,
                       "EndDeviceControls")
    for control in controls:
        control_node = sub_element(node, c, "EndDeviceControl")
        optional_element(control_node, c, "mRID", control.mrid)
        parameters = control.parameters
        optional_element(control_node, c, "issuerTrackingID", parameters.calendar_name)
        optional_element(control_node, c, "priceSignal", parameters.threshold_w)
        optional_element(control_node, c, "reason", control.reason)
        sub_element(control_node, c, "EndDeviceControlType").set("ref", control.control_type)
        for group in control.end_device_groups:
            encode_device(control_node, c, "EndDeviceGroups", group)
        for device in control.end_devices:
            encode_device(control_node, c, "EndDevices", device)
        if parameters.duration_s is not None or parameters.start is not None:
            timing = sub_element(control_node, c, "primaryDeviceTiming")
            if parameters.duration_s is not None:
                sub_element(timing, c, "duration", f"{parameters.duration_s / 60:g}")
            if parameters.start is not None:
                optional_element(sub_element(timing, c, "interval"), c, "start", parameters.start)


def encode_request(operation: Operation, request: EndDeviceControlsRequest) -> etree._Element:
    """The request element of ``operation`` for ``request`` (clients, the harness, tests)."""
    root = _message_root(operation.name)
    encode_header(root, NS_END_DEVICE_CONTROLS_MESSAGE, request.header)
    if request.controls:
        _encode_controls(root, request.controls)
    return root


def encode_response(response: EndDeviceControlsResponse) -> etree._Element:
    """The EndDeviceControlsResponseMessage: Header, Reply and, when there are any, the
    controls the head-end made or cancelled (each with its mRID)."""
    root = _message_root("EndDeviceControlsResponseMessage")
    encode_header(root, NS_END_DEVICE_CONTROLS_MESSAGE, response.header)
    encode_reply(root, NS_END_DEVICE_CONTROLS_MESSAGE, response.reply)
    if response.controls:
        _encode_controls(root, response.controls)
    return root


def encode_fault(reply: Reply) -> etree._Element:
    """The EndDeviceControlsFaultMessage carrying ``reply``."""
    root = _message_root("EndDeviceControlsFaultMessage")
    encode_reply(root, NS_END_DEVICE_CONTROLS_MESSAGE, reply)
    return root


def _decode_payload_controls(element: etree._Element) -> tuple[EndDeviceControl, ...]:
    c = NS_END_DEVICE_CONTROLS
    payload = child(element, NS_END_DEVICE_CONTROLS_MESSAGE, "Payload")
    node = None if payload is None else child(payload, c, "EndDeviceControls")
    controls = []
    for control in ([] if node is None else children(node, c, "EndDeviceControl")):
        code = child(control, c, "EndDeviceControlType").get("ref", "")
        start = control.find(f"{{{c}}}primaryDeviceTiming/{{{c}}}interval/{{{c}}}start")
        controls.append(EndDeviceControl(
            control_type=code, action=action_for(code),
            end_devices=tuple(decode_device(n, c) for n in children(control, c, "EndDevices")),
            end_device_groups=tuple(decode_device(n, c)
                                    for n in children(control, c, "EndDeviceGroups")),
            parameters=ControlParameters(start=None if start is None else parse_datetime(start)),
            mrid=child_text(control, c, "mRID"), reason=child_text(control, c, "reason")))
    return tuple(controls)


def decode_response(element: etree._Element) -> EndDeviceControlsResponse:
    """The EndDeviceControlsResponseMessage ``element``, validated first."""
    if element.tag != qname(NS_END_DEVICE_CONTROLS_MESSAGE, "EndDeviceControlsResponseMessage"):
        raise SchemaInvalid(f"expected an EndDeviceControlsResponseMessage, got {element.tag}",
                            xpath=path_of(element))
    validate(element, MESSAGE_SCHEMA)
    wrapper = NS_END_DEVICE_CONTROLS_MESSAGE
    return EndDeviceControlsResponse(header=decode_header(child(element, wrapper, "Header")),
                                     reply=decode_reply(child(element, wrapper, "Reply")),
                                     controls=_decode_payload_controls(element))


def decode_fault(element: etree._Element) -> Reply:
    """The Reply in an EndDeviceControlsFaultMessage ``element``, validated first."""
    if element.tag != qname(NS_END_DEVICE_CONTROLS_MESSAGE, "EndDeviceControlsFaultMessage"):
        raise SchemaInvalid(f"expected an EndDeviceControlsFaultMessage, got {element.tag}",
                            xpath=path_of(element))
    validate(element, MESSAGE_SCHEMA)
    return decode_reply(child(element, NS_END_DEVICE_CONTROLS_MESSAGE, "Reply"))


def started_after(request: EndDeviceControlsRequest, now: datetime) -> bool:
    """Whether any control of ``request`` is to start after ``now`` (scheduled execution)."""
    return any(c.parameters.start is not None and c.parameters.start > now
               for c in request.controls)
