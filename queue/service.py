"""The head-end's AMQP side in one object: the broker connection, the request consumer and the
event relay (when given an outbox), started and stopped together (see docs/amqp.md)."""
from __future__ import annotations

import logging

from cimhes.queue.connection import BrokerConnection, ReconnectPolicy, redact
from cimhes.queue.requests import DEFAULT_PREFETCH, RequestConsumer

log = logging.getLogger("cimhes.queue")


class AmqpService:
    def __init__(self, reactor, url: str, handlers, *, store_runner=None,
                 prefetch: int = DEFAULT_PREFETCH, policy: ReconnectPolicy | None = None,
                 relay_events: bool = True, doorkeeper=None):
        self.connection = BrokerConnection(reactor, url, policy)
        self.requests = RequestConsumer(self.connection, handlers, prefetch=prefetch,
                                        doorkeeper=doorkeeper)
        self.relay = None
        if store_runner is not None and relay_events:
            from cimhes.queue.events import EventRelay
            self.relay = EventRelay(reactor, self.connection, store_runner)

    def start(self) -> None:
        log.info("AMQP on: broker %s", redact(self.connection.url))
        self.connection.start()
        if self.relay is not None:
            self.relay.start()

    def stop(self):
        if self.relay is not None:
            self.relay.stop()
        return self.connection.stop()

    def health(self) -> dict:
        health = self.connection.health()
        if self.relay is not None:
            health["relay"] = dict(self.relay.counts)
        return health
