"""The 61968-100 envelope in XML: Header, Reply, Error and ID, and the IdentifiedObject parts
(Names, references by mRID) every noun's profile shares. Used by each noun's codec module."""

from __future__ import annotations

import re
from datetime import datetime

from lxml import etree

from cimhes.cim.codec.document import (
    child,
    child_text,
    children,
    optional_datetime,
    optional_element,
    parse_boolean,
    qname,
    sub_element,
)
from cimhes.cim.message import Error, Header, ObjectId, Reply, Verb
from cimhes.cim.meter_readings import DeviceRef, Name

NS_MESSAGE = "http://iec.ch/TC57/2011/schema/message"


def decode_header(element: etree._Element) -> Header:
    m = NS_MESSAGE
    user = child(element, m, "User")
    return Header(
        verb=Verb(child_text(element, m, "Verb").strip()),
        noun=child_text(element, m, "Noun"),
        revision=child_text(element, m, "Revision"),
        context=child_text(element, m, "Context"),
        timestamp=optional_datetime(element, m, "Timestamp"),
        source=child_text(element, m, "Source"),
        async_reply=parse_boolean(child_text(element, m, "AsyncReplyFlag")),
        reply_address=child_text(element, m, "ReplyAddress"),
        ack_required=parse_boolean(child_text(element, m, "AckRequired")),
        user_id=None if user is None else child_text(user, m, "UserID"),
        organization=None if user is None else child_text(user, m, "Organization"),
        message_id=child_text(element, m, "MessageID"),
        correlation_id=child_text(element, m, "CorrelationID"),
        comment=child_text(element, m, "Comment"),
        properties=tuple(
            (child_text(p, m, "Name"), child_text(p, m, "Value")) for p in children(element, m, "Property")
        ),
    )


def decode_names(element: etree._Element, namespace: str) -> tuple[Name, ...]:
    names = []
    for node in children(element, namespace, "Names"):
        name_type = child(node, namespace, "NameType")
        names.append(
            Name(
                name=child_text(node, namespace, "name"),
                name_type=None if name_type is None else child_text(name_type, namespace, "name"),
            )
        )
    return tuple(names)


def decode_device(element: etree._Element, namespace: str) -> DeviceRef:
    mrid = child_text(element, namespace, "mRID")
    return DeviceRef(mrid=None if mrid is None else mrid.strip(), names=decode_names(element, namespace))


def decode_interval(element: etree._Element, namespace: str) -> tuple[datetime | None, datetime | None]:
    return (
        optional_datetime(element, namespace, "start"),
        optional_datetime(element, namespace, "end"),
    )


def encode_header(parent: etree._Element, namespace: str, header: Header) -> None:
    m = NS_MESSAGE
    node = sub_element(parent, namespace, "Header")
    sub_element(node, m, "Verb", header.verb.value)
    sub_element(node, m, "Noun", header.noun)
    optional_element(node, m, "Revision", header.revision)
    optional_element(node, m, "Context", header.context)
    optional_element(node, m, "Timestamp", header.timestamp)
    optional_element(node, m, "Source", header.source)
    optional_element(node, m, "AsyncReplyFlag", header.async_reply)
    optional_element(node, m, "ReplyAddress", header.reply_address)
    optional_element(node, m, "AckRequired", header.ack_required)
    if header.user_id is not None:
        user = sub_element(node, m, "User")
        sub_element(user, m, "UserID", header.user_id)
        optional_element(user, m, "Organization", header.organization)
    optional_element(node, m, "MessageID", header.message_id)
    optional_element(node, m, "CorrelationID", header.correlation_id)
    optional_element(node, m, "Comment", header.comment)
    for name, value in header.properties:
        prop = sub_element(node, m, "Property")
        sub_element(prop, m, "Name", name)
        optional_element(prop, m, "Value", value)


_CLARK = re.compile(r"\{([^}]*)\}(.+)")


def encode_id(parent: etree._Element, local: str, value: str, kind, object_type, id_type=None, authority=None) -> None:
    node = sub_element(parent, NS_MESSAGE, local, value)
    for attribute, attribute_value in (
        ("idType", id_type),
        ("idAuthority", authority),
        ("kind", None if kind is None else kind.value),
        ("objectType", object_type),
    ):
        if attribute_value is not None:
            node.set(attribute, attribute_value)


