"""XML codec of the MeterReadings noun: GetMeterReadings requests, MeterReadingsResponseMessage
replies and MeterReadingsFaultMessage faults (the GetMeterReadingsMessage wrappers).

``decode_*`` validate against the project's own schema before reading anything and raise a
:class:`~cimhes.cim.codec.document.CodecError`; ``encode_*`` build elements valid against the
project's schemas and the standard's.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation

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
from cimhes.cim.message import ErrorCode, Header, Reply, ReplyResult, Verb
from cimhes.cim.meter_readings import (
    DeviceRef,
    GetMeterReadings,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    MeterReadingsResponse,
    Reading,
    PAGE_OPTION,
    ReadingSource,
    SOURCE_OPTION,
)
from cimhes.cim.reading_type import ReadingType

NS_GET_METER_READINGS_MESSAGE = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
NS_GET_METER_READINGS = "http://iec.ch/TC57/2011/GetMeterReadings#"
NS_METER_READINGS = "http://iec.ch/TC57/2011/MeterReadings#"

# The schema holding the three GetMeterReadings wrappers (and, through imports, the rest).
MESSAGE_SCHEMA = "GetMeterReadingsMessage.xsd"

NOUN = "MeterReadings"

_PREFIXES = {
    "msg": NS_MESSAGE,
    "gmr": NS_GET_METER_READINGS_MESSAGE,
    "get": NS_GET_METER_READINGS,
    "mr": NS_METER_READINGS,
}


# ------------------------------------------------------------------------------ decode: the request

# Parts of the GetMeterReadings profile the head-end does not act on. Refused with a clear error rather
# than ignored, so a client never takes an answer to a narrower question for the one it asked.
_UNSUPPORTED_SELECTORS = ("UsagePointGroup", "TransformerTank", "MeterReadings", "ReadingQuality")


def decode_get_meter_readings(element: etree._Element) -> GetMeterReadings:
    """The request in the GetMeterReadingsMessage:GetMeterReadings ``element``, validated first.

    The time window may be given in any of the three places the standard offers: Request
    StartTime/EndTime, GetMeterReadings/Reading/timePeriod, or GetMeterReadings/TimeSchedule/
    scheduleInterval; several are accepted when they agree.
    """
    expect_root(element, NS_GET_METER_READINGS_MESSAGE, "GetMeterReadings")
    validate(element, MESSAGE_SCHEMA)
    wrapper, m, g = NS_GET_METER_READINGS_MESSAGE, NS_MESSAGE, NS_GET_METER_READINGS

    header_node = child(element, wrapper, "Header")
    header = decode_header(header_node)
    if header.verb is not Verb.GET:
        verb_node = child(header_node, m, "Verb")
        raise BadVerb(
            f"Header.Verb is {header.verb.value!r}; GetMeterReadings takes 'get'",
            xpath=path_of(verb_node), line=verb_node.sourceline, element=verb_node.tag,
        )
    if header.noun.strip() != NOUN:
        noun_node = child(header_node, m, "Noun")
        raise BadNoun(
            f"Header.Noun is {header.noun!r}; GetMeterReadings takes {NOUN!r}",
            xpath=path_of(noun_node), line=noun_node.sourceline, element=noun_node.tag,
        )

    request = child(element, wrapper, "Request")
    profile = child(request, g, "GetMeterReadings")
    for local in _UNSUPPORTED_SELECTORS:
        node = child(profile, g, local)
        if node is not None:
            raise invalid(f"GetMeterReadings/{local} is not supported by this head-end", node, ErrorCode.UNSUPPORTED_REQUEST)

    end_devices = tuple(_decode_reference(node, "EndDevice") for node in children(profile, g, "EndDevice"))
    usage_points = tuple(_decode_reference(node, "UsagePoint") for node in children(profile, g, "UsagePoint"))
    groups = tuple(_decode_reference(node, "EndDeviceGroup") for node in children(profile, g, "EndDeviceGroup"))
    if not end_devices and not usage_points and not groups:
        raise invalid("the request names no EndDevice, EndDeviceGroup or UsagePoint", profile,
                      ErrorCode.MISSING_PARAMETER)

    reading_types = []
    for node in children(profile, g, "ReadingType"):
        mrid_node = child(node, g, "mRID")
        if mrid_node is None:
            raise invalid("ReadingType must be given by its mRID (the 18-part code)", node, ErrorCode.INVALID_READING_TYPE)
        try:
            reading_types.append(ReadingType.parse((mrid_node.text or "").strip()).mrid)
        except ValueError as exc:
            raise invalid(str(exc), mrid_node, ErrorCode.INVALID_READING_TYPE,
                          object_id=(mrid_node.text or "").strip(), object_type="ReadingType") from None

    start, end = _time_window(request, profile)
    source, page = _options(request)
    reasons = [(child_text(node, g, "reason") or "").strip() for node in children(profile, g, "Reading")]
    return GetMeterReadings(
        header=header,
        end_devices=end_devices,
        usage_points=usage_points,
        end_device_groups=groups,
        reading_types=tuple(reading_types),
        start=start,
        end=end,
        reason=next((r for r in reasons if r), None),
        source=source,
        page=page,
    )


def _options(request: etree._Element) -> tuple[ReadingSource, int]:
    """Request.Option DataSource (default store-then-meter) and Page (default 1); any other
    Option is refused rather than ignored."""
    source, page = ReadingSource.STORE_THEN_METER, 1
    for node in children(request, NS_GET_METER_READINGS_MESSAGE, "Option"):
        name = (child_text(node, NS_MESSAGE, "name") or "").strip()
        value = (child_text(node, NS_MESSAGE, "value") or "").strip()
        if name == SOURCE_OPTION:
            try:
                source = ReadingSource(value)
            except ValueError:
                raise invalid(f"Request.Option {SOURCE_OPTION} is {value!r}; it takes one of "
                              + ", ".join(repr(s.value) for s in ReadingSource), node) from None
        elif name == PAGE_OPTION:
            if not value.isdigit() or int(value) < 1:
                raise invalid(f"Request.Option {PAGE_OPTION} is {value!r}; it takes 1, 2, ...", node)
            page = int(value)
        else:
            raise invalid(f"Request.Option {name!r} is not one this head-end knows; it knows "
                          f"{SOURCE_OPTION!r} and {PAGE_OPTION!r}", node,
                          ErrorCode.UNSUPPORTED_REQUEST)
    return source, page


def _decode_reference(node: etree._Element, what: str) -> DeviceRef:
    ref = decode_device(node, NS_GET_METER_READINGS)
    if not ref.mrid and not ref.names:
        raise invalid(f"{what} must have an mRID or a Names", node, ErrorCode.MISSING_PARAMETER)
    return ref


def _time_window(request: etree._Element, profile: etree._Element) -> tuple[datetime | None, datetime | None]:
    wrapper, g = NS_GET_METER_READINGS_MESSAGE, NS_GET_METER_READINGS
    windows: list[tuple[etree._Element, datetime | None, datetime | None]] = []
    start_time = optional_datetime(request, wrapper, "StartTime")
    end_time = optional_datetime(request, wrapper, "EndTime")
    if start_time is not None or end_time is not None:
        windows.append((request, start_time, end_time))
    for reading in children(profile, g, "Reading"):
        period = child(reading, g, "timePeriod")
        if period is not None:
            windows.append((period, *decode_interval(period, g)))
    for schedule in children(profile, g, "TimeSchedule"):
        interval = child(schedule, g, "scheduleInterval")
        windows.append((interval, *decode_interval(interval, g)))
    if not windows:
        return None, None
    node, start, end = windows[0]
    for other_node, other_start, other_end in windows[1:]:
        if (other_start, other_end) != (start, end):
            raise invalid(
                f"the request gives two different time windows: {start}..{end} at {path_of(node)} "
                f"and {other_start}..{other_end}",
                other_node,
            )
    if start is not None and end is not None and start > end:
        raise invalid(f"the time window starts ({start}) after it ends ({end})", node)
    return start, end


def _format_value(value: Decimal | str) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"a reading value must be a finite number, got {value}")
        return format(value, "f")
    return str(value)


def _encode_qualities(parent: etree._Element, qualities: tuple[str, ...]) -> None:
    for quality in qualities:
        node = sub_element(parent, NS_METER_READINGS, "ReadingQualities")
        sub_element(node, NS_METER_READINGS, "ReadingQualityType").set("ref", quality)


def _message_root(local: str) -> etree._Element:
    return etree.Element(qname(NS_GET_METER_READINGS_MESSAGE, local), nsmap=_PREFIXES)


# ----------------------------------------------------------------------------------- encode: messages


def encode_get_meter_readings(request: GetMeterReadings) -> etree._Element:
    """The GetMeterReadingsMessage:GetMeterReadings element for ``request`` (window in Request Start/EndTime)."""
    wrapper, g = NS_GET_METER_READINGS_MESSAGE, NS_GET_METER_READINGS
    root = _message_root("GetMeterReadings")
    encode_header(root, wrapper, request.header)
    request_node = sub_element(root, wrapper, "Request")
    optional_element(request_node, wrapper, "StartTime", request.start)
    optional_element(request_node, wrapper, "EndTime", request.end)
    for name, value, default in ((SOURCE_OPTION, request.source.value,
                                  ReadingSource.STORE_THEN_METER.value),
                                 (PAGE_OPTION, str(request.page), "1")):
        if value != default:
            option = sub_element(request_node, wrapper, "Option")
            sub_element(option, NS_MESSAGE, "name", name)
            sub_element(option, NS_MESSAGE, "value", value)
    profile = sub_element(request_node, g, "GetMeterReadings")
    for device in request.end_devices:
        encode_device(profile, g, "EndDevice", device)
    for group in request.end_device_groups:
        encode_device(profile, g, "EndDeviceGroup", group)
    if request.reason is not None:
        sub_element(sub_element(profile, g, "Reading"), g, "reason", request.reason)
    for code in request.reading_types:
        sub_element(sub_element(profile, g, "ReadingType"), g, "mRID", ReadingType.parse(code).mrid)
    for usage_point in request.usage_points:
        encode_device(profile, g, "UsagePoint", usage_point)
    return root


def _reading_types_used(meter_readings: tuple[MeterReading, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for meter_reading in meter_readings:
        for reading in meter_reading.readings:
            seen.setdefault(reading.reading_type)
        for block in meter_reading.interval_blocks:
            seen.setdefault(block.reading_type)
    return list(seen)


def _encode_meter_reading(parent: etree._Element, meter_reading: MeterReading,
                          stamps: dict[datetime, str]) -> None:
    """One MeterReading. The interval loop is the hot path of a large reply (196 values per meter
    read): tags are prepared once and each instant is formatted once per reply (`stamps`), since
    a fleet's intervals share their timestamps (bench/encode_response.py)."""
    r = NS_METER_READINGS
    sub = etree.SubElement
    node = sub_element(parent, r, "MeterReading")
    for block in meter_reading.interval_blocks:
        block_node = sub(node, _TAG_INTERVAL_BLOCKS)
        for interval in block.readings:
            interval_node = sub(block_node, _TAG_INTERVAL_READINGS)
            stamp = stamps.get(interval.timestamp)
            if stamp is None:
                stamp = stamps[interval.timestamp] = format_datetime(interval.timestamp)
            sub(interval_node, _TAG_TIME_STAMP).text = stamp
            sub(interval_node, _TAG_VALUE).text = _format_value(interval.value)
            if interval.qualities:
                _encode_qualities(interval_node, interval.qualities)
        sub(block_node, _TAG_READING_TYPE).set("ref", block.reading_type)
    encode_device(node, r, "Meter", meter_reading.meter)
    for reading in meter_reading.readings:
        reading_node = sub_element(node, r, "Readings")
        sub_element(reading_node, r, "timeStamp", format_datetime(reading.timestamp))
        sub_element(reading_node, r, "value", _format_value(reading.value))
        _encode_qualities(reading_node, reading.qualities)
        sub_element(reading_node, r, "ReadingType").set("ref", reading.reading_type)
    if meter_reading.usage_point is not None:
        encode_device(node, r, "UsagePoint", meter_reading.usage_point)
    if meter_reading.values_interval is not None:
        start, end = meter_reading.values_interval
        interval = sub_element(node, r, "valuesInterval")
        sub_element(interval, r, "end", format_datetime(end))
        sub_element(interval, r, "start", format_datetime(start))


