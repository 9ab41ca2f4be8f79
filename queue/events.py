"""Alarms to the DMS: the outbox relay that publishes stored EndDeviceEvents to ``cimhes.events``.

Each new event has an outbox row (engine/event_outbox.py) holding its EventMessage, MessageID
and routing key. `EventRelay`, while the broker connection is open, reads rows oldest first from
the store (off the reactor, through the StoreRunner) and publishes each to the topic exchange
``cimhes.events`` as a persistent message (delivery mode 2, ``message_id`` = the Header's
MessageID, ``mandatory``) on a channel in publisher-confirm mode, and deletes a row only once the
broker confirmed its message. The exchange has an alternate exchange (``cimhes.events.unrouted``,
with a durable queue), so a message no DMS queue is bound for is kept, not dropped.

Pipelined: up to ``max_in_flight`` messages (default 2,000) are unconfirmed at once. The relay
reads the next rows (those after the last one it published) while earlier confirms are still
coming (the broker confirms ranges of delivery tags at once, ``multiple``), and deletes confirmed
rows in groups, one statement for all that were confirmed meanwhile, in the store's bulk lane
(behind the event writes, which are on the alarms' way; the relay does not wait for it). (A row committed out of id
order, possible on PostgreSQL with several writing processes, is read at the next idle moment,
when the relay reads from the oldest row again.) A message the broker
refuses (nack) or that a closing channel leaves unconfirmed keeps its row: the relay waits for
what is in flight, then reads again from the oldest row left. With the broker down the rows wait
(and accumulate); when the connection is back, the relay resumes from the oldest. A crash between
confirm and delete can publish a message twice, always with the same MessageID, so a consumer
drops duplicates by it.
"""
from __future__ import annotations

import logging

import pika
from sqlalchemy import delete, func, select
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from cimhes.engine import event_outbox
from cimhes.engine.store import OutboxMessage
from cimhes.queue.topology import EVENTS_EXCHANGE, declare_events

log = logging.getLogger("cimhes.queue.events")

DEFAULT_BATCH = 500  # rows read from the outbox at a time (README, "Limits")
DEFAULT_MAX_IN_FLIGHT = 2000  # messages published and not yet confirmed (README, "Limits")
IDLE_POLL = 0.05  # s between looks at an empty outbox (an indexed query; bounds the added latency)

_TABLE = OutboxMessage.__table__


def _pending(store, after: int, limit: int):
    """Rows for the DMS with an id above ``after``, oldest first: (id, kind, MessageID, payload)."""
    with store.engine.connect() as connection:
        return connection.execute(
            select(_TABLE.c.id, _TABLE.c.kind, _TABLE.c.correlation_id, _TABLE.c.payload)
            .where(_TABLE.c.destination == event_outbox.DESTINATION, _TABLE.c.id > after)
            .order_by(_TABLE.c.id).limit(limit)).all()


def _delete(store, ids) -> None:
    with store.engine.begin() as connection:
        connection.execute(delete(_TABLE).where(_TABLE.c.id.in_(ids)))


def pending_count(store) -> int:
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(_TABLE).where(
            _TABLE.c.destination == event_outbox.DESTINATION)).scalar()


