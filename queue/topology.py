"""The AMQP topology cimhes declares (docs/amqp.md describes it for integrators).

Requests: the durable direct exchange ``cimhes.requests`` routes by Header Noun (the routing key)
to one durable queue per Noun, ``cimhes.requests.<Noun>``. A request routed nowhere goes through
the alternate exchange ``cimhes.requests.unrouted`` to the queue of the same name, which the
consumer also reads (and answers FAILED, unknown Noun). A bad request nobody can be answered for
is republished to the dead-letter exchange ``cimhes.requests.dead`` (queue of the same name) with
the reason in the ``x-cimhes-reason`` header.

Events: the durable topic exchange ``cimhes.events``; routing keys
``<domain>.<severity>.<eventOrAction>`` (see `cimhes.queue.events.routing_key`); anything no DMS
queue is bound for goes through the alternate exchange ``cimhes.events.unrouted`` to the durable
queue of the same name, so nothing published is lost.
"""
from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

REQUESTS_EXCHANGE = "cimhes.requests"
REQUESTS_UNROUTED = "cimhes.requests.unrouted"
REQUESTS_DEAD = "cimhes.requests.dead"
EVENTS_EXCHANGE = "cimhes.events"
EVENTS_UNROUTED = "cimhes.events.unrouted"
REASON_HEADER = "x-cimhes-reason"


def request_queue(noun: str) -> str:
    return f"{REQUESTS_EXCHANGE}.{noun}"


@inlineCallbacks
def declare_requests(channel, nouns):
    """Declare the request exchanges and queues (idempotent); returns the queue names to consume."""
    yield channel.exchange_declare(REQUESTS_UNROUTED, exchange_type="fanout", durable=True)
    yield channel.queue_declare(REQUESTS_UNROUTED, durable=True)
    yield channel.queue_bind(REQUESTS_UNROUTED, REQUESTS_UNROUTED)
    yield channel.exchange_declare(REQUESTS_DEAD, exchange_type="fanout", durable=True)
    yield channel.queue_declare(REQUESTS_DEAD, durable=True)
    yield channel.queue_bind(REQUESTS_DEAD, REQUESTS_DEAD)
    yield channel.exchange_declare(REQUESTS_EXCHANGE, exchange_type="direct", durable=True,
                                   arguments={"alternate-exchange": REQUESTS_UNROUTED})
    queues = []
    for noun in nouns:
        name = request_queue(noun)
        yield channel.queue_declare(name, durable=True)
        yield channel.queue_bind(name, REQUESTS_EXCHANGE, routing_key=noun)
        queues.append(name)
    return [*queues, REQUESTS_UNROUTED]


@inlineCallbacks
def declare_events(channel):
    yield channel.exchange_declare(EVENTS_UNROUTED, exchange_type="fanout", durable=True)
    yield channel.queue_declare(EVENTS_UNROUTED, durable=True)
    yield channel.queue_bind(EVENTS_UNROUTED, EVENTS_UNROUTED)
    yield channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True,
                                   arguments={"alternate-exchange": EVENTS_UNROUTED})
