"""XML codec of the EndDeviceEvents noun: the CreatedEndDeviceEvents event a head-end publishes
(EndDeviceEventsMessage wrappers of the Send/Receive pattern), and the receiver's response.
Decoding validates against the project's schema first."""
from __future__ import annotations

from lxml import etree

from cimhes.cim.codec.document import (
    child,
    child_text,
    children,
    expect_root,
    format_datetime,
    invalid,
    optional_element,
    parse_datetime,
    qname,
    sub_element,
    validate,
)
from cimhes.cim.codec.envelope import (
    encode_response_message,
    NS_MESSAGE,
    decode_device,
    decode_header,
    encode_device,
    encode_header,
)
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.cim.message import ErrorCode, Header, Reply
from cimhes.cim.meter_readings import DeviceRef

NS_END_DEVICE_EVENTS = "http://iec.ch/TC57/2011/EndDeviceEvents#"
NS_END_DEVICE_EVENTS_MESSAGE = "http://iec.ch/TC57/2011/EndDeviceEventsMessage"
EVENTS_SCHEMA = "EndDeviceEventsMessage.xsd"

_PREFIXES = {"msg": NS_MESSAGE, "edem": NS_END_DEVICE_EVENTS_MESSAGE, "ede": NS_END_DEVICE_EVENTS}


# The meter's own identification of the event travels as this EndDeviceEventDetail.
DEVICE_CODE_DETAIL = "deviceEventCode"


def _encode_event(parent: etree._Element, event: EndDeviceEvent) -> None:
    e = NS_END_DEVICE_EVENTS
    node = sub_element(parent, e, "EndDeviceEvent")
    sub_element(node, e, "createdDateTime", format_datetime(event.created))
    optional_element(node, e, "reason", event.reason or None)
    encode_device(node, e, "Assets", DeviceRef(mrid=event.device_mrid))
    for name, value in ((DEVICE_CODE_DETAIL, event.device_code), *event.details):
        detail = sub_element(node, e, "EndDeviceEventDetails")
        sub_element(detail, e, "name", name)
        optional_element(detail, e, "value", value)
    sub_element(node, e, "EndDeviceEventType").set("ref", event.event_type)


def encode_created_end_device_events(header: Header, events) -> etree._Element:
    """The EndDeviceEventsMessage:CreatedEndDeviceEvents element (Header + Payload)."""
    root = etree.Element(qname(NS_END_DEVICE_EVENTS_MESSAGE, "CreatedEndDeviceEvents"),
                         nsmap=_PREFIXES)
    encode_header(root, NS_END_DEVICE_EVENTS_MESSAGE, header)
    payload = sub_element(root, NS_END_DEVICE_EVENTS_MESSAGE, "Payload")
    container = sub_element(payload, NS_END_DEVICE_EVENTS, "EndDeviceEvents")
    for event in events:
        _encode_event(container, event)
    return root


def _decode_event(node: etree._Element) -> EndDeviceEvent:
    e = NS_END_DEVICE_EVENTS
    event_type = child(node, e, "EndDeviceEventType")
    assets = child(node, e, "Assets")
    details = [(child_text(d, e, "name"), child_text(d, e, "value") or "")
               for d in children(node, e, "EndDeviceEventDetails")]
    device_code = next((v for n, v in details if n == DEVICE_CODE_DETAIL), "")
    try:
        return EndDeviceEvent(
            device_mrid=(decode_device(assets, e).mrid if assets is not None else None) or "",
            created=parse_datetime(child(node, e, "createdDateTime")),
            event_type=(event_type.get("ref") or "").strip(),
            device_code=device_code,
            reason=child_text(node, e, "reason") or "",
            details=tuple((n, v) for n, v in details if n != DEVICE_CODE_DETAIL))
    except ValueError as exc:
        raise invalid(str(exc), event_type, ErrorCode.INVALID_PARAMETER) from None


def decode_created_end_device_events(element: etree._Element) -> tuple[Header, tuple[EndDeviceEvent, ...]]:
    """(Header, events) of an EndDeviceEventsMessage:CreatedEndDeviceEvents, validated first."""
    expect_root(element, NS_END_DEVICE_EVENTS_MESSAGE, "CreatedEndDeviceEvents")
    validate(element, EVENTS_SCHEMA)
    payload = child(element, NS_END_DEVICE_EVENTS_MESSAGE, "Payload")
    events = None if payload is None else child(payload, NS_END_DEVICE_EVENTS, "EndDeviceEvents")
    return (decode_header(child(element, NS_END_DEVICE_EVENTS_MESSAGE, "Header")),
            () if events is None else tuple(
                _decode_event(n) for n in children(events, NS_END_DEVICE_EVENTS, "EndDeviceEvent")))


def encode_events_response(header: Header, reply: Reply) -> etree._Element:
    """The EndDeviceEventsMessage:EndDeviceEventsResponseMessage a receiver answers with."""
    return encode_response_message(NS_END_DEVICE_EVENTS_MESSAGE, "edem",
                                   "EndDeviceEventsResponseMessage", header, reply)
