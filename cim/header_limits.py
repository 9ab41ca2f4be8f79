"""Length limits on the 61968-100 Header fields the schema leaves open (xs:string, unbounded).

A MessageID or Source is stored with every request and echoed in the reply, so an unbounded one
lets a caller write megabytes into the database per call. `check_header` refuses a Header with a
field past its limit (Reply.Error 1.4, the field's element in ``xpath``) before any work is done.
The limits match the store's columns where a field is stored, and leave ample room otherwise.
"""
from __future__ import annotations

from cimhes.cim.codec import NS_MESSAGE, DocumentTooLarge
from cimhes.cim.message import Header

# Header attribute -> (element name, most characters).
HEADER_FIELD_LIMITS: dict[str, tuple[str, int]] = {
    "noun": ("Noun", 64),
    "revision": ("Revision", 32),
    "context": ("Context", 128),
    "source": ("Source", 128),
    "message_id": ("MessageID", 128),
    "correlation_id": ("CorrelationID", 128),
    "user_id": ("UserID", 128),
    "organization": ("Organization", 128),
    "reply_address": ("ReplyAddress", 2048),
    "comment": ("Comment", 1024),
}
MAX_PROPERTIES = 32
MAX_PROPERTY_NAME = 128
MAX_PROPERTY_VALUE = 1024


def check_header(header: Header) -> None:
    """Raise DocumentTooLarge (1.4) naming the first Header field longer than its limit."""
    for attribute, (element, limit) in HEADER_FIELD_LIMITS.items():
        value = getattr(header, attribute)
        if value is not None and len(value) > limit:
            raise _too_long(element, len(value), limit)
    if len(header.properties) > MAX_PROPERTIES:
        raise DocumentTooLarge(
            f"Header has {len(header.properties)} Property elements; the limit is "
            f"{MAX_PROPERTIES}", element=f"{{{NS_MESSAGE}}}Property")
    for name, value in header.properties:
        if name is not None and len(name) > MAX_PROPERTY_NAME:
            raise _too_long("Name", len(name), MAX_PROPERTY_NAME, "Header.Property.Name")
        if value is not None and len(value) > MAX_PROPERTY_VALUE:
            raise _too_long("Value", len(value), MAX_PROPERTY_VALUE, "Header.Property.Value")


def _too_long(element: str, length: int, limit: int, shown: str | None = None) -> DocumentTooLarge:
    return DocumentTooLarge(
        f"{shown or 'Header.' + element} is {length} characters long; the limit is {limit}",
        element=f"{{{NS_MESSAGE}}}{element}")