class EventRelay:
    def __init__(self, reactor, connection, store_runner, *, batch: int = DEFAULT_BATCH,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, on_confirmed=None):
        """``on_confirmed(message_id)``, if given, is called as the broker confirms each message
        (bench/amqp.py times the confirms with it)."""
        self._reactor = reactor
        self._runner = store_runner
        self._batch = batch
        self._max_in_flight = max(batch, max_in_flight)
        self._generation = 0
        self._stopped = False
        self._on_confirmed = on_confirmed
        self.counts = {"published": 0, "publish failures": 0}
        connection.on_open(self._opened)

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        self._generation += 1

    @inlineCallbacks
    def _opened(self, protocol):
        channel = yield protocol.channel()
        yield declare_events(channel)
        yield channel.confirm_delivery()
        self._generation += 1
        self._run(channel, self._generation)

    def _sleep(self, seconds):
        from twisted.internet.task import deferLater
        return deferLater(self._reactor, seconds, lambda: None)

    @inlineCallbacks
    def _run(self, channel, generation):
        state = _Flight(self._on_confirmed)
        while generation == self._generation and not self._stopped and channel.is_open:
            if state.failed:
                # Something was refused: let the rest settle, then start again from the oldest
                # row left (the confirmed ones are deleted first, so they are not sent again).
                yield state.settled()
                yield self._flushed(state)
                self.counts["publish failures"] += state.failed
                log.warning("%d events were not confirmed by the broker; they stay in the "
                            "outbox", state.failed)
                state = _Flight(self._on_confirmed)
                if channel.is_open:
                    yield self._sleep(1)
                continue
            room = self._max_in_flight - state.in_flight
            if room < self._batch // 2:
                yield state.room()  # fires as confirms come in
                continue
            try:
                rows = yield self._runner.call(_pending, self._runner.store, state.last,
                                               min(self._batch, room))
            except Exception as exc:  # noqa: BLE001 (the store is down: try again later)
                log.error("reading the event outbox failed: %s", exc)
                yield self._sleep(5)
                continue
            if not rows:
                self._flush(state)
                if not state.in_flight and not state.confirmed and state.deleting is None:
                    # Idle (nothing in flight, every confirmed row deleted): read from the oldest
                    # row again next time, so a row committed out of id order (PostgreSQL,
                    # several writing processes) is not passed over.
                    state.last = 0
                if not state.confirmed:
                    yield self._sleep(IDLE_POLL)
                continue
            state.last = rows[-1][0]
            for row_id, kind, message_id, payload in rows:
                confirm = channel.basic_publish(
                    EVENTS_EXCHANGE, kind[len(event_outbox.KIND_PREFIX):], payload.encode(),
                    pika.BasicProperties(delivery_mode=2, message_id=message_id,
                                         content_type="application/xml", type="EndDeviceEvents"),
                    mandatory=True)
                state.sent(row_id, message_id, confirm)
            self._flush(state)
        yield state.settled()
        yield self._flushed(state)

    def _flush(self, state) -> None:
        """Start deleting the rows confirmed so far, in one statement in the store's bulk lane
        (after the event writes waiting there: the delete is not on any alarm's way), unless a
        delete is under way (the next one takes what was confirmed meanwhile)."""
        if state.deleting is not None or not state.confirmed:
            return
        done, state.confirmed = state.confirmed, []

        def finished(result):
            state.deleting = None
            if isinstance(result, Failure):  # kept: published again later, same MessageID
                log.error("deleting %d published events from the outbox failed: %s", len(done),
                          result.getErrorMessage())
            else:
                self.counts["published"] += len(done)

        state.deleting = self._runner.call_bulk(_delete, self._runner.store, done)
        state.deleting.addBoth(finished)

    @inlineCallbacks
    def _flushed(self, state):
        """Wait until every confirmed row is deleted."""
        while state.deleting is not None or state.confirmed:
            self._flush(state)
            if state.deleting is not None:
                waiting = Deferred()
                state.deleting.addBoth(lambda result: waiting.callback(None) or result)
                yield waiting


class _Flight:
    """The messages of one run of the relay between publish and confirm."""

    def __init__(self, on_confirmed=None):
        self._on_confirmed = on_confirmed
        self.last = 0  # id of the last row published
        self.in_flight = 0
        self.confirmed: list[int] = []
        self.deleting: Deferred | None = None  # the delete of confirmed rows under way
        self.failed = 0
        self._waiting: list[Deferred] = []

    def sent(self, row_id: int, message_id: str, confirm: Deferred) -> None:
        self.in_flight += 1
        confirm.addCallbacks(self._confirmed, self._refused, callbackArgs=(row_id, message_id))

    def _confirmed(self, _result, row_id, message_id):
        self.in_flight -= 1
        self.confirmed.append(row_id)
        if self._on_confirmed is not None:
            self._on_confirmed(message_id)
        self._wake()

    def _refused(self, _failure):
        self.in_flight -= 1
        self.failed += 1
        self._wake()

    def _wake(self):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def room(self) -> Deferred:
        d = Deferred()
        self._waiting.append(d)
        return d

    @inlineCallbacks
    def settled(self):
        while self.in_flight:
            yield self.room()