_TAG_INTERVAL_BLOCKS = f"{{{NS_METER_READINGS}}}IntervalBlocks"
_TAG_INTERVAL_READINGS = f"{{{NS_METER_READINGS}}}IntervalReadings"
_TAG_TIME_STAMP = f"{{{NS_METER_READINGS}}}timeStamp"
_TAG_VALUE = f"{{{NS_METER_READINGS}}}value"
_TAG_READING_TYPE = f"{{{NS_METER_READINGS}}}ReadingType"


def encode_meter_readings_response(response: MeterReadingsResponse) -> etree._Element:
    """The GetMeterReadingsMessage:MeterReadingsResponseMessage element for ``response``.

    The payload lists each MeterReading and, after them, one ReadingType per code used (mRID plus
    the Names the schema requires, named by the code). The Payload is left out of a FAILED reply
    that carries no readings, and out of an acknowledgment (Error 0.3).
    """
    wrapper = NS_GET_METER_READINGS_MESSAGE
    root = _message_root("MeterReadingsResponseMessage")
    encode_header(root, wrapper, response.header)
    encode_reply(root, wrapper, response.reply)
    # An acknowledgment (0.3: the outcome follows asynchronously) carries no Payload either.
    acknowledgment = any(e.code == ErrorCode.ACKNOWLEDGED for e in response.reply.errors)
    if response.meter_readings or (response.reply.result is not ReplyResult.FAILED
                                   and not acknowledgment):
        _encode_payload(root, wrapper, response.meter_readings)
    return root