def encode_error(parent: etree._Element, error: Error) -> None:
    m = NS_MESSAGE
    node = sub_element(parent, m, "Error")
    sub_element(node, m, "code", error.code)
    sub_element(node, m, "level", error.level.value)
    optional_element(node, m, "reason", error.reason)
    optional_element(node, m, "details", error.details)
    if error.xpath is not None:
        # xs:QName: a prefixed name whose prefix is declared right here, on the element itself.
        match = _CLARK.fullmatch(error.xpath)
        # lxml drops a declaration no tag uses when the tree is moved into the SOAP envelope, and
        # reuses the prefix in scope for a namespace declared twice: so take that prefix if any.
        in_scope = match and match.group(1) and next(
            (p for p, ns in node.nsmap.items() if p and ns == match.group(1)), None)
        if in_scope:
            sub_element(node, m, "xpath", f"{in_scope}:{match.group(2)}")
        elif match and match.group(1):
            xpath_node = etree.SubElement(node, qname(m, "xpath"), nsmap={"e": match.group(1)})
            xpath_node.text = f"e:{match.group(2)}"
        else:
            sub_element(node, m, "xpath", match.group(2) if match else error.xpath)
    if error.id is not None:
        encode_id(node, "ID", error.id, error.id_kind, error.object_type)


def encode_reply(parent: etree._Element, namespace: str, reply: Reply) -> None:
    node = sub_element(parent, namespace, "Reply")
    sub_element(node, NS_MESSAGE, "Result", reply.result.value)
    for error in reply.errors:
        encode_error(node, error)
    for object_id in reply.ids:
        encode_id(node, "ID", object_id.value, object_id.kind, object_id.object_type, object_id.id_type, object_id.id_authority)


def encode_response_message(namespace: str, prefix: str, local: str, header: Header,
                            reply: Reply) -> etree._Element:
    """`local` (e.g. MeterReadingsResponseMessage) in `namespace` with Header and Reply, no
    Payload: what a receiver of an event message (Created...) answers with, for every noun."""
    root = etree.Element(qname(namespace, local), nsmap={"msg": NS_MESSAGE, prefix: namespace})
    encode_header(root, namespace, header)
    encode_reply(root, namespace, reply)
    return root


def encode_names(parent: etree._Element, namespace: str, names: tuple[Name, ...]) -> None:
    for name in names:
        node = sub_element(parent, namespace, "Names")
        sub_element(node, namespace, "name", name.name)
        if name.name_type is not None:
            name_type = sub_element(node, namespace, "NameType")
            sub_element(name_type, namespace, "name", name.name_type)


def encode_device(parent: etree._Element, namespace: str, local: str, device: DeviceRef) -> None:
    node = sub_element(parent, namespace, local)
    optional_element(node, namespace, "mRID", device.mrid)
    encode_names(node, namespace, device.names)


def decode_error(node: etree._Element) -> Error:
    m = NS_MESSAGE
    xpath = None
    xpath_node = child(node, m, "xpath")
    if xpath_node is not None and xpath_node.text:
        prefix, _, local = xpath_node.text.strip().rpartition(":")
        namespace = xpath_node.nsmap.get(prefix or None)
        xpath = f"{{{namespace}}}{local}" if namespace else local
    id_node = child(node, m, "ID")
    return Error(
        code=child_text(node, m, "code").strip(),
        level=(child_text(node, m, "level") or "FATAL").strip(),
        reason=child_text(node, m, "reason"),
        details=child_text(node, m, "details"),
        xpath=xpath,
        id=None if id_node is None else (id_node.text or ""),
        id_kind=None if id_node is None else id_node.get("kind"),
        object_type=None if id_node is None else id_node.get("objectType"),
    )


def decode_reply(node: etree._Element) -> Reply:
    m = NS_MESSAGE
    return Reply(
        result=child_text(node, m, "Result").strip(),
        errors=tuple(decode_error(e) for e in children(node, m, "Error")),
        ids=tuple(
            ObjectId(
                value=i.text or "",
                kind=i.get("kind"),
                object_type=i.get("objectType"),
                id_type=i.get("idType"),
                id_authority=i.get("idAuthority"),
            )
            for i in children(node, m, "ID")
        ),
    )
