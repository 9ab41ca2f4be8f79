"""CIM EndDeviceEvent as plain Python: something a meter reported, typed by an EndDeviceEventType.

An EndDeviceEventType code has four parts, ``type.domain.subDomain.eventOrAction`` (IEC 61968-9
ed.2, EndDeviceEventType enumerations). The meter's own code stays with the event
(`device_code`), so an event the head-end cannot type is still kept, never dropped.

`GetEndDeviceEvents` is the 'get EndDeviceEvents' request; an EndDeviceEventType in it may have
``*`` for any of its four parts (``3.26.*.*``: every power event of an electric meter).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

from cimhes.cim.message import Header, Reply

__all__ = ["EndDeviceEvent", "EndDeviceEventsResponse", "EventSource", "GetEndDeviceEvents",
           "check_event_type", "check_event_type_pattern", "event_type_matches"]

_EVENT_TYPE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")


def check_event_type(code: str) -> str:
    """`code` if it is a four-part EndDeviceEventType code, else ValueError."""
    if not isinstance(code, str) or not _EVENT_TYPE.fullmatch(code):
        raise ValueError(f"EndDeviceEventType {code!r} is not type.domain.subDomain.eventOrAction")
    return code


@dataclass(frozen=True)
class EndDeviceEvent:
    """One event of one meter.

    ``event_type``: the EndDeviceEventType code. ``device_code``: the meter's own identification
    of the event, e.g. ``"0.0.99.98.0.255:1"`` (event log and DLMS event code) or
    ``"0.0.97.98.0.255:bit 3"`` (alarm register bit): with the meter's mRID and the time it makes
    the event's identity, so the same event read from a log and received by push is one event.
    ``details``: (name, value) pairs (EndDeviceEventDetail).
    """

    device_mrid: str
    created: datetime
    event_type: str
    device_code: str
    reason: str
    details: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_event_type(self.event_type)
        if self.created.utcoffset() is None:
            raise ValueError(f"EndDeviceEvent.created must be timezone-aware, got {self.created!r}")
        object.__setattr__(self, "details", tuple((str(n), str(v)) for n, v in self.details))


# ------------------------------------------------------------------------------ the request

class EventSource(str, enum.Enum):
    """Where a GetEndDeviceEvents takes its events from: the request's Option ``DataSource``."""

    STORE = "store"  # what the store holds (pushes and earlier log reads): the default
    METER = "meter"  # the meters' event logs read over the window first, stored, then answered


# Request.Option names: the source, and which part of a reply split into several messages.
SOURCE_OPTION = "DataSource"
PAGE_OPTION = "Page"

_EVENT_TYPE_PATTERN = re.compile(r"(?:[0-9]+|\*)(?:\.(?:[0-9]+|\*)){3}")


def check_event_type_pattern(pattern: str) -> str:
    """`pattern` if it is a four-part EndDeviceEventType code in which any part may be ``*``
    (any value of that part), else ValueError."""
    if not isinstance(pattern, str) or not _EVENT_TYPE_PATTERN.fullmatch(pattern):
        raise ValueError(f"EndDeviceEventType {pattern!r} is not type.domain.subDomain."
                         "eventOrAction (each part a number, or * for any)")
    return pattern


def event_type_matches(pattern: str, code: str) -> bool:
    """Whether the EndDeviceEventType ``code`` is one ``pattern`` selects."""
    return all(p in ("*", c) for p, c in zip(pattern.split("."), code.split(".")))


@dataclass(frozen=True)
class GetEndDeviceEvents:
    """A 'get EndDeviceEvents' request: which meters (``meters``: DeviceRefs by mRID and/or
    Names; ``end_device_groups``), which event types (``event_types``: patterns, empty: all),
    when (``start`` <= createdDateTime <= ``end``, each optional), from where, which part."""

    header: Header
    meters: tuple = ()
    end_device_groups: tuple = ()
    event_types: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    source: EventSource = EventSource.STORE
    page: int = 1

    def __post_init__(self) -> None:
        for pattern in self.event_types:
            check_event_type_pattern(pattern)
        for value, what in ((self.start, "start"), (self.end, "end")):
            if value is not None and value.utcoffset() is None:
                raise ValueError(f"GetEndDeviceEvents {what} must be timezone-aware")


@dataclass(frozen=True)
class EndDeviceEventsResponse:
    """An EndDeviceEventsResponseMessage: Header, Reply and the events (one part of them)."""

    header: Header
    reply: Reply
    events: tuple[EndDeviceEvent, ...] = ()
