"""Alarms to the DMS: the outbox relay that publishes stored EndDeviceEvents to ``cimhes.events``.

Each new event has an outbox row (engine/event_outbox.py) holding its EventMessage, MessageID
and routing key. `EventRelay`, while the broker connection is open, takes up to ``batch`` rows
at a time from the store (off the reactor, through the StoreRunner), publishes each to the topic
exchange ``cimhes.events`` as a persistent message (delivery mode 2, ``message_id`` = the
Header's MessageID, ``mandatory``) on a channel in publisher-confirm mode, and deletes a row only
once the broker confirmed its message. The exchange has an alternate exchange
(``cimhes.events.unrouted``, with a durable queue), so a message no DMS queue is bound for is
kept, not dropped. With the broker down the rows wait (and accumulate); when the connection is
back, the relay resumes from the oldest. A crash between confirm and delete can publish a message
twice, always with the same MessageID, so a consumer drops duplicates by it.
"""
from __future__ import annotations

import logging

import pika
from sqlalchemy import delete, select
from twisted.internet.defer import DeferredList, inlineCallbacks

from cimhes.engine import event_outbox
from cimhes.engine.store import OutboxMessage
from cimhes.queue.topology import EVENTS_EXCHANGE, declare_events

log = logging.getLogger("cimhes.queue.events")

DEFAULT_BATCH = 500  # rows taken from the outbox per round (README, "Limits")
IDLE_POLL = 0.1  # s between looks at an empty outbox (an indexed query; bounds the added latency)


def _pending(store, limit: int):
    with store._session() as session:  # noqa: SLF001 (a unit of work of the store)
        return [(r.id, r.kind, r.correlation_id, r.payload) for r in session.scalars(
            select(OutboxMessage).where(OutboxMessage.destination == event_outbox.DESTINATION)
            .order_by(OutboxMessage.id).limit(limit))]


def _delete(store, ids) -> None:
    with store._session.begin() as session:  # noqa: SLF001
        session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))


def pending_count(store) -> int:
    with store._session() as session:  # noqa: SLF001
        return len(session.scalars(select(OutboxMessage.id).where(
            OutboxMessage.destination == event_outbox.DESTINATION)).all())


class EventRelay:
    def __init__(self, reactor, connection, store_runner, *, batch: int = DEFAULT_BATCH):
        self._reactor = reactor
        self._runner = store_runner
        self._batch = batch
        self._generation = 0
        self._stopped = False
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
        while generation == self._generation and not self._stopped and channel.is_open:
            try:
                rows = yield self._runner.call(_pending, self._runner.store, self._batch)
            except Exception as exc:  # noqa: BLE001 (the store is down: try again later)
                log.error("reading the event outbox failed: %s", exc)
                yield self._sleep(5)
                continue
            if not rows:
                yield self._sleep(IDLE_POLL)
                continue
            confirms = [channel.basic_publish(
                EVENTS_EXCHANGE, kind[len(event_outbox.KIND_PREFIX):], payload.encode(),
                pika.BasicProperties(delivery_mode=2, message_id=message_id,
                                     content_type="application/xml", type="EndDeviceEvents"),
                mandatory=True) for _id, kind, message_id, payload in rows]
            results = yield DeferredList(confirms, consumeErrors=True)
            done = [row[0] for row, (ok, _) in zip(rows, results) if ok]
            failed = len(rows) - len(done)
            if done:
                yield self._runner.call(_delete, self._runner.store, done)
                self.counts["published"] += len(done)
            if failed:
                self.counts["publish failures"] += failed
                log.warning("%d events were not confirmed by the broker; they stay in the outbox",
                            failed)
                if channel.is_open:
                    yield self._sleep(1)
