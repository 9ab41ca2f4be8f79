"""The XML ground every CIM noun's codec stands on: hardened parsing, schema validation, the errors.

Input from outside goes through :func:`parse_xml` (no DTD, no entities, no network, bounded size and
depth); a noun's ``decode_*`` function then validates against the project's own schema
(:func:`validate`) before reading anything. Every failure is a :class:`CodecError` carrying the
Reply.Error ``code``, a ``reason``, and where in the message it happened (``xpath``, ``line``), so the
SOAP or AMQP door can answer with a FAILED Reply or a fault (:meth:`CodecError.to_error`).
The small element helpers (``child``, ``sub_element`` ...) are shared by the noun modules.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterator

from lxml import etree

from cimhes import xsd
from cimhes.cim.message import Error, ErrorCase, ErrorCode

NS_SOAP11_ENVELOPE = "http://schemas.xmlsoap.org/soap/envelope/"
NS_SOAP12_ENVELOPE = "http://www.w3.org/2003/05/soap-envelope"

# Limits on a document from outside. A MeterReadings request is a few KiB and ten levels deep inside
# a SOAP envelope; these leave ample room while keeping parse cost and memory bounded.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
# Elements in one document: a request naming 10,000 devices by mRID has about 20,000. Building a
# tree of a million empty elements (4 MB) costs lxml 0.4 s or more of the thread parsing it.
MAX_ELEMENTS = 50_000


# ---------------------------------------------------------------------------------------------- errors


class CodecError(Exception):
    """A message that cannot be used, and why: ``code`` (Reply.Error.code), ``reason``, ``xpath``, ``line``.

    ``xpath`` is the path of the offending node in the received document (or None when the whole
    document is at fault), ``element`` its name as ``{namespace}local``.
    """

    code: ErrorCase | str = ErrorCode.MALFORMED_MESSAGE

    def __init__(
        self,
        reason: str,
        *,
        xpath: str | None = None,
        line: int | None = None,
        element: str | None = None,
        code: ErrorCase | str | None = None,
        object_id: str | None = None,
        object_type: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.xpath = xpath
        self.line = line or None
        self.element = element
        if code is not None:
            self.code = code
        # The object the problem concerns (Error.ID), e.g. the ReadingType whose mRID is bad.
        self.object_id = object_id
        self.object_type = object_type

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
        return Error(code=self.code, reason=self.reason, details=self.where(), xpath=self.element,
                     id=self.object_id, object_type=self.object_type)


class MalformedXml(CodecError):
    """Not well-formed XML (or not bytes at all)."""

    code = ErrorCode.MALFORMED_MESSAGE


class HostileXml(CodecError):
    """XML using features refused from outside: DTDs, entity declarations or references."""

    code = ErrorCode.FORBIDDEN_MARKUP


class DocumentTooLarge(HostileXml):
    """A document over the size or nesting-depth limit."""

    code = ErrorCode.MESSAGE_TOO_LARGE


class SchemaInvalid(CodecError):
    """Well-formed XML that is not the expected message or does not validate against its schema."""

    code = ErrorCode.SCHEMA_INVALID


class BadVerb(CodecError):
    """Header.Verb is not the one this operation takes."""

    code = ErrorCode.BAD_VERB


class BadNoun(CodecError):
    """Header.Noun is not the one this operation takes."""

    code = ErrorCode.BAD_NOUN


class InvalidRequest(CodecError):
    """A schema-valid request the head-end cannot act on (missing, invalid or unsupported parameter)."""

    code = ErrorCode.INVALID_PARAMETER


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
                xpath=path_of(node.getparent()),
                line=node.sourceline,
            )
        if depth > max_depth:
            raise DocumentTooLarge(
                f"document is nested deeper than {max_depth} elements",
                xpath=path_of(node),
                line=node.sourceline,
            )
        stack.extend((sub, depth + 1) for sub in node)


def soap_body(envelope: etree._Element) -> etree._Element:
    """The one element inside the Body of the SOAP 1.1 ``envelope`` (e.g. the GetMeterReadings message)."""
    if envelope.tag != f"{{{NS_SOAP11_ENVELOPE}}}Envelope":
        raise SchemaInvalid(
            f"expected a SOAP 1.1 Envelope, got {envelope.tag}", xpath=path_of(envelope), element=envelope.tag
        )
    body = envelope.find(f"{{{NS_SOAP11_ENVELOPE}}}Body")
    messages = [] if body is None else list(children(body))
    if len(messages) != 1:
        raise SchemaInvalid(
            f"a SOAP Body must hold exactly one message element, found {len(messages)}",
            xpath=path_of(body if body is not None else envelope),
        )
    return messages[0]


# ---------------------------------------------------------------------------------------- validation


def validate(element: etree._Element, schema_name: str) -> None:
    """Check ``element`` (a whole message, e.g. MeterReadingsResponseMessage) against the project's schema ``schema_name``.

    Raises SchemaInvalid naming the first problem, its path and line.
    """
    schema = xsd.schema(schema_name)
    if schema.validate(element):
        return
    first = schema.error_log[0]
    base = path_of(element)
    relative = first.path or ""
    # lxml reports paths relative to the validated element; make them absolute in the document.
    path = base + relative[relative.find("/", 1):] if relative.count("/") > 1 else base
    raise SchemaInvalid(
        f"message is not valid against {schema_name}: {first.message}",
        xpath=path,
        line=first.line or None,
    )


# ------------------------------------------------------------------------------------ reading XML


def qname(namespace: str, local: str) -> str:
    return f"{{{namespace}}}{local}"


def path_of(node: etree._Element | None) -> str | None:
    if node is None:
        return None
    return node.getroottree().getpath(node)


def children(element: etree._Element, namespace: str | None = None, local: str | None = None) -> Iterator[etree._Element]:
    for node in element:
        if not isinstance(node.tag, str):  # comments, PIs, entities of trees not from parse_xml
            continue
        if namespace is None or node.tag == qname(namespace, local):
            yield node


def child(element: etree._Element, namespace: str, local: str) -> etree._Element | None:
    return next(children(element, namespace, local), None)


def child_text(element: etree._Element, namespace: str, local: str) -> str | None:
    node = child(element, namespace, local)
    return None if node is None else (node.text or "")


def invalid(reason: str, node: etree._Element, code: ErrorCase = ErrorCode.INVALID_PARAMETER,
            **concerns: str) -> InvalidRequest:
    """InvalidRequest about ``node``; ``concerns`` may name the object (object_id, object_type)."""
    return InvalidRequest(reason, xpath=path_of(node), line=node.sourceline, element=node.tag, code=code,
                          **concerns)


def parse_datetime(node: etree._Element) -> datetime:
    text = (node.text or "").strip()
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(f"{text!r} is not a date-time this head-end can use", node) from None
    # xs:dateTime may omit the zone; 61968-9 systems exchange UTC, so an unzoned time is taken as UTC.
    return value if value.utcoffset() is not None else value.replace(tzinfo=timezone.utc)


def optional_datetime(element: etree._Element, namespace: str, local: str) -> datetime | None:
    node = child(element, namespace, local)
    return None if node is None else parse_datetime(node)


def parse_boolean(text: str | None) -> bool | None:
    return None if text is None else text.strip() in ("true", "1")


# ------------------------------------------------------------------------------------ building XML


def format_datetime(value: datetime) -> str:
    if value.utcoffset() is None:
        raise ValueError(f"date-times sent out must be timezone-aware, got {value!r}")
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def sub_element(parent: etree._Element, namespace: str, local: str, text: str | None = None) -> etree._Element:
    node = etree.SubElement(parent, qname(namespace, local))
    if text is not None:
        node.text = text
    return node


def optional_element(parent: etree._Element, namespace: str, local: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, datetime):
        text = format_datetime(value)
    else:
        text = str(value)
    sub_element(parent, namespace, local, text)


def expect_root(element: etree._Element, namespace: str, local: str) -> None:
    """Refuse (SchemaInvalid) an ``element`` that is not the message ``{namespace}local``."""
    expected = qname(namespace, local)
    if element.tag != expected:
        raise SchemaInvalid(
            f"expected the message element {expected}, got {element.tag}",
            xpath=path_of(element),
            line=element.sourceline,
            element=element.tag if isinstance(element.tag, str) else None,
        )
