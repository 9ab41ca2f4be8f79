"""XML codec for GetMeterReadings / MeterReadings messages: hardened parsing, schema validation, decode and encode.

Input from outside goes through :func:`parse_xml` (no DTD, no entities, no network, bounded size and
depth), then a ``decode_*`` function, which validates against the project's own schema before reading
anything. Every failure is a :class:`CodecError` carrying the Reply.Error ``code``, a ``reason``, and
where in the message it happened (``xpath``, ``line``), so the SOAP or AMQP door can answer with a
FAILED Reply or a fault (:meth:`CodecError.to_error`). Output is built by the ``encode_*`` functions
and is valid against the project's schemas and the standard's.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Iterator

from lxml import etree

from cimhes import xsd
from cimhes.cim.message import (
    Error,
    ErrorCode,
    Header,
    ObjectId,
    Reply,
    ReplyResult,
    Verb,
)
from cimhes.cim.meter_readings import (
    DeviceRef,
    GetMeterReadings,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    MeterReadingsResponse,
    Name,
    Reading,
)
from cimhes.cim.reading_type import ReadingType

__all__ = [
    "NS_MESSAGE",
    "NS_GET_METER_READINGS_MESSAGE",
    "NS_GET_METER_READINGS",
    "NS_METER_READINGS",
    "NS_SOAP11_ENVELOPE",
    "MESSAGE_SCHEMA",
    "MAX_DOCUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "CodecError",
    "MalformedXml",
    "HostileXml",
    "DocumentTooLarge",
    "SchemaInvalid",
    "BadVerb",
    "BadNoun",
    "InvalidRequest",
    "parse_xml",
    "soap_body",
    "validate",
    "decode_get_meter_readings",
    "encode_get_meter_readings",
    "encode_meter_readings_response",
    "decode_meter_readings_response",
    "encode_fault",
    "decode_fault",
]

NS_MESSAGE = "http://iec.ch/TC57/2011/schema/message"
NS_GET_METER_READINGS_MESSAGE = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
NS_GET_METER_READINGS = "http://iec.ch/TC57/2011/GetMeterReadings#"
NS_METER_READINGS = "http://iec.ch/TC57/2011/MeterReadings#"
NS_SOAP11_ENVELOPE = "http://schemas.xmlsoap.org/soap/envelope/"

# The schema holding the three GetMeterReadings wrappers (and, through imports, the rest).
MESSAGE_SCHEMA = "GetMeterReadingsMessage.xsd"

# Limits on a document from outside. A MeterReadings request is a few KiB and ten levels deep inside
# a SOAP envelope; these leave ample room while keeping parse cost and memory bounded.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
# Elements in one document: a request naming 10,000 devices by mRID has about 20,000. Building a
# tree of a million empty elements (4 MB) costs lxml 0.4 s or more of the thread parsing it.
MAX_ELEMENTS = 50_000

NOUN = "MeterReadings"

_PREFIXES = {
    "msg": NS_MESSAGE,
    "gmr": NS_GET_METER_READINGS_MESSAGE,
    "get": NS_GET_METER_READINGS,
    "mr": NS_METER_READINGS,
}


# ---------------------------------------------------------------------------------------------- errors


class CodecError(Exception):
    """A message that cannot be used, and why: ``code`` (Reply.Error.code), ``reason``, ``xpath``, ``line``.

    ``xpath`` is the path of the offending node in the received document (or None when the whole
    document is at fault), ``element`` its name as ``{namespace}local``.
    """

    code: str = ErrorCode.MALFORMED_MESSAGE.value

    def __init__(
        self,
        reason: str,
        *,
        xpath: str | None = None,
        line: int | None = None,
        element: str | None = None,
        code: ErrorCode | str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.xpath = xpath
        self.line = line or None
        self.element = element
        if code is not None:
            self.code = code.value if isinstance(code, ErrorCode) else code

    def __str__(self) -> str:
        where = self.where()
        return f"{self.reason} ({where})" if where else self.reason

    def where(self) -> str | None:
        """Where the problem is, for humans: the path and line, as far as known."""
        parts = []
        if self.xpath:
            parts.append(f"at {self.xpath}")
        if self.line:
            parts.append(f"line {self.line}")
        return ", ".join(parts) or None

    def to_error(self) -> Error:
        """This problem as a Reply.Error (path and line in ``details``, element name in ``xpath``)."""
        return Error(code=self.code, reason=self.reason, details=self.where(), xpath=self.element)


class MalformedXml(CodecError):
    """Not well-formed XML (or not bytes at all)."""

    code = ErrorCode.MALFORMED_MESSAGE.value


class HostileXml(CodecError):
    """XML using features refused from outside: DTDs, entity declarations or references."""

    code = ErrorCode.FORBIDDEN_MARKUP.value


class DocumentTooLarge(HostileXml):
    """A document over the size or nesting-depth limit."""

    code = ErrorCode.MESSAGE_TOO_LARGE.value


class SchemaInvalid(CodecError):
    """Well-formed XML that is not the expected message or does not validate against its schema."""

    code = ErrorCode.SCHEMA_INVALID.value


class BadVerb(CodecError):
    """Header.Verb is not the one this operation takes."""

    code = ErrorCode.BAD_VERB.value


class BadNoun(CodecError):
    """Header.Noun is not the one this operation takes."""

    code = ErrorCode.BAD_NOUN.value


class InvalidRequest(CodecError):
    """A schema-valid request the head-end cannot act on (missing, invalid or unsupported parameter)."""

    code = ErrorCode.INVALID_PARAMETER.value


# --------------------------------------------------------------------------------------------- parsing


_HARDENED_OPTIONS = dict(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_comments=True,
    remove_pis=True,
    collect_ids=False,
)


def _hardened_parser() -> etree.XMLParser:
    # A new parser per document: lxml parsers are not safe to share between threads.
    return etree.XMLParser(**_HARDENED_OPTIONS)


def parse_xml(
    data: bytes, *, max_bytes: int = MAX_DOCUMENT_BYTES, max_depth: int = MAX_DEPTH,
    max_elements: int = MAX_ELEMENTS,
) -> etree._Element:
    """The root element of the XML document ``data``, parsed the way XML from outside must be.

    Refuses (HostileXml) any DTD or entity declaration or reference, (DocumentTooLarge) documents over
    ``max_bytes``, nested deeper than ``max_depth`` or holding more than ``max_elements`` elements,
    and (MalformedXml) anything that is not well-formed. Comments and processing instructions are
    dropped. Nothing is fetched.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedXml(f"an XML document is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise DocumentTooLarge(f"document is {len(data)} bytes; the limit is {max_bytes}")
    # Checked before parsing so that no declaration is ever processed; the checks after parsing catch
    # the same in encodings where these bytes do not appear literally (e.g. UTF-16).
    for marker in (b"<!DOCTYPE", b"<!ENTITY"):
        if marker in data:
            raise HostileXml(
                f"document contains {marker.decode()}: DTDs and entity declarations are refused",
                line=data[: data.index(marker)].count(b"\n") + 1,
            )
    try:
        # Every element needs a "<", so a document with few of them is parsed whole at once; any
        # other is parsed incrementally and refused as soon as it passes the element limit.
        if data.count(b"<") <= max_elements:
            root = etree.fromstring(data, _hardened_parser())
        else:
            root = _parse_counting(data, max_elements)
    except etree.XMLSyntaxError as exc:
        if "depth" in str(exc).lower():
            raise DocumentTooLarge(
                f"document is nested deeper than {max_depth} elements", line=exc.lineno
            ) from None
        raise MalformedXml(f"not well-formed XML: {exc.msg}", line=exc.lineno) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise HostileXml("document has a DOCTYPE: DTDs and entity declarations are refused")
    _check_tree(root, max_depth)
    return root


def _parse_counting(data: bytes, max_elements: int) -> etree._Element:
    """Parse in 64 KiB pieces, counting elements; DocumentTooLarge once past ``max_elements``
    (so a flood of tiny elements costs the parse of about ``max_elements`` of them, no more)."""
    parser = etree.XMLPullParser(events=("start",), **_HARDENED_OPTIONS)
    count = 0
    for offset in range(0, len(data), 65536):
        parser.feed(data[offset:offset + 65536])
        count += sum(1 for _ in parser.read_events())
        if count > max_elements:
            raise DocumentTooLarge(
                f"document has more than {max_elements} elements; the limit is {max_elements}")
    root = parser.close()
    count += sum(1 for _ in parser.read_events())
    if count > max_elements:
        raise DocumentTooLarge(
            f"document has more than {max_elements} elements; the limit is {max_elements}")
    return root


def _check_tree(root: etree._Element, max_depth: int) -> None:
    stack: list[tuple[etree._Element, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, etree._Entity):
            raise HostileXml(
                f"document uses entity {node.text}: entities are refused",
                xpath=_path(node.getparent()),
                line=node.sourceline,
            )
        if depth > max_depth:
            raise DocumentTooLarge(
                f"document is nested deeper than {max_depth} elements",
                xpath=_path(node),
                line=node.sourceline,
            )
        stack.extend((child, depth + 1) for child in node)


def soap_body(envelope: etree._Element) -> etree._Element:
    """The one element inside the Body of the SOAP 1.1 ``envelope`` (e.g. the GetMeterReadings message)."""
    if envelope.tag != f"{{{NS_SOAP11_ENVELOPE}}}Envelope":
        raise SchemaInvalid(
            f"expected a SOAP 1.1 Envelope, got {envelope.tag}", xpath=_path(envelope), element=envelope.tag
        )
    body = envelope.find(f"{{{NS_SOAP11_ENVELOPE}}}Body")
    children = [] if body is None else list(_children(body))
    if len(children) != 1:
        raise SchemaInvalid(
            f"a SOAP Body must hold exactly one message element, found {len(children)}",
            xpath=_path(body if body is not None else envelope),
        )
    return children[0]


# ---------------------------------------------------------------------------------------- validation


def validate(element: etree._Element, schema_name: str = MESSAGE_SCHEMA) -> None:
    """Check ``element`` (a whole message, e.g. MeterReadingsResponseMessage) against the project's schema.

    Raises SchemaInvalid naming the first problem, its path and line.
    """
    schema = xsd.schema(schema_name)
    if schema.validate(element):
        return
    first = schema.error_log[0]
    base = _path(element)
    relative = first.path or ""
    # lxml reports paths relative to the validated element; make them absolute in the document.
    path = base + relative[relative.find("/", 1):] if relative.count("/") > 1 else base
    raise SchemaInvalid(
        f"message is not valid against {schema_name}: {first.message}",
        xpath=path,
        line=first.line or None,
    )


# ------------------------------------------------------------------------------------ decode: helpers


def _q(namespace: str, local: str) -> str:
    return f"{{{namespace}}}{local}"


def _path(node: etree._Element | None) -> str | None:
    if node is None:
        return None
    return node.getroottree().getpath(node)


def _children(element: etree._Element, namespace: str | None = None, local: str | None = None) -> Iterator[etree._Element]:
    for child in element:
        if not isinstance(child.tag, str):  # comments, PIs, entities of trees not from parse_xml
            continue
        if namespace is None or child.tag == _q(namespace, local):
            yield child


def _child(element: etree._Element, namespace: str, local: str) -> etree._Element | None:
    return next(_children(element, namespace, local), None)


def _text(element: etree._Element, namespace: str, local: str) -> str | None:
    child = _child(element, namespace, local)
    return None if child is None else (child.text or "")


def _bad(reason: str, node: etree._Element, code: ErrorCode = ErrorCode.INVALID_PARAMETER) -> InvalidRequest:
    return InvalidRequest(reason, xpath=_path(node), line=node.sourceline, element=node.tag, code=code)


def _datetime(node: etree._Element) -> datetime:
    text = (node.text or "").strip()
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(f"{text!r} is not a date-time this head-end can use", node) from None
    # xs:dateTime may omit the zone; 61968-9 systems exchange UTC, so an unzoned time is taken as UTC.
    return value if value.utcoffset() is not None else value.replace(tzinfo=timezone.utc)


def _optional_datetime(element: etree._Element, namespace: str, local: str) -> datetime | None:
    node = _child(element, namespace, local)
    return None if node is None else _datetime(node)


def _boolean(text: str | None) -> bool | None:
    return None if text is None else text.strip() in ("true", "1")


def _decode_header(element: etree._Element) -> Header:
    m = NS_MESSAGE
    user = _child(element, m, "User")
    return Header(
        verb=Verb(_text(element, m, "Verb").strip()),
        noun=_text(element, m, "Noun"),
        revision=_text(element, m, "Revision"),
        context=_text(element, m, "Context"),
        timestamp=_optional_datetime(element, m, "Timestamp"),
        source=_text(element, m, "Source"),
        async_reply=_boolean(_text(element, m, "AsyncReplyFlag")),
        reply_address=_text(element, m, "ReplyAddress"),
        ack_required=_boolean(_text(element, m, "AckRequired")),
        user_id=None if user is None else _text(user, m, "UserID"),
        organization=None if user is None else _text(user, m, "Organization"),
        message_id=_text(element, m, "MessageID"),
        correlation_id=_text(element, m, "CorrelationID"),
        comment=_text(element, m, "Comment"),
        properties=tuple(
            (_text(p, m, "Name"), _text(p, m, "Value")) for p in _children(element, m, "Property")
        ),
    )


def _decode_names(element: etree._Element, namespace: str) -> tuple[Name, ...]:
    names = []
    for node in _children(element, namespace, "Names"):
        name_type = _child(node, namespace, "NameType")
        names.append(
            Name(
                name=_text(node, namespace, "name"),
                name_type=None if name_type is None else _text(name_type, namespace, "name"),
            )
        )
    return tuple(names)


def _decode_device(element: etree._Element, namespace: str) -> DeviceRef:
    mrid = _text(element, namespace, "mRID")
    return DeviceRef(mrid=None if mrid is None else mrid.strip(), names=_decode_names(element, namespace))


def _decode_interval(element: etree._Element, namespace: str) -> tuple[datetime | None, datetime | None]:
    return (
        _optional_datetime(element, namespace, "start"),
        _optional_datetime(element, namespace, "end"),
    )


# ------------------------------------------------------------------------------ decode: the request

# Parts of the GetMeterReadings profile the head-end does not act on. Refused with a clear error rather
# than ignored, so a client never takes an answer to a narrower question for the one it asked.
_UNSUPPORTED_SELECTORS = ("EndDeviceGroup", "UsagePointGroup", "TransformerTank", "MeterReadings", "ReadingQuality")


def _expect_root(element: etree._Element, local: str) -> None:
    expected = _q(NS_GET_METER_READINGS_MESSAGE, local)
    if element.tag != expected:
        raise SchemaInvalid(
            f"expected the message element {expected}, got {element.tag}",
            xpath=_path(element),
            line=element.sourceline,
            element=element.tag if isinstance(element.tag, str) else None,
        )


def decode_get_meter_readings(element: etree._Element) -> GetMeterReadings:
    """The request in the GetMeterReadingsMessage:GetMeterReadings ``element``, validated first.

    The time window may be given in any of the three places the standard offers: Request
    StartTime/EndTime, GetMeterReadings/Reading/timePeriod, or GetMeterReadings/TimeSchedule/
    scheduleInterval; several are accepted when they agree.
    """
    _expect_root(element, "GetMeterReadings")
    validate(element)
    wrapper, m, g = NS_GET_METER_READINGS_MESSAGE, NS_MESSAGE, NS_GET_METER_READINGS

    header_node = _child(element, wrapper, "Header")
    header = _decode_header(header_node)
    if header.verb is not Verb.GET:
        verb_node = _child(header_node, m, "Verb")
        raise BadVerb(
            f"Header.Verb is {header.verb.value!r}; GetMeterReadings takes 'get'",
            xpath=_path(verb_node), line=verb_node.sourceline, element=verb_node.tag,
        )
    if header.noun.strip() != NOUN:
        noun_node = _child(header_node, m, "Noun")
        raise BadNoun(
            f"Header.Noun is {header.noun!r}; GetMeterReadings takes {NOUN!r}",
            xpath=_path(noun_node), line=noun_node.sourceline, element=noun_node.tag,
        )

    request = _child(element, wrapper, "Request")
    profile = _child(request, g, "GetMeterReadings")
    for local in _UNSUPPORTED_SELECTORS:
        node = _child(profile, g, local)
        if node is not None:
            raise _bad(f"GetMeterReadings/{local} is not supported by this head-end", node, ErrorCode.UNSUPPORTED_REQUEST)

    end_devices = tuple(_decode_reference(node, "EndDevice") for node in _children(profile, g, "EndDevice"))
    usage_points = tuple(_decode_reference(node, "UsagePoint") for node in _children(profile, g, "UsagePoint"))
    if not end_devices and not usage_points:
        raise _bad("the request names no EndDevice and no UsagePoint", profile, ErrorCode.MISSING_PARAMETER)

    reading_types = []
    for node in _children(profile, g, "ReadingType"):
        mrid_node = _child(node, g, "mRID")
        if mrid_node is None:
            raise _bad("ReadingType must be given by its mRID (the 18-part code)", node, ErrorCode.UNSUPPORTED_REQUEST)
        try:
            reading_types.append(ReadingType.parse((mrid_node.text or "").strip()).mrid)
        except ValueError as exc:
            raise _bad(str(exc), mrid_node) from None

    start, end = _time_window(request, profile)
    reasons = [(_text(node, g, "reason") or "").strip() for node in _children(profile, g, "Reading")]
    return GetMeterReadings(
        header=header,
        end_devices=end_devices,
        usage_points=usage_points,
        reading_types=tuple(reading_types),
        start=start,
        end=end,
        reason=next((r for r in reasons if r), None),
    )


def _decode_reference(node: etree._Element, what: str) -> DeviceRef:
    ref = _decode_device(node, NS_GET_METER_READINGS)
    if not ref.mrid and not ref.names:
        raise _bad(f"{what} must have an mRID or a Names", node, ErrorCode.MISSING_PARAMETER)
    return ref


def _time_window(request: etree._Element, profile: etree._Element) -> tuple[datetime | None, datetime | None]:
    wrapper, g = NS_GET_METER_READINGS_MESSAGE, NS_GET_METER_READINGS
    windows: list[tuple[etree._Element, datetime | None, datetime | None]] = []
    start_time = _optional_datetime(request, wrapper, "StartTime")
    end_time = _optional_datetime(request, wrapper, "EndTime")
    if start_time is not None or end_time is not None:
        windows.append((request, start_time, end_time))
    for reading in _children(profile, g, "Reading"):
        period = _child(reading, g, "timePeriod")
        if period is not None:
            windows.append((period, *_decode_interval(period, g)))
    for schedule in _children(profile, g, "TimeSchedule"):
        interval = _child(schedule, g, "scheduleInterval")
        windows.append((interval, *_decode_interval(interval, g)))
    if not windows:
        return None, None
    node, start, end = windows[0]
    for other_node, other_start, other_end in windows[1:]:
        if (other_start, other_end) != (start, end):
            raise _bad(
                f"the request gives two different time windows: {start}..{end} at {_path(node)} "
                f"and {other_start}..{other_end}",
                other_node,
            )
    if start is not None and end is not None and start > end:
        raise _bad(f"the time window starts ({start}) after it ends ({end})", node)
    return start, end


# ------------------------------------------------------------------------------------ encode: helpers


def _format_datetime(value: datetime) -> str:
    if value.utcoffset() is None:
        raise ValueError(f"date-times sent out must be timezone-aware, got {value!r}")
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _format_value(value: Decimal | str) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"a reading value must be a finite number, got {value}")
        return format(value, "f")
    return str(value)


def _sub(parent: etree._Element, namespace: str, local: str, text: str | None = None) -> etree._Element:
    node = etree.SubElement(parent, _q(namespace, local))
    if text is not None:
        node.text = text
    return node


def _optional(parent: etree._Element, namespace: str, local: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, datetime):
        text = _format_datetime(value)
    else:
        text = str(value)
    _sub(parent, namespace, local, text)


def _encode_header(parent: etree._Element, namespace: str, header: Header) -> None:
    m = NS_MESSAGE
    node = _sub(parent, namespace, "Header")
    _sub(node, m, "Verb", header.verb.value)
    _sub(node, m, "Noun", header.noun)
    _optional(node, m, "Revision", header.revision)
    _optional(node, m, "Context", header.context)
    _optional(node, m, "Timestamp", header.timestamp)
    _optional(node, m, "Source", header.source)
    _optional(node, m, "AsyncReplyFlag", header.async_reply)
    _optional(node, m, "ReplyAddress", header.reply_address)
    _optional(node, m, "AckRequired", header.ack_required)
    if header.user_id is not None:
        user = _sub(node, m, "User")
        _sub(user, m, "UserID", header.user_id)
        _optional(user, m, "Organization", header.organization)
    _optional(node, m, "MessageID", header.message_id)
    _optional(node, m, "CorrelationID", header.correlation_id)
    _optional(node, m, "Comment", header.comment)
    for name, value in header.properties:
        prop = _sub(node, m, "Property")
        _sub(prop, m, "Name", name)
        _optional(prop, m, "Value", value)


_CLARK = re.compile(r"\{([^}]*)\}(.+)")


def _encode_id(parent: etree._Element, local: str, value: str, kind, object_type, id_type=None, authority=None) -> None:
    node = _sub(parent, NS_MESSAGE, local, value)
    for attribute, attribute_value in (
        ("idType", id_type),
        ("idAuthority", authority),
        ("kind", None if kind is None else kind.value),
        ("objectType", object_type),
    ):
        if attribute_value is not None:
            node.set(attribute, attribute_value)


def _encode_error(parent: etree._Element, error: Error) -> None:
    m = NS_MESSAGE
    node = _sub(parent, m, "Error")
    _sub(node, m, "code", error.code)
    _sub(node, m, "level", error.level.value)
    _optional(node, m, "reason", error.reason)
    _optional(node, m, "details", error.details)
    if error.xpath is not None:
        # xs:QName: a prefixed name whose prefix is declared right here, on the element itself.
        match = _CLARK.fullmatch(error.xpath)
        # lxml drops a declaration no tag uses when the tree is moved into the SOAP envelope, and
        # reuses the prefix in scope for a namespace declared twice: so take that prefix if any.
        in_scope = match and match.group(1) and next(
            (p for p, ns in node.nsmap.items() if p and ns == match.group(1)), None)
        if in_scope:
            _sub(node, m, "xpath", f"{in_scope}:{match.group(2)}")
        elif match and match.group(1):
            qname = etree.SubElement(node, _q(m, "xpath"), nsmap={"e": match.group(1)})
            qname.text = f"e:{match.group(2)}"
        else:
            _sub(node, m, "xpath", match.group(2) if match else error.xpath)
    if error.id is not None:
        _encode_id(node, "ID", error.id, error.id_kind, error.object_type)


def _encode_reply(parent: etree._Element, namespace: str, reply: Reply) -> None:
    node = _sub(parent, namespace, "Reply")
    _sub(node, NS_MESSAGE, "Result", reply.result.value)
    for error in reply.errors:
        _encode_error(node, error)
    for object_id in reply.ids:
        _encode_id(node, "ID", object_id.value, object_id.kind, object_id.object_type, object_id.id_type, object_id.id_authority)


def _encode_names(parent: etree._Element, namespace: str, names: tuple[Name, ...]) -> None:
    for name in names:
        node = _sub(parent, namespace, "Names")
        _sub(node, namespace, "name", name.name)
        if name.name_type is not None:
            name_type = _sub(node, namespace, "NameType")
            _sub(name_type, namespace, "name", name.name_type)


def _encode_device(parent: etree._Element, namespace: str, local: str, device: DeviceRef) -> None:
    node = _sub(parent, namespace, local)
    _optional(node, namespace, "mRID", device.mrid)
    _encode_names(node, namespace, device.names)


def _encode_qualities(parent: etree._Element, qualities: tuple[str, ...]) -> None:
    for quality in qualities:
        node = _sub(parent, NS_METER_READINGS, "ReadingQualities")
        _sub(node, NS_METER_READINGS, "ReadingQualityType").set("ref", quality)


def _message_root(local: str) -> etree._Element:
    return etree.Element(_q(NS_GET_METER_READINGS_MESSAGE, local), nsmap=_PREFIXES)


# ----------------------------------------------------------------------------------- encode: messages


def encode_get_meter_readings(request: GetMeterReadings) -> etree._Element:
    """The GetMeterReadingsMessage:GetMeterReadings element for ``request`` (window in Request Start/EndTime)."""
    wrapper, g = NS_GET_METER_READINGS_MESSAGE, NS_GET_METER_READINGS
    root = _message_root("GetMeterReadings")
    _encode_header(root, wrapper, request.header)
    request_node = _sub(root, wrapper, "Request")
    _optional(request_node, wrapper, "StartTime", request.start)
    _optional(request_node, wrapper, "EndTime", request.end)
    profile = _sub(request_node, g, "GetMeterReadings")
    for device in request.end_devices:
        _encode_device(profile, g, "EndDevice", device)
    if request.reason is not None:
        _sub(_sub(profile, g, "Reading"), g, "reason", request.reason)
    for code in request.reading_types:
        _sub(_sub(profile, g, "ReadingType"), g, "mRID", ReadingType.parse(code).mrid)
    for usage_point in request.usage_points:
        _encode_device(profile, g, "UsagePoint", usage_point)
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
    node = _sub(parent, r, "MeterReading")
    for block in meter_reading.interval_blocks:
        block_node = sub(node, _TAG_INTERVAL_BLOCKS)
        for interval in block.readings:
            interval_node = sub(block_node, _TAG_INTERVAL_READINGS)
            stamp = stamps.get(interval.timestamp)
            if stamp is None:
                stamp = stamps[interval.timestamp] = _format_datetime(interval.timestamp)
            sub(interval_node, _TAG_TIME_STAMP).text = stamp
            sub(interval_node, _TAG_VALUE).text = _format_value(interval.value)
            if interval.qualities:
                _encode_qualities(interval_node, interval.qualities)
        sub(block_node, _TAG_READING_TYPE).set("ref", block.reading_type)
    _encode_device(node, r, "Meter", meter_reading.meter)
    for reading in meter_reading.readings:
        reading_node = _sub(node, r, "Readings")
        _sub(reading_node, r, "timeStamp", _format_datetime(reading.timestamp))
        _sub(reading_node, r, "value", _format_value(reading.value))
        _encode_qualities(reading_node, reading.qualities)
        _sub(reading_node, r, "ReadingType").set("ref", reading.reading_type)
    if meter_reading.values_interval is not None:
        start, end = meter_reading.values_interval
        interval = _sub(node, r, "valuesInterval")
        _sub(interval, r, "end", _format_datetime(end))
        _sub(interval, r, "start", _format_datetime(start))


_TAG_INTERVAL_BLOCKS = f"{{{NS_METER_READINGS}}}IntervalBlocks"
_TAG_INTERVAL_READINGS = f"{{{NS_METER_READINGS}}}IntervalReadings"
_TAG_TIME_STAMP = f"{{{NS_METER_READINGS}}}timeStamp"
_TAG_VALUE = f"{{{NS_METER_READINGS}}}value"
_TAG_READING_TYPE = f"{{{NS_METER_READINGS}}}ReadingType"


def encode_meter_readings_response(response: MeterReadingsResponse) -> etree._Element:
    """The GetMeterReadingsMessage:MeterReadingsResponseMessage element for ``response``.

    The payload lists each MeterReading and, after them, one ReadingType per code used (mRID plus
    the Names the schema requires, named by the code). The Payload is left out of a FAILED reply
    that carries no readings.
    """
    wrapper, r = NS_GET_METER_READINGS_MESSAGE, NS_METER_READINGS
    root = _message_root("MeterReadingsResponseMessage")
    _encode_header(root, wrapper, response.header)
    _encode_reply(root, wrapper, response.reply)
    if response.meter_readings or response.reply.result is not ReplyResult.FAILED:
        readings = _sub(_sub(root, wrapper, "Payload"), r, "MeterReadings")
        stamps: dict[datetime, str] = {}
        for meter_reading in response.meter_readings:
            _encode_meter_reading(readings, meter_reading, stamps)
        for code in _reading_types_used(response.meter_readings):
            reading_type = _sub(readings, r, "ReadingType")
            _sub(reading_type, r, "mRID", code)
            _sub(_sub(reading_type, r, "Names"), r, "name", code)
    return root


def encode_fault(reply: Reply) -> etree._Element:
    """The GetMeterReadingsMessage:MeterReadingsFaultMessage element carrying ``reply``."""
    root = _message_root("MeterReadingsFaultMessage")
    _encode_reply(root, NS_GET_METER_READINGS_MESSAGE, reply)
    return root


# ------------------------------------------------------------------------------ decode: the replies


def _decode_error(node: etree._Element) -> Error:
    m = NS_MESSAGE
    xpath = None
    xpath_node = _child(node, m, "xpath")
    if xpath_node is not None and xpath_node.text:
        prefix, _, local = xpath_node.text.strip().rpartition(":")
        namespace = xpath_node.nsmap.get(prefix or None)
        xpath = f"{{{namespace}}}{local}" if namespace else local
    id_node = _child(node, m, "ID")
    return Error(
        code=_text(node, m, "code").strip(),
        level=(_text(node, m, "level") or "FATAL").strip(),
        reason=_text(node, m, "reason"),
        details=_text(node, m, "details"),
        xpath=xpath,
        id=None if id_node is None else (id_node.text or ""),
        id_kind=None if id_node is None else id_node.get("kind"),
        object_type=None if id_node is None else id_node.get("objectType"),
    )


def _decode_reply(node: etree._Element) -> Reply:
    m = NS_MESSAGE
    return Reply(
        result=_text(node, m, "Result").strip(),
        errors=tuple(_decode_error(e) for e in _children(node, m, "Error")),
        ids=tuple(
            ObjectId(
                value=i.text or "",
                kind=i.get("kind"),
                object_type=i.get("objectType"),
                id_type=i.get("idType"),
                id_authority=i.get("idAuthority"),
            )
            for i in _children(node, m, "ID")
        ),
    )


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
        _child(q, r, "ReadingQualityType").get("ref", "") for q in _children(node, r, "ReadingQualities")
    )


