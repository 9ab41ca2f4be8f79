"""CIM EndDeviceEvent as plain Python: something a meter reported, typed by an EndDeviceEventType.

An EndDeviceEventType code has four parts, ``type.domain.subDomain.eventOrAction`` (IEC 61968-9
ed.2, EndDeviceEventType enumerations). The meter's own code stays with the event
(`device_code`), so an event the head-end cannot type is still kept, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

__all__ = ["EndDeviceEvent", "check_event_type"]

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
