"""The IEC 61968-100 message envelope as plain Python: Header (verb, noun, correlation), Reply, Error.

Also the one table of Reply.Error codes cimhes uses (:class:`ErrorCode`). The XML form of these types
lives in :mod:`cimhes.cim.codec`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "Verb",
    "ReplyResult",
    "ErrorLevel",
    "ErrorCode",
    "IdKind",
    "Header",
    "Error",
    "ObjectId",
    "Reply",
    "reply_header",
]


class Verb(str, enum.Enum):
    """The 61968-100 Header.Verb values."""

    CANCEL = "cancel"
    CANCELED = "canceled"
    CHANGE = "change"
    CHANGED = "changed"
    CREATE = "create"
    CREATED = "created"
    CLOSE = "close"
    CLOSED = "closed"
    DELETE = "delete"
    DELETED = "deleted"
    GET = "get"
    REPLY = "reply"
    EXECUTE = "execute"
    EXECUTED = "executed"


class ReplyResult(str, enum.Enum):
    """Reply.Result: the whole request worked, part of it did, or none of it did."""

    OK = "OK"
    PARTIAL = "PARTIAL"
    FAILED = "FAILED"


class ErrorLevel(str, enum.Enum):
    """Reply.Error.level."""

    INFORM = "INFORM"
    WARNING = "WARNING"
    FATAL = "FATAL"
    CATASTROPHIC = "CATASTROPHIC"


class IdKind(str, enum.Enum):
    """The ``kind`` attribute of a 61968-100 ID element."""

    NAME = "name"
    UUID = "uuid"
    TRANSACTION = "transaction"
    OTHER = "other"


class ErrorCode(str, enum.Enum):
    """Reply.Error.code values cimhes sends, each with what it means. The one table of them.

    Codes follow the 61968-100 "category.detail" convention, the category being the first number:
    0 success or partial success, 1 the message itself (XML, envelope, schema), 2 the request's
    content (objects and parameters asked for), 3 too many (limits), 5 the head-end or the devices
    behind it, 7 security (authentication and authorisation).
    The individual assignments are cimhes's own (the IEC text was not at hand when they were made);
    clients should act on the category and read ``reason`` for the rest.
    """

    meaning: str

    def __new__(cls, code: str, meaning: str) -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member

    OK = "0.0", "no error"
    PARTIAL_RESULT = "0.2", "partial result: some of what was asked for is missing, see the other errors"
    MALFORMED_MESSAGE = "1.0", "the message is not well-formed XML"
    BAD_VERB = "1.1", "the Header.Verb is missing or not the one this operation takes"
    BAD_NOUN = "1.2", "the Header.Noun is missing or not the one this operation takes"
    SCHEMA_INVALID = "1.3", "the message does not validate against the operation's schema"
    MESSAGE_TOO_LARGE = "1.4", "the message is larger or nested deeper than the head-end accepts"
    FORBIDDEN_MARKUP = "1.5", "the message carries a DTD or entity declaration, which is refused"
    MISSING_PARAMETER = "2.1", "a required object or parameter is missing from the request"
    INVALID_PARAMETER = "2.2", "a parameter has a value the head-end cannot use"
    UNSUPPORTED_READING_TYPE = "2.3", "a requested reading type is not supported for the device"
    OBJECT_NOT_FOUND = "2.4", "a referenced object (device, usage point ...) is not known"
    UNSUPPORTED_REQUEST = "2.5", "the request asks for something this head-end does not do"
    # 3.1 and 3.2 are the 61968-100 "too many items" and "too many pending requests".
    TOO_MANY_OBJECTS = "3.1", "the request names more items (devices, readings) than one request may"
    TOO_MANY_PENDING = "3.2", ("too many requests of this caller pending, or in a rate limit's "
                               "window; retry later")
    CONTROL_RATE_LIMITED = "3.2", "(an alias of TOO_MANY_PENDING: a control rate limit)"
    NOT_AUTHENTICATED = "7.1", "no credentials, or credentials the head-end does not accept"
    NOT_AUTHORIZED = "7.2", "the authenticated user holds no role that allows this request"
    CLEARTEXT_PASSWORD_REFUSED = "7.3", "a clear-text password over plain HTTP from another host; use TLS"
    INTERNAL_ERROR = "5.0", "the head-end failed; the request may be retried"
    DEVICE_TIMEOUT = "5.1", "the device did not answer in time"
    DEVICE_UNREACHABLE = "5.2", "no connection could be made to the device"
    DEVICE_REFUSED = "5.3", "the device refused the association (e.g. wrong password)"
    DEVICE_PROTOCOL_ERROR = "5.4", "the device answered with something the head-end cannot use"


@dataclass(frozen=True)
class Header:
    """Header of a 61968-100 message: what it is (verb + noun) and how to route and correlate it.

    ``properties`` are (name, value) pairs (Header.Property); ``user_id``/``organization`` form
    Header.User.
    """

    verb: Verb
    noun: str
    timestamp: datetime | None = None
    source: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_address: str | None = None
    async_reply: bool | None = None
    user_id: str | None = None
    organization: str | None = None
    revision: str | None = None
    context: str | None = None
    comment: str | None = None
    properties: tuple[tuple[str, str | None], ...] = ()
    ack_required: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "verb", Verb(self.verb))
        object.__setattr__(self, "properties", tuple((name, value) for name, value in self.properties))
        if self.organization is not None and self.user_id is None:
            raise ValueError("Header.organization belongs to Header.User, which needs a user_id")


@dataclass(frozen=True)
class ObjectId:
    """A 61968-100 ID element: an identifier and what kind of identifier of what it is."""

    value: str
    kind: IdKind | None = None
    object_type: str | None = None
    id_type: str | None = None
    id_authority: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None:
            object.__setattr__(self, "kind", IdKind(self.kind))


# Error.xpath as this module takes it: "{namespace}local" or "local", local being an XML NCName.
_ELEMENT_NAME = re.compile(r"(\{[^{}]+\})?[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class Error:
    """One Reply.Error.

    ``xpath`` is an element name, not a path: the standard types it xs:QName. Give it as
    ``"{namespace}local"`` (or a bare local name); paths and line numbers go into ``details``.
    ``id``/``id_kind``/``object_type`` form Error.ID: the object the error is about (e.g. a meter's mRID).
    """

    code: str
    level: ErrorLevel = ErrorLevel.FATAL
    reason: str | None = None
    details: str | None = None
    xpath: str | None = None
    id: str | None = None
    id_kind: IdKind | None = None
    object_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", str(self.code.value if isinstance(self.code, ErrorCode) else self.code))
        object.__setattr__(self, "level", ErrorLevel(self.level))
        if self.id_kind is not None:
            object.__setattr__(self, "id_kind", IdKind(self.id_kind))
        if self.xpath is not None and not _ELEMENT_NAME.fullmatch(self.xpath):
            raise ValueError(
                f"Error.xpath is an element name ('{{namespace}}local' or 'local'), not {self.xpath!r}; "
                "put paths in Error.details"
            )
        if self.id is None and (self.id_kind is not None or self.object_type is not None):
            raise ValueError("Error.id_kind and Error.object_type describe Error.id, which is missing")


@dataclass(frozen=True)
class Reply:
    """Reply of a 61968-100 response or fault: the result and an Error per problem."""

    result: ReplyResult
    errors: tuple[Error, ...] = ()
    ids: tuple[ObjectId, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "result", ReplyResult(self.result))
        object.__setattr__(self, "errors", tuple(self.errors))
        object.__setattr__(self, "ids", tuple(self.ids))


def reply_header(request: Header, timestamp: datetime, source: str | None = None) -> Header:
    """The Header of the reply to a request with header ``request``.

    The reply keeps the request's noun and carries its CorrelationID (or, when it has none, its
    MessageID) so the requester can match the two.
    """
    return Header(
        verb=Verb.REPLY,
        noun=request.noun,
        timestamp=timestamp,
        source=source,
        correlation_id=request.correlation_id if request.correlation_id is not None else request.message_id,
    )