def _reading_timestamp(node: etree._Element) -> datetime:
    stamp = _child(node, NS_METER_READINGS, "timeStamp")
    if stamp is None:
        raise _bad("a reading without timeStamp cannot be used", node, ErrorCode.MISSING_PARAMETER)
    return _datetime(stamp)


def _decode_meter_reading(node: etree._Element) -> MeterReading:
    r = NS_METER_READINGS
    meter = _child(node, r, "Meter")
    interval = _child(node, r, "valuesInterval")
    values_interval = None
    if interval is not None:
        start, end = _decode_interval(interval, r)
        if start is not None and end is not None:
            values_interval = (start, end)
    return MeterReading(
        meter=DeviceRef() if meter is None else _decode_device(meter, r),
        readings=tuple(
            Reading(
                reading_type=_child(reading, r, "ReadingType").get("ref", ""),
                value=_decode_value(_text(reading, r, "value")),
                timestamp=_reading_timestamp(reading),
                qualities=_qualities(reading),
            )
            for reading in _children(node, r, "Readings")
        ),
        interval_blocks=tuple(
            IntervalBlock(
                reading_type=_child(block, r, "ReadingType").get("ref", ""),
                readings=tuple(
                    IntervalReading(
                        timestamp=_reading_timestamp(interval_reading),
                        value=_decode_value(_text(interval_reading, r, "value")),
                        qualities=_qualities(interval_reading),
                    )
                    for interval_reading in _children(block, r, "IntervalReadings")
                ),
            )
            for block in _children(node, r, "IntervalBlocks")
        ),
        values_interval=values_interval,
    )


def decode_meter_readings_response(element: etree._Element) -> MeterReadingsResponse:
    """The response in the GetMeterReadingsMessage:MeterReadingsResponseMessage ``element``, validated first."""
    _expect_root(element, "MeterReadingsResponseMessage")
    validate(element)
    wrapper = NS_GET_METER_READINGS_MESSAGE
    payload = _child(element, wrapper, "Payload")
    readings = None if payload is None else _child(payload, NS_METER_READINGS, "MeterReadings")
    return MeterReadingsResponse(
        header=_decode_header(_child(element, wrapper, "Header")),
        reply=_decode_reply(_child(element, wrapper, "Reply")),
        meter_readings=()
        if readings is None
        else tuple(_decode_meter_reading(n) for n in _children(readings, NS_METER_READINGS, "MeterReading")),
    )


def decode_fault(element: etree._Element) -> Reply:
    """The Reply in the GetMeterReadingsMessage:MeterReadingsFaultMessage ``element``, validated first."""
    _expect_root(element, "MeterReadingsFaultMessage")
    validate(element)
    return _decode_reply(_child(element, NS_GET_METER_READINGS_MESSAGE, "Reply"))