def _encode_payload(root: etree._Element, wrapper: str, meter_readings) -> None:
    r = NS_METER_READINGS
    readings = sub_element(sub_element(root, wrapper, "Payload"), r, "MeterReadings")
    stamps: dict[datetime, str] = {}
    for meter_reading in meter_readings:
        _encode_meter_reading(readings, meter_reading, stamps)
    for code in _reading_types_used(meter_readings):
        reading_type = sub_element(readings, r, "ReadingType")
        sub_element(reading_type, r, "mRID", code)
        sub_element(sub_element(reading_type, r, "Names"), r, "name", code)


# ------------------------------------------------------------ the published event (Send/Receive)

NS_METER_READINGS_MESSAGE = "http://iec.ch/TC57/2011/MeterReadingsMessage"
EVENT_SCHEMA = "MeterReadingsMessage.xsd"


def encode_created_meter_readings(header: Header, meter_readings) -> etree._Element:
    """The MeterReadingsMessage:CreatedMeterReadings event (Header + Payload) a head-end
    publishes to its subscribers; ``header`` is normally verb created, noun MeterReadings."""
    root = etree.Element(qname(NS_METER_READINGS_MESSAGE, "CreatedMeterReadings"), nsmap={
        "msg": NS_MESSAGE, "mrm": NS_METER_READINGS_MESSAGE, "mr": NS_METER_READINGS})
    encode_header(root, NS_METER_READINGS_MESSAGE, header)
    _encode_payload(root, NS_METER_READINGS_MESSAGE, meter_readings)
    return root


