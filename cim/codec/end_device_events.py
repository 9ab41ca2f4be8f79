"""XML codec of the EndDeviceEvents noun: the CreatedEndDeviceEvents event a head-end publishes
(EndDeviceEventsMessage wrappers of the Send/Receive pattern) and the receiver's response; the
GetEndDeviceEvents request, its EndDeviceEventsResponseMessage and EndDeviceEventsFaultMessage
(GetEndDeviceEventsMessage wrappers of the Get pattern). Decoding validates against the
project's schema first."""
from __future__ import annotations

from lxml import etree

from cimhes.cim.codec.document import (
    BadNoun,
    BadVerb,
    child,
    child_text,
    children,
    expect_root,
    format_datetime,
    invalid,
    optional_datetime,
    optional_element,
    parse_datetime,
    path_of,
    qname,
    sub_element,
    validate,
)
from cimhes.cim.codec.envelope import (
    encode_response_message,
    NS_MESSAGE,
    decode_device,
    decode_header,
    decode_interval,
    decode_reply,
    encode_device,
    encode_header,
    encode_reply,
)
from cimhes.cim.end_device_events import (
    PAGE_OPTION,
    SOURCE_OPTION,
    EndDeviceEvent,
    EndDeviceEventsResponse,
    EventSource,
    GetEndDeviceEvents,
    check_event_type_pattern,
)
from cimhes.cim.message import ErrorCode, Header, Reply, Verb
from cimhes.cim.meter_readings import DeviceRef, Name

NS_END_DEVICE_EVENTS = "http://iec.ch/TC57/2011/EndDeviceEvents#"
NS_END_DEVICE_EVENTS_MESSAGE = "http://iec.ch/TC57/2011/EndDeviceEventsMessage"
EVENTS_SCHEMA = "EndDeviceEventsMessage.xsd"
NS_GET_END_DEVICE_EVENTS_MESSAGE = "http://iec.ch/TC57/2011/GetEndDeviceEventsMessage"
NS_GET_END_DEVICE_EVENTS = "http://iec.ch/TC57/2011/GetEndDeviceEvents#"
GET_SCHEMA = "GetEndDeviceEventsMessage.xsd"

NOUN = "EndDeviceEvents"
# Header.Noun values a GetEndDeviceEvents is taken with: the standard's, and the spelling of one
# vendor's published samples (connexo_GetEndDeviceEvents_request.xml: "GetEndDeviceEvents").
NOUNS = (NOUN, "GetEndDeviceEvents")

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


# ------------------------------------------------------------------------------ GetEndDeviceEvents

_GET_PREFIXES = {"msg": NS_MESSAGE, "gedm": NS_GET_END_DEVICE_EVENTS_MESSAGE,
                 "get": NS_GET_END_DEVICE_EVENTS, "ede": NS_END_DEVICE_EVENTS}

# Selectors of the profile the head-end does not act on: refused, never ignored, so a client
# never takes an answer to a wider question for the one it asked.
_UNSUPPORTED_SELECTORS = ("Customer", "EndDeviceEvent", "ServiceCategory", "UsagePoint")


def _decode_meter(node: etree._Element) -> DeviceRef:
    g = NS_GET_END_DEVICE_EVENTS
    ref = decode_device(node, g)
    serial = (child_text(node, g, "serialNumber") or "").strip()
    if serial and not ref.names:  # a serial number is how the inventory names a meter
        ref = DeviceRef(mrid=ref.mrid, names=(Name(serial),))
    if not ref.mrid and not ref.names:
        raise invalid("Meter must have an mRID, a serialNumber or a Names", node,
                      ErrorCode.MISSING_PARAMETER)
    return ref


def _decode_group(node: etree._Element) -> DeviceRef:
    ref = decode_device(node, NS_GET_END_DEVICE_EVENTS)
    if not ref.mrid and not ref.names:
        raise invalid("EndDeviceGroup must have an mRID or a Names", node,
                      ErrorCode.MISSING_PARAMETER)
    return ref


def _decode_event_type(node: etree._Element) -> str:
    g = NS_GET_END_DEVICE_EVENTS
    mrid = child(node, g, "mRID")
    names = [(child_text(n, g, "name") or "").strip() for n in children(node, g, "Names")]
    code = (mrid.text or "").strip() if mrid is not None else next((n for n in names if n), "")
    try:
        return check_event_type_pattern(code)
    except ValueError as exc:
        raise invalid(str(exc), mrid if mrid is not None else node, ErrorCode.INVALID_PARAMETER,
                      object_id=code or None, object_type="EndDeviceEventType") from None


