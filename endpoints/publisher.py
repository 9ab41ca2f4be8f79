"""Publishing new readings and events to the MDMs that subscribed: CreatedMeterReadings through
their ReceiveMeterReadings service (``xsd/ReceiveMeterReadings.wsdl``) and CreatedEndDeviceEvents
through their ReceiveEndDeviceEvents service (``xsd/ReceiveEndDeviceEvents.wsdl``), posted with zeep.

Every message goes through the store's outbox first (``engine/publishing.py``): one row per
subscriber, delivered by a loop that retries a subscriber that is down with exponential backoff
(2 s, 4 s ... at most 10 min between attempts) and never drops a row. The loop starts with the
head-end and picks up what an earlier run left undelivered. Subscribers are the operator's
configuration (``--subscriber NAME=URL``); what they receive is every set of values cimhes read
from meters (on demand or to complete the store).
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone

from lxml import etree
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from cimhes.cim.codec import encode_created_meter_readings, parse_xml
from cimhes.cim.message import Header, Verb
from cimhes.endpoints.cim_client import CimPoster
from cimhes.engine import publishing
from cimhes.engine.store import StoreRunner

log = logging.getLogger(__name__)

RECEIVE_WSDL = "ReceiveMeterReadings.wsdl"
RECEIVE_OPERATION = "CreatedMeterReadings"
EVENTS_WSDL = "ReceiveEndDeviceEvents.wsdl"
EVENTS_OPERATION = "CreatedEndDeviceEvents"
SOURCE = "cimhes"


def parse_subscriber(text: str) -> tuple[str, str]:
    """NAME=URL (an http or https URL) as (name, url); ValueError otherwise."""
    name, sep, url = text.partition("=")
    if not sep or not name.strip() or not url.startswith(("http://", "https://")):
        raise ValueError(f"subscriber {text!r}: expected NAME=http(s)://host/path")
    return name.strip(), url.strip()


def _created_document(meter_readings, now: datetime) -> bytes:
    header = Header(verb=Verb.CREATED, noun="MeterReadings", timestamp=now, source=SOURCE,
                    message_id=str(uuid.uuid4()))
    return etree.tostring(encode_created_meter_readings(header, meter_readings), encoding="UTF-8")


class MdmPublisher:
    """Delivers the outbox rows of its subscribers through one Receive service: by default
    CreatedMeterReadings (ReceiveMeterReadings, rows queued by `publish`); with
    ``wsdl_file=EVENTS_WSDL, operation=EVENTS_OPERATION, destination=publishing.event_destination``
    CreatedEndDeviceEvents (ReceiveEndDeviceEvents, rows written with the events themselves)."""

    def __init__(self, reactor, store: StoreRunner, subscribers: Mapping[str, str],
                 session_factory: Callable, *, poll_interval: float = 1.0,
                 first_retry: timedelta = publishing.FIRST_RETRY,
                 now: Callable[[], datetime] | None = None, wsdl_file: str = RECEIVE_WSDL,
                 operation: str = RECEIVE_OPERATION,
                 destination: Callable[[str], str] = publishing.destination):
        self._reactor = reactor
        self._store = store
        self._subscribers = dict(subscribers)
        self._destinations = {destination(n): n for n in self._subscribers}
        self._poster = CimPoster(reactor, wsdl_file, operation, session_factory)
        self._first_retry = first_retry
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._loop = LoopingCall(self.deliver_due)
        self._loop.clock = reactor
        self._poll_interval = poll_interval
        self._delivering = False

    def start(self) -> None:
        if self._subscribers and not self._loop.running:
            self._loop.start(self._poll_interval, now=True).addErrback(
                lambda f: log.error("the publisher's loop stopped: %s", f.getTraceback()))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    @inlineCallbacks
    def publish(self, meter_readings):
        """Queue the readings for every subscriber (nothing when there are none)."""
        if not self._subscribers or not meter_readings:
            return 0
        now = self._now()
        document = yield deferToThread(_created_document, tuple(meter_readings), now)
        count = yield self._store.call(publishing.enqueue, self._store.store,
                                       list(self._subscribers),
                                       publishing.KIND_CREATED_METER_READINGS,
                                       document.decode("utf-8"), None, now)
        return count

    @inlineCallbacks
    def deliver_due(self):
        """One pass: post every due row; record each outcome."""
        if self._delivering:
            return
        self._delivering = True
        try:
            rows = yield self._store.call(publishing.due, self._store.store,
                                          list(self._destinations), self._now())
            for row in rows:
                name = self._destinations[row.destination]
                try:
                    answer = yield self._poster.post(self._subscribers[name],
                                                     parse_xml(row.payload.encode("utf-8")))
                    result = getattr(getattr(answer, "Reply", None), "Result", None)
                    if result not in (None, "OK", "PARTIAL"):
                        raise RuntimeError(f"{name} answered Result {result}")
                except Exception as exc:  # noqa: BLE001 (each failure is recorded and retried)
                    log.warning("publishing to %s (outbox %d, attempt %d) failed: %s", name,
                                row.id, row.attempts + 1, exc)
                    yield self._store.call(publishing.failed, self._store.store, row.id,
                                           row.attempts, f"{exc.__class__.__name__}: {exc}",
                                           self._now(), self._first_retry)
                else:
                    yield self._store.call(publishing.delivered, self._store.store, row.id,
                                           self._now())
        finally:
            self._delivering = False