def decode_created_meter_readings(element: etree._Element) -> tuple[Header, tuple[MeterReading, ...]]:
    """(Header, readings) of a MeterReadingsMessage:CreatedMeterReadings event, validated first."""
    expect_root(element, NS_METER_READINGS_MESSAGE, "CreatedMeterReadings")
    validate(element, EVENT_SCHEMA)
    payload = child(element, NS_METER_READINGS_MESSAGE, "Payload")
    readings = None if payload is None else child(payload, NS_METER_READINGS, "MeterReadings")
    return (decode_header(child(element, NS_METER_READINGS_MESSAGE, "Header")),
            () if readings is None else tuple(
                _decode_meter_reading(n) for n in children(readings, NS_METER_READINGS, "MeterReading")))


def encode_event_response(header: Header, reply: Reply) -> etree._Element:
    """The MeterReadingsMessage:MeterReadingsResponseMessage a receiver answers an event with."""
    return encode_response_message(NS_METER_READINGS_MESSAGE, "mrm",
                                   "MeterReadingsResponseMessage", header, reply)


def encode_fault(reply: Reply) -> etree._Element:
    """The GetMeterReadingsMessage:MeterReadingsFaultMessage element carrying ``reply``."""
    root = _message_root("MeterReadingsFaultMessage")
    encode_reply(root, NS_GET_METER_READINGS_MESSAGE, reply)
    return root