def _event_options(request: etree._Element) -> tuple[EventSource, int]:
    source, page = EventSource.STORE, 1
    for node in children(request, NS_GET_END_DEVICE_EVENTS_MESSAGE, "Option"):
        name = (child_text(node, NS_MESSAGE, "name") or "").strip()
        value = (child_text(node, NS_MESSAGE, "value") or "").strip()
        if name == SOURCE_OPTION:
            try:
                source = EventSource(value)
            except ValueError:
                raise invalid(f"Request.Option {SOURCE_OPTION} is {value!r}; it takes one of "
                              + ", ".join(repr(s.value) for s in EventSource), node) from None
        elif name == PAGE_OPTION:
            if not value.isdigit() or int(value) < 1:
                raise invalid(f"Request.Option {PAGE_OPTION} is {value!r}; it takes 1, 2, ...", node)
            page = int(value)
        else:
            raise invalid(f"Request.Option {name!r} is not one this head-end knows; it knows "
                          f"{SOURCE_OPTION!r} and {PAGE_OPTION!r}", node,
                          ErrorCode.UNSUPPORTED_REQUEST)
    return source, page


def _event_period(request: etree._Element, profile: etree._Element):
    """The period from Request StartTime/EndTime or TimeSchedule/scheduleInterval (several are
    accepted when they agree); start after end is refused."""
    wrapper, g = NS_GET_END_DEVICE_EVENTS_MESSAGE, NS_GET_END_DEVICE_EVENTS
    windows = []
    start_time = optional_datetime(request, wrapper, "StartTime")
    end_time = optional_datetime(request, wrapper, "EndTime")
    if start_time is not None or end_time is not None:
        windows.append((request, start_time, end_time))
    for schedule in children(profile, g, "TimeSchedule"):
        interval = child(schedule, g, "scheduleInterval")
        windows.append((interval, *decode_interval(interval, g)))
    if not windows:
        return None, None
    node, start, end = windows[0]
    for other_node, other_start, other_end in windows[1:]:
        if (other_start, other_end) != (start, end):
            raise invalid(f"the request gives two different periods: {start}..{end} at "
                          f"{path_of(node)} and {other_start}..{other_end}", other_node)
    if start is not None and end is not None and start > end:
        raise invalid(f"the period starts ({start}) after it ends ({end})", node)
    return start, end


def decode_get_end_device_events(element: etree._Element) -> GetEndDeviceEvents:
    """The request in the GetEndDeviceEventsMessage:GetEndDeviceEvents ``element``, validated
    first: Meters (mRID, serialNumber or Names), EndDeviceGroups, EndDeviceEventTypes (four-part
    codes as mRID or name, ``*`` for any part) and the period."""
    expect_root(element, NS_GET_END_DEVICE_EVENTS_MESSAGE, "GetEndDeviceEvents")
    validate(element, GET_SCHEMA)
    wrapper, m, g = NS_GET_END_DEVICE_EVENTS_MESSAGE, NS_MESSAGE, NS_GET_END_DEVICE_EVENTS
    header_node = child(element, wrapper, "Header")
    header = decode_header(header_node)
    if header.verb is not Verb.GET:
        node = child(header_node, m, "Verb")
        raise BadVerb(f"Header.Verb is {header.verb.value!r}; GetEndDeviceEvents takes 'get'",
                      xpath=path_of(node), line=node.sourceline, element=node.tag)
    if (header.noun or "").strip() not in NOUNS:
        node = child(header_node, m, "Noun")
        raise BadNoun(f"Header.Noun is {header.noun!r}; GetEndDeviceEvents takes {NOUN!r}",
                      xpath=path_of(node), line=node.sourceline, element=node.tag)
    request = child(element, wrapper, "Request")
    profile = child(request, g, "GetEndDeviceEvents")
    for local in _UNSUPPORTED_SELECTORS:
        node = child(profile, g, local)
        if node is not None:
            raise invalid(f"GetEndDeviceEvents/{local} is not supported by this head-end; name "
                          "Meters or EndDeviceGroups", node, ErrorCode.UNSUPPORTED_REQUEST)
    meters = tuple(_decode_meter(n) for n in children(profile, g, "Meter"))
    groups = tuple(_decode_group(n) for n in children(profile, g, "EndDeviceGroup"))
    if not meters and not groups:
        raise invalid("the request names no Meter or EndDeviceGroup", profile,
                      ErrorCode.MISSING_PARAMETER)
    event_types = tuple(dict.fromkeys(
        _decode_event_type(n) for n in children(profile, g, "EndDeviceEventType")))
    start, end = _event_period(request, profile)
    source, page = _event_options(request)
    return GetEndDeviceEvents(header=header, meters=meters, end_device_groups=groups,
                              event_types=event_types, start=start, end=end, source=source,
                              page=page)


