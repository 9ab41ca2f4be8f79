"""CIM requests taken from AMQP queues, answered by the same handlers as the SOAP doors.

A request is the 61968-100 message XML the SOAP Body carries (e.g. GetMeterReadingsMessage:
GetMeterReadings), published to the ``cimhes.requests`` exchange with its Header Noun as routing
key (see `cimhes.queue.topology`). `RequestConsumer` reads every request queue with manual
acknowledgements and a bounded prefetch (at most ``prefetch`` requests in work at once), hands
the element to the Noun's handler (for MeterReadings: `GetMeterReadingsDoor.get_meter_readings`,
the SOAP door's own method) and publishes the handler's ResponseMessage to the AMQP ``reply_to``
queue with the request's ``correlation_id`` (or, without one, the Header's CorrelationID or
MessageID). The request is acknowledged only once the answer is confirmed by the broker.

Each request is admitted first by its AMQP ``user_id`` and that user's roles
(queue/authorisation.py): a refusal is a 7.x Error, answered or dead-lettered like any other.
A bad request (not XML, hostile XML, schema-invalid, unknown Noun, a handler failure) is answered
with a FAILED ResponseMessage carrying the 61968-100 Error when ``reply_to`` is given; without it,
it is republished to ``cimhes.requests.dead`` with the reason in the ``x-cimhes-reason`` header.
Either way it is acknowledged and the queue moves on; the consumer keeps consuming.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone

import pika
from lxml import etree
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred

from cimhes.cim.codec import CodecError, parse_xml
from cimhes.cim.codec.document import qname
from cimhes.cim.codec.envelope import NS_MESSAGE, decode_reply, encode_header, encode_reply
from cimhes.cim.message import Error, ErrorCode, Header, Reply, ReplyResult, Verb
from cimhes.queue.authorisation import BrokerRefused
from cimhes.queue.topology import REASON_HEADER, REQUESTS_DEAD, declare_requests

log = logging.getLogger("cimhes.queue.requests")
# One line per request, as the SOAP door's (endpoints/request_log.py), under the same name.
request_log = logging.getLogger("cimhes.requests")

DEFAULT_PREFETCH = 20  # requests in work at once per consumer channel (README, "Limits")
SOURCE = "cimhes"
Handler = Callable[[etree._Element, str | None], Deferred]


def _header_text(root: etree._Element | None, local: str) -> str | None:
    if root is None:
        return None
    value = root.findtext(f"{{*}}Header/{{*}}{local}")
    return value.strip() if value and value.strip() else None


def failed_response(noun: str, correlation_id: str | None, error: Error) -> etree._Element:
    """A generic 61968-100 ResponseMessage (Message.xsd) with Result FAILED and ``error``."""
    root = etree.Element(qname(NS_MESSAGE, "ResponseMessage"), nsmap={"msg": NS_MESSAGE})
    encode_header(root, NS_MESSAGE, Header(
        verb=Verb.REPLY, noun=noun or "Unknown", timestamp=datetime.now(timezone.utc),
        source=SOURCE, message_id=str(uuid.uuid4()), correlation_id=correlation_id))
    encode_reply(root, NS_MESSAGE, Reply(ReplyResult.FAILED, errors=(error,)))
    return root


def _reply_of_fault(fault) -> Reply | None:
    detail = getattr(fault, "detail", None)
    node = None if detail is None else detail.find("{*}Reply")
    return None if node is None else decode_reply(node)


def _log_request(props, root, noun, correlation_id, answer, error, started) -> None:
    if error is not None:
        result = "FAILED" if props.reply_to else "DEAD-LETTERED"
    else:
        found = answer.findtext("{*}Reply/{*}Result") if answer is not None else None
        result = (found or "?").strip()
    seconds = time.monotonic() - started
    verb = (_header_text(root, "Verb") or "")[:16] or None
    fields = {"user": props.user_id or None, "transport": "amqp", "noun": noun[:64] or None,
              "verb": verb, "result": result, "duration_ms": round(seconds * 1000, 1),
              "correlation_id": (correlation_id or "")[:128] or None,
              "error_code": str(error.code) if error is not None else None}
    request_log.info("amqp request %s %s %s -> %s in %.1f ms", fields["user"] or "-",
                     verb or "-", fields["noun"] or "-", result, seconds * 1000, extra=fields)


class RequestConsumer:
    """Consumes the request queues of the nouns in ``handlers`` on every broker connection."""

    def __init__(self, connection, handlers: Mapping[str, Handler], *,
                 prefetch: int = DEFAULT_PREFETCH, doorkeeper=None):
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self._handlers = dict(handlers)
        # queue/authorisation.py AmqpDoorkeeper: the AMQP user_id and its roles (HeadEnd always
        # gives one; without it every request is served, as in the consumer's own tests).
        self._doorkeeper = doorkeeper
        self._prefetch = prefetch
        self.counts = {"answered": 0, "failed": 0, "dead-lettered": 0}
        connection.on_open(self._start)

    @inlineCallbacks
    def _start(self, protocol):
        channel = yield protocol.channel()
        yield channel.confirm_delivery()
        queues = yield declare_requests(channel, sorted(self._handlers))
        yield channel.basic_qos(prefetch_count=self._prefetch)
        for name in queues:
            queue, _tag = yield channel.basic_consume(name, auto_ack=False)
            self._consume(queue)

    @inlineCallbacks
    def _consume(self, queue):
        while True:
            try:
                message = yield queue.get()
            except Exception as exc:  # noqa: BLE001 (the channel closed: the next one takes over)
                log.info("request consumer stopped: %s", exc)
                return
            self._handle(message).addErrback(
                lambda f: log.error("a request could not be answered: %s", f.getErrorMessage()))

    @inlineCallbacks
    def _handle(self, message):
        channel, method, props = message.channel, message.method, message.properties
        started = time.monotonic()
        root = None
        error: Error | None = None
        answer = None
        try:
            root = parse_xml(message.body)
        except CodecError as exc:
            error = exc.to_error()
        noun = _header_text(root, "Noun") or ""
        correlation_id = (props.correlation_id or _header_text(root, "CorrelationID")
                          or _header_text(root, "MessageID"))
        if error is None:
            handler = self._handlers.get(noun)
            if handler is None:
                error = Error(code=ErrorCode.INVALID_NOUN,
                              reason=f"no AMQP service takes Header.Noun {noun[:64]!r}; known: "
                                     f"{', '.join(sorted(self._handlers))}",
                              xpath=f"{{{NS_MESSAGE}}}Noun")
            else:
                caller = f"amqp user {props.user_id}" if props.user_id else None
                if self._doorkeeper is not None:
                    try:
                        principal = yield self._doorkeeper.admit(props.user_id, noun, root,
                                                                 correlation_id)
                        caller = f"amqp user {principal.name}"
                    except BrokerRefused as refused:
                        error = refused.error
                        handler = None
            if handler is not None:
                try:
                    answer = yield maybeDeferred(handler, root, caller)
                except Exception as exc:  # noqa: BLE001
                    reply = _reply_of_fault(exc)
                    if reply is not None and reply.errors:
                        error = reply.errors[0]
                    else:
                        log.error("the %s handler failed on an AMQP request: %r", noun, exc)
                        error = Error(code=ErrorCode.INTERNAL_ERROR,
                                      reason="the head-end failed on this request; it may be retried")
        if error is None:
            yield self._reply(channel, props, correlation_id, answer)
            self.counts["answered"] += 1
        elif props.reply_to:
            yield self._reply(channel, props, correlation_id,
                              failed_response(noun, correlation_id, error))
            self.counts["failed"] += 1
        else:
            reason = f"{error.code}: {error.reason}"[:1000]
            headers = dict(props.headers or {})
            headers[REASON_HEADER] = reason
            yield channel.basic_publish(REQUESTS_DEAD, method.routing_key, message.body,
                                        pika.BasicProperties(
                                            headers=headers, delivery_mode=2,
                                            correlation_id=props.correlation_id,
                                            message_id=props.message_id,
                                            content_type=props.content_type))
            self.counts["dead-lettered"] += 1
            log.warning("AMQP request dead-lettered: %s", reason)
        channel.basic_ack(method.delivery_tag)
        _log_request(props, root, noun, correlation_id, answer, error, started)

    def _reply(self, channel, props, correlation_id, element):
        if not props.reply_to:
            return None  # a request nobody waits for: handled, nothing to send
        body = etree.tostring(element, xml_declaration=True, encoding="UTF-8")
        return channel.basic_publish("", props.reply_to, body, pika.BasicProperties(
            correlation_id=correlation_id, content_type="application/xml",
            message_id=str(uuid.uuid4()), delivery_mode=2))