# ------------------------------------------------------------------------------ decode: the replies


def _decode_value(text: str | None) -> Decimal | str:
    text = (text or "").strip()
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    return value if value.is_finite() else text


def _qualities(node: etree._Element) -> tuple[str, ...]:
    r = NS_METER_READINGS
    return tuple(
        child(q, r, "ReadingQualityType").get("ref", "") for q in children(node, r, "ReadingQualities")
    )


def _reading_timestamp(node: etree._Element) -> datetime:
    stamp = child(node, NS_METER_READINGS, "timeStamp")
    if stamp is None:
        raise invalid("a reading without timeStamp cannot be used", node, ErrorCode.MISSING_PARAMETER)
    return parse_datetime(stamp)


def _decode_meter_reading(node: etree._Element) -> MeterReading:
    r = NS_METER_READINGS
    meter = child(node, r, "Meter")
    usage_point = child(node, r, "UsagePoint")
    interval = child(node, r, "valuesInterval")
    values_interval = None
    if interval is not None:
        start, end = decode_interval(interval, r)
        if start is not None and end is not None:
            values_interval = (start, end)
    return MeterReading(
        meter=DeviceRef() if meter is None else decode_device(meter, r),
        readings=tuple(
            Reading(
                reading_type=child(reading, r, "ReadingType").get("ref", ""),
                value=_decode_value(child_text(reading, r, "value")),
                timestamp=_reading_timestamp(reading),
                qualities=_qualities(reading),
            )
            for reading in children(node, r, "Readings")
        ),
        interval_blocks=tuple(
            IntervalBlock(
                reading_type=child(block, r, "ReadingType").get("ref", ""),
                readings=tuple(
                    IntervalReading(
                        timestamp=_reading_timestamp(interval_reading),
                        value=_decode_value(child_text(interval_reading, r, "value")),
                        qualities=_qualities(interval_reading),
                    )
                    for interval_reading in children(block, r, "IntervalReadings")
                ),
            )
            for block in children(node, r, "IntervalBlocks")
        ),
        values_interval=values_interval,
        usage_point=None if usage_point is None else decode_device(usage_point, r),
    )


def decode_meter_readings_response(element: etree._Element) -> MeterReadingsResponse:
    """The response in the GetMeterReadingsMessage:MeterReadingsResponseMessage ``element``, validated first."""
    expect_root(element, NS_GET_METER_READINGS_MESSAGE, "MeterReadingsResponseMessage")
    validate(element, MESSAGE_SCHEMA)
    wrapper = NS_GET_METER_READINGS_MESSAGE
    payload = child(element, wrapper, "Payload")
    readings = None if payload is None else child(payload, NS_METER_READINGS, "MeterReadings")
    return MeterReadingsResponse(
        header=decode_header(child(element, wrapper, "Header")),
        reply=decode_reply(child(element, wrapper, "Reply")),
        meter_readings=()
        if readings is None
        else tuple(_decode_meter_reading(n) for n in children(readings, NS_METER_READINGS, "MeterReading")),
    )


def decode_fault(element: etree._Element) -> Reply:
    """The Reply in the GetMeterReadingsMessage:MeterReadingsFaultMessage ``element``, validated first."""
    expect_root(element, NS_GET_METER_READINGS_MESSAGE, "MeterReadingsFaultMessage")
    validate(element, MESSAGE_SCHEMA)
    return decode_reply(child(element, NS_GET_METER_READINGS_MESSAGE, "Reply"))