def encode_get_end_device_events(request: GetEndDeviceEvents) -> etree._Element:
    """The GetEndDeviceEventsMessage:GetEndDeviceEvents element of ``request`` (harness, tests)."""
    wrapper, g = NS_GET_END_DEVICE_EVENTS_MESSAGE, NS_GET_END_DEVICE_EVENTS
    root = etree.Element(qname(wrapper, "GetEndDeviceEvents"), nsmap=_GET_PREFIXES)
    encode_header(root, wrapper, request.header)
    node = sub_element(root, wrapper, "Request")
    options = []
    if request.source is not EventSource.STORE:
        options.append((SOURCE_OPTION, request.source.value))
    if request.page != 1:
        options.append((PAGE_OPTION, str(request.page)))
    for name, value in options:
        option = sub_element(node, wrapper, "Option")
        sub_element(option, NS_MESSAGE, "name", name)
        sub_element(option, NS_MESSAGE, "value", value)
    profile = sub_element(node, g, "GetEndDeviceEvents")
    for pattern in request.event_types:
        sub_element(sub_element(profile, g, "EndDeviceEventType"), g, "mRID", pattern)
    for group in request.end_device_groups:
        encode_device(profile, g, "EndDeviceGroup", group)
    for meter in request.meters:
        encode_device(profile, g, "Meter", meter)
    if request.start is not None or request.end is not None:
        interval = sub_element(sub_element(profile, g, "TimeSchedule"), g, "scheduleInterval")
        optional_element(interval, g, "end", request.end)
        optional_element(interval, g, "start", request.start)
    return root


def encode_end_device_events_response(response: EndDeviceEventsResponse) -> etree._Element:
    """The GetEndDeviceEventsMessage:EndDeviceEventsResponseMessage of ``response``: Header,
    Reply and, when there are events, the Payload's EndDeviceEvents."""
    wrapper = NS_GET_END_DEVICE_EVENTS_MESSAGE
    root = etree.Element(qname(wrapper, "EndDeviceEventsResponseMessage"), nsmap=_GET_PREFIXES)
    encode_header(root, wrapper, response.header)
    encode_reply(root, wrapper, response.reply)
    if response.events:
        container = sub_element(sub_element(root, wrapper, "Payload"), NS_END_DEVICE_EVENTS,
                                "EndDeviceEvents")
        for event in response.events:
            _encode_event(container, event)
    return root


def encode_get_end_device_events_fault(reply: Reply) -> etree._Element:
    """The GetEndDeviceEventsMessage:EndDeviceEventsFaultMessage carrying ``reply``."""
    root = etree.Element(qname(NS_GET_END_DEVICE_EVENTS_MESSAGE, "EndDeviceEventsFaultMessage"),
                         nsmap=_GET_PREFIXES)
    encode_reply(root, NS_GET_END_DEVICE_EVENTS_MESSAGE, reply)
    return root


def decode_end_device_events_response(element: etree._Element) -> EndDeviceEventsResponse:
    """The GetEndDeviceEventsMessage:EndDeviceEventsResponseMessage ``element``, validated first."""
    wrapper = NS_GET_END_DEVICE_EVENTS_MESSAGE
    expect_root(element, wrapper, "EndDeviceEventsResponseMessage")
    validate(element, GET_SCHEMA)
    payload = child(element, wrapper, "Payload")
    events = None if payload is None else child(payload, NS_END_DEVICE_EVENTS, "EndDeviceEvents")
    return EndDeviceEventsResponse(
        header=decode_header(child(element, wrapper, "Header")),
        reply=decode_reply(child(element, wrapper, "Reply")),
        events=() if events is None else tuple(
            _decode_event(n) for n in children(events, NS_END_DEVICE_EVENTS, "EndDeviceEvent")))
