"""Each new EndDeviceEvent, written to the store's outbox in the transaction that stores it.

`EventStore.save_events` (engine/events.py), the one way events are stored (log reads and
pushes alike), calls `write` with the events it actually inserted, in its own transaction: an
event and its outbox rows are committed together or not at all (a transactional outbox).

- For the DMS, one row per event (destination ``dms:amqp``): one 61968-100 EventMessage
  (EndDeviceEventsMessage:CreatedEndDeviceEvents, Verb created, Noun EndDeviceEvents) with its
  own MessageID (also in the row's ``correlation_id``), and its AMQP routing key in ``kind``
  (``EndDeviceEvents <routing key>``). The AMQP relay (cimhes.queue.events) publishes the rows
  and deletes each only once the broker confirmed it; without a broker they wait in the outbox.
- For each MDM event subscriber (``--event-subscriber NAME=URL``), one row per batch of at most
  ``EVENTS_PER_MESSAGE`` events (destination ``mdm-events:NAME``, kind CreatedEndDeviceEvents):
  the same EventMessage holding the batch, posted with zeep through ReceiveEndDeviceEvents by
  endpoints/publisher.py (retries with backoff, pending across restarts: engine/publishing.py).

Routing keys, ``<category>.<severity>.<EndDeviceEventType code>``, let a DMS bind by domain and
severity (docs/amqp.md): e.g. ``outage.critical.3.26.38.85`` (power down),
``restore.info.3.26.38.49`` (power up), ``voltage.minor.3.26.131.223``, ``tamper.major.3.12.29.212``,
``diagnostics.info.3.2.22.150``.
"""
from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from datetime import datetime

from lxml import etree
from sqlalchemy import insert

from cimhes.cim.codec.end_device_events import (
    NS_END_DEVICE_EVENTS_MESSAGE,
    encode_created_end_device_events,
)
from cimhes.cim.codec.envelope import NS_MESSAGE
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.cim.message import Header, Verb
from cimhes.engine import publishing
from cimhes.engine.store import OutboxMessage

DESTINATION = "dms:amqp"
# Events in one CreatedEndDeviceEvents to an MDM subscriber (a log read of many meters is split).
EVENTS_PER_MESSAGE = 1000
KIND_PREFIX = "EndDeviceEvents "
KIND_LENGTH = 64  # OutboxMessage.kind
SOURCE = "cimhes"

# EndDeviceEventType domain 26 (power): subdomain 38 is the supply itself, 131..133 the phases'
# voltage; eventOrAction 85 (failed / down) and 49 (up). Domain 12: security (tamper, access).
_OUTAGE, _RESTORE = "85", "49"
_MESSAGE_ID = f"{{{NS_END_DEVICE_EVENTS_MESSAGE}}}Header/{{{NS_MESSAGE}}}MessageID"


def category_and_severity(event_type: str) -> tuple[str, str]:
    """(category, severity) of an EndDeviceEventType code ``type.domain.subDomain.eventOrAction``."""
    _type, domain, sub_domain, action = event_type.split(".")
    if domain == "26" and sub_domain == "38":
        if action == _OUTAGE:
            return "outage", "critical"
        if action == _RESTORE:
            return "restore", "info"
    if domain == "26":
        return "voltage", "minor"
    if domain == "12":
        return "tamper", "major"
    return "diagnostics", "info"


def routing_key(event: EndDeviceEvent) -> str:
    category, severity = category_and_severity(event.event_type)
    return f"{category}.{severity}.{event.event_type}"


_routing_key = routing_key


def event_message(events: Sequence[EndDeviceEvent], message_id: str, now: datetime) -> bytes:
    """The CreatedEndDeviceEvents EventMessage reporting ``events``."""
    header = Header(verb=Verb.CREATED, noun="EndDeviceEvents", timestamp=now, source=SOURCE,
                    message_id=message_id)
    return etree.tostring(encode_created_end_device_events(header, list(events)),
                          xml_declaration=True, encoding="UTF-8")


def _one_each(events: Sequence[EndDeviceEvent], now: datetime) -> list[tuple[str, str]]:
    """(MessageID, EventMessage) for each event alone: the batch encoded by the codec once, each
    event's element then moved into a copy of the Header and Payload around it (the Header
    built once per batch, not once per event: under a storm this was half the store's work)."""
    if not events:
        return []
    batch = encode_created_end_device_events(
        Header(verb=Verb.CREATED, noun="EndDeviceEvents", timestamp=now, source=SOURCE,
               message_id="-"), list(events))
    container = batch[1][0]  # Payload / EndDeviceEvents
    elements = list(container)
    for element in elements:
        container.remove(element)
    messages = []
    for element in elements:
        message_id = str(uuid.uuid4())
        message = copy.deepcopy(batch)
        message.find(_MESSAGE_ID).text = message_id
        message[1][0].append(element)
        messages.append((message_id, etree.tostring(message, xml_declaration=True,
                                                    encoding="UTF-8").decode()))
    return messages


def write(session, events: Sequence[EndDeviceEvent], now: datetime,
          subscribers: Sequence[str] = (), routing_key: str | None = None) -> int:
    """Add the outbox rows reporting ``events`` to ``session`` (the caller's transaction): one
    per event for the DMS, one per batch and subscriber for the MDMs; how many rows.
    ``routing_key`` replaces the events' own (a feeder summary's, engine/feeder_outages.py)."""
    key_of = _routing_key if routing_key is None else (lambda _event: routing_key)
    rows = [_row(DESTINATION, (KIND_PREFIX + key_of(event))[:KIND_LENGTH], message_id, payload,
                 now) for event, (message_id, payload) in zip(events, _one_each(events, now))]
    for first in range(0, len(events), EVENTS_PER_MESSAGE) if subscribers else ():
        message_id = str(uuid.uuid4())
        payload = event_message(events[first:first + EVENTS_PER_MESSAGE], message_id, now).decode()
        rows.extend(_row(publishing.event_destination(name),
                         publishing.KIND_CREATED_END_DEVICE_EVENTS, message_id, payload, now)
                    for name in subscribers)
    if rows:
        # One Core INSERT of many rows: no ORM object (and no unit-of-work flush) per event.
        session.execute(insert(OutboxMessage.__table__), rows)
    return len(rows)


def _row(destination: str, kind: str, message_id: str, payload: str, now: datetime) -> dict:
    return {"destination": destination, "kind": kind, "correlation_id": message_id,
            "payload": payload, "created_at": now, "attempts": 0, "next_attempt_at": now}
