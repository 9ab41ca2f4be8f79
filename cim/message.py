"""The IEC 61968-100 message envelope as plain Python: Header (verb, noun, correlation), Reply, Error.

Also the one table of Reply.Error codes cimhes uses (:class:`ErrorCode`, the IEC 61968-100 codes). The XML form of these types
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
    "ErrorCase",
    "STANDARD_CODES",
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


class ErrorCase(str):
    """One row of :class:`ErrorCode`: a situation cimhes reports, as the string of its IEC 61968-100
    Reply.Error code, with ``detail`` (cimhes's finer distinction, written at the head of
    Error.details; None when the standard's code says it all) and ``meaning``."""

    code: str
    detail: str | None
    meaning: str
    name: str

    def __new__(cls, code: str, detail: str | None, meaning: str) -> ErrorCase:
        if code not in STANDARD_CODES:
            raise ValueError(f"{code} is not one of the 61968-100 codes cimhes uses")
        row = str.__new__(cls, code)
        row.code, row.detail, row.meaning, row.name = code, detail, meaning, ""
        return row

    def __set_name__(self, owner, name: str) -> None:
        if not self.name:  # an alias keeps the name of the row it aliases
            self.name = name

    @property
    def value(self) -> str:
        """The code as sent in Reply.Error.code."""
        return self.code

    def __repr__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"<ErrorCode.{self.name}: {self.code}{detail}>"


# The IEC 61968-100:2013 Reply.Error codes cimhes sends, with the standard's meaning
# (../shared/design/REFERENCE-FACTS.md, "IEC 61968-100 Reply error codes": the ReplyError
# enumeration of the 2011 message schema's public bindings). The first digit is the category:
# 0 OK, 1 bad element, 2 invalid parameter, 3 too many, 4 aborted, 5 application error,
# 6 business rule, 7 security.
STANDARD_CODES: dict[str, str] = {
    "0.0": "no errors",
    "0.1": "partial result, more to follow in separate messages",
    "0.2": "partial result, none to follow",
    "0.3": "simple acknowledgment",
    "1.5": "mandatory Header elements missing",
    "1.6": "mandatory Request elements missing",
    "1.7": "mandatory Payload elements missing",
    "1.8": "schema validation failed",
    "1.9": "unsupported message revision in Header",
    "2.4": "invalid meter(s)",
    "2.5": "invalid noun",
    "2.6": "invalid ReadingType(s)",
    "2.9": "invalid verb",
    "2.10": "unsupported ReadingType(s)",
    "3.1": "too many items",
    "3.2": "too many pending requests",
    "4.1": "request timed out",
    # 5.1-5.9 in the order REFERENCE-FACTS.md lists them (high load, not attempted, attempted and
    # failed, multiple errors, data unavailable); check against the IEC text before relying on
    # the digit rather than the category.
    "5.1": "processing error: high load",
    "5.2": "processing error: not attempted",
    "5.3": "processing error: attempted and failed",
    "5.4": "processing error: multiple errors",
    "5.5": "processing error: data unavailable",
    # 7.1-7.7 are security; the meaning of each digit is cimhes's own assignment (the facts give
    # the range only).
    "7.1": "security: not authenticated",
    "7.2": "security: not authorised",
    "7.3": "security: credentials refused over an insecure channel",
}


class ErrorCode:
    """The one table of Reply.Error codes cimhes sends: each row is a situation, its exact
    61968-100 code (:data:`STANDARD_CODES`) and, where cimhes distinguishes more finely than the
    standard, a ``detail`` that leads Error.details (docs/errors.md lists them all).

    Rows compare equal to their code string (``ErrorCode.INVALID_METER == "2.4"``), so two
    situations sharing a code are told apart by ``detail``, never by a code of cimhes's own.
    """

    # -- 0: success
    OK = ErrorCase("0.0", None, "no error")
    MORE_TO_FOLLOW = ErrorCase("0.1", None, "partial result: this message is one part, more follow")
    PARTIAL_RESULT = ErrorCase("0.2", None, "partial result: some of what was asked for is missing, "
                                           "see the other errors; no more messages follow")
    ACKNOWLEDGED = ErrorCase("0.3", None, "request accepted; the outcome goes to the ReplyAddress")
    # -- 1: the message itself
    HEADER_MISSING = ErrorCase("1.5", None, "a mandatory Header element is missing")
    REPLY_ADDRESS_MISSING = ErrorCase("1.5", "reply-address-missing",
                                      "AsyncReplyFlag is true but the Header has no ReplyAddress")
    REQUEST_MISSING = ErrorCase("1.6", None, "a mandatory Request element is missing "
                                            "(e.g. no EndDevice, UsagePoint or group named)")
    TIME_WINDOW_MISSING = ErrorCase("1.6", "time-window-missing",
                                    "an interval ReadingType was asked without a time window")
    PAYLOAD_MISSING = ErrorCase("1.7", None, "a mandatory Payload element is missing "
                                            "(e.g. no EndDeviceControls in a control request)")
    CONTROL_PARAMETER_MISSING = ErrorCase("1.7", "control-parameter-missing",
                                          "a control lacks a parameter its type needs (e.g. a "
                                          "load limit without its threshold)")
    SCHEMA_INVALID = ErrorCase("1.8", None, "the message does not validate against the "
                                           "operation's schema")
    MALFORMED_MESSAGE = ErrorCase("1.8", "not-well-formed", "the message is not well-formed XML")
    FORBIDDEN_MARKUP = ErrorCase("1.8", "forbidden-markup",
                                 "the message carries a DTD or entity declaration, which is refused")
    INVALID_PARAMETER = ErrorCase("1.8", "unusable-value",
                                  "a schema-valid value the head-end cannot use (a date-time, two "
                                  "time windows that disagree, an option value)")
    UNKNOWN_CONTROL = ErrorCase("1.8", "unknown-control",
                                "the EndDeviceControl mRID to cancel names no control this "
                                "head-end scheduled")
    # -- 2: the request's objects
    INVALID_METER = ErrorCase("2.4", None, "the EndDevice is not known to this head-end")
    DEVICE_MISMATCH = ErrorCase("2.4", "mrid-names-mismatch",
                                "the EndDevice's mRID and Names point at different devices")
    UNKNOWN_USAGE_POINT = ErrorCase("2.4", "unknown-usage-point",
                                    "the UsagePoint is not known, or no meter served it in the window")
    UNKNOWN_GROUP = ErrorCase("2.4", "unknown-group", "the EndDeviceGroup is not known")
    INVALID_NOUN = ErrorCase("2.5", None, "the Header.Noun is not the one this operation takes")
    INVALID_READING_TYPE = ErrorCase("2.6", None, "a ReadingType mRID is not an 18-part code")
    INVALID_VERB = ErrorCase("2.9", None, "the Header.Verb is not the one this operation takes")
    UNSUPPORTED_READING_TYPE = ErrorCase("2.10", None, "a ReadingType the device cannot serve")
    # -- 3: too many
    TOO_MANY_ITEMS = ErrorCase("3.1", None, "the request asks for more objects than allowed")
    MESSAGE_TOO_LARGE = ErrorCase("3.1", "message-too-large",
                                  "the message is larger, deeper or has more elements than accepted")
    TOO_MANY_PENDING = ErrorCase("3.2", None, "too many requests pending; retry later")
    CONTROL_RATE_LIMITED = ErrorCase("3.2", "control-rate-limited",
                                     "too many controls of this kind in the limit's window")
    # -- 4: aborted
    TIMED_OUT = ErrorCase("4.1", None, "the synchronous answer's time limit passed")
    # -- 5: processing
    HIGH_LOAD = ErrorCase("5.1", "head-end-exhausted", "the head-end's own session limit was reached")
    UNSUPPORTED_REQUEST = ErrorCase("5.2", "not-supported",
                                    "the request asks for something this head-end does not do")
    UNKNOWN_CONTROL_TYPE = ErrorCase("5.2", "unknown-control-type",
                                     "the EndDeviceControlType is not one this head-end executes; "
                                     "nothing was attempted")
    CONTROL_NOT_CANCELLED = ErrorCase("5.2", "control-already-started",
                                      "the scheduled control had already started or finished on "
                                      "this device, so it was not cancelled")
    CONTROL_CANCELLED = ErrorCase("5.2", "control-cancelled",
                                  "the scheduled control was cancelled before it ran on this device")
    CONTROL_EXPIRED = ErrorCase("5.2", "control-expired",
                                "the control could not start within the allowed delay after its "
                                "time; nothing was sent to the device")
    INTERNAL_ERROR = ErrorCase("5.3", "internal", "the head-end failed; the request may be retried")
    INTERRUPTED = ErrorCase("5.3", "interrupted", "the head-end stopped while carrying out the "
                            "asynchronous request, as often as it re-runs one; not run again")
    DEVICE_TIMEOUT = ErrorCase("5.3", "device-timeout", "the device did not answer in time")
    DEVICE_UNREACHABLE = ErrorCase("5.3", "device-unreachable", "no connection to the device")
    DEVICE_REFUSED = ErrorCase("5.3", "association-refused",
                               "the device refused the association (e.g. wrong password)")
    DEVICE_PROTOCOL_ERROR = ErrorCase("5.3", "protocol-error",
                                      "the device answered with something the head-end cannot use")
    CONTROL_REFUSED = ErrorCase("5.3", "control-refused",
                                "the device refused the control (its action or set result), or "
                                "the read-back does not show it done")
    DATA_UNAVAILABLE = ErrorCase("5.5", None, "the data asked for is not available "
                                             "(not in the store, and not read from the meter)")
    # -- 7: security
    NOT_AUTHENTICATED = ErrorCase("7.1", None, "no credentials, or credentials not accepted")
    NOT_AUTHORIZED = ErrorCase("7.2", None, "the user holds no role that allows this request")
    REPLY_ADDRESS_REFUSED = ErrorCase("7.2", "reply-address-not-allowed",
                                      "the ReplyAddress is not on the operator's allow-list")
    CLEARTEXT_PASSWORD_REFUSED = ErrorCase("7.3", None, "a clear-text password over plain HTTP "
                                                        "from another host; use TLS")

    # Names kept for code written before the table followed the standard.
    BAD_VERB = INVALID_VERB
    BAD_NOUN = INVALID_NOUN
    MISSING_PARAMETER = REQUEST_MISSING
    OBJECT_NOT_FOUND = INVALID_METER
    TOO_MANY_OBJECTS = TOO_MANY_ITEMS

    @classmethod
    def rows(cls) -> list[ErrorCase]:
        """Every row once (aliases left out), in table order."""
        seen: dict[int, ErrorCase] = {}
        for value in vars(cls).values():
            if isinstance(value, ErrorCase):
                seen.setdefault(id(value), value)
        return list(seen.values())


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
        if isinstance(self.code, ErrorCase) and self.code.detail is not None:
            # cimhes's finer distinction leads the details, so a client can act on it.
            details = self.code.detail if not self.details else (
                self.details if self.details.startswith(self.code.detail)
                else f"{self.code.detail}: {self.details}")
            object.__setattr__(self, "details", details)
        object.__setattr__(self, "code", str(self.code.code if isinstance(self.code, ErrorCase) else self.code))
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
