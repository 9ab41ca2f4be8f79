"""The GetEndDeviceEvents SOAP door: GetEndDeviceEventsMessage:GetEndDeviceEvents in,
EndDeviceEventsResponseMessage out (IEC 61968-9 ed.2 'Get' pattern, ``xsd/GetEndDeviceEvents.wsdl``).

It translates and delegates, as the GetMeterReadings door does: the codec decodes and validates,
the engine (``engine/event_queries.py``) selects the events, from the store or from the meters'
logs first (Request.Option ``DataSource``), and this module turns the outcome into the 61968-100
reply: Result OK / PARTIAL / FAILED with one Error per unknown meter or group and per device
whose log could not be read; an answer of more events than one message may hold in parts
(Header.Property MessageIndex / MessageCount, Error 0.1 on every part but the last, the next
asked for with Request.Option Page=N); asynchronously (AsyncReplyFlag + ReplyAddress) an
acknowledgment now and each part posted to the ReplyAddress through ReplyEndDeviceEvents.
A request that cannot be decoded is a SOAP Fault with the WSDL's EndDeviceEventsFaultMessage.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from lxml import etree
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet.defer import inlineCallbacks

from cimhes.cim.codec import CodecError, parse_xml
from cimhes.cim.codec.end_device_events import (
    decode_get_end_device_events,
    encode_end_device_events_response,
    encode_get_end_device_events_fault,
)
from cimhes.cim.end_device_events import PAGE_OPTION, EndDeviceEventsResponse, EventSource
from cimhes.cim.header_limits import check_header
from cimhes.cim.message import Error, ErrorCode, ErrorLevel, Reply, ReplyResult, reply_header
from cimhes.cim.meter_readings import MESSAGE_COUNT_PROPERTY, MESSAGE_INDEX_PROPERTY
from cimhes.endpoints.arrival import ArrivalDesk, within_limit
from cimhes.endpoints.async_replies import ReplyAddressPolicy, ReplySender
from cimhes.endpoints.auth import SoapGuard
from cimhes.endpoints.publisher import EVENTS_OPERATION, EVENTS_WSDL, MdmPublisher
from cimhes.endpoints.meter_readings import caller_of, interrupted_error
from cimhes.endpoints.owed_replies import OwedReplies
from cimhes.endpoints.soap_resource import CimFault, SoapResource, soap_application
from cimhes.engine import publishing, request_log
from cimhes.engine.admission import Admission
from cimhes.engine.event_queries import EventOutcome, EventRequestLimits, EventRequestService
from cimhes.engine.users import Role

WSDL_NAME = "GetEndDeviceEvents"
WSDL_FILE = "GetEndDeviceEvents.wsdl"
REPLY_WSDL = "ReplyEndDeviceEvents.wsdl"
REPLY_OPERATION = "ReplyEndDeviceEvents"
MESSAGE_NS = "http://iec.ch/TC57/2011/GetEndDeviceEventsMessage"
SOURCE = "cimhes"
NOUN = "EndDeviceEvents"

log = logging.getLogger(__name__)


class GetEndDeviceEventsDoor:
    """Answers GetEndDeviceEvents requests with the engine's event selection."""

    def __init__(self, events: EventRequestService, runner, *, reactor,
                 admission: Admission | None = None, replies: ReplySender | None = None,
                 reply_addresses: ReplyAddressPolicy | None = None,
                 now: Callable[[], datetime] | None = None, owed: OwedReplies | None = None):
        self._events = events
        self._store = runner
        self._reactor = reactor
        self._admission = admission or Admission()
        self._replies = replies
        self._reply_addresses = reply_addresses or ReplyAddressPolicy()
        self._arrivals = ArrivalDesk(runner, self._admission, replies, self._reply_addresses)
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._owed = owed or OwedReplies(reactor, runner)
        self._owed.register(NOUN, self._resumed)

    @property
    def limits(self) -> EventRequestLimits:
        return self._events.limits

    @inlineCallbacks
    def get_end_device_events(self, element, caller: str | None = None):
        """The EndDeviceEventsResponseMessage element answering ``element`` (a Deferred)."""
        received_at = self._now()
        try:
            request = decode_get_end_device_events(element)
            check_header(request.header)
        except CodecError as exc:
            raise CimFault("Client", exc.reason, encode_get_end_device_events_fault(
                Reply(ReplyResult.FAILED, errors=(exc.to_error(),))))
        if request.page > 1:
            # Later parts come from the store, where the first call put what it read.
            request = replace(request, source=EventSource.STORE)
        asked = len(request.meters) + len(request.end_device_groups)
        arrival = yield self._arrivals.arrive(
            request.header, noun="EndDeviceEvents", verb="get", received_at=received_at,
            devices_asked=asked, caller=caller)
        logged, admitted = arrival.logged, arrival.admitted
        if arrival.refusal is not None:
            outcome = EventOutcome(errors=[arrival.refusal], devices_asked=asked)
        elif request.header.async_reply:
            # Owed before it is acknowledged (pending_reply): a restart re-runs it (`_resumed`).
            yield self._owed.owe(NOUN, request.header, logged, admitted,
                                 etree.tostring(element, encoding="unicode"),
                                 lambda: self._select_then_reply(request, logged, admitted))
            ack = Error(code=ErrorCode.ACKNOWLEDGED, level=ErrorLevel.INFORM,
                        reason="request accepted; the outcome will be sent to the ReplyAddress "
                               "with this CorrelationID")
            return encode_end_device_events_response(
                self._response(request, Reply(ReplyResult.OK, errors=(ack,))))
        else:
            outcome = yield self._select_within_limit(request, admitted)
        yield self._record(logged, outcome)
        if request.page > outcome.parts:
            return encode_end_device_events_response(self._response(request, Reply(
                ReplyResult.FAILED, errors=(Error(
                    code=ErrorCode.INVALID_PARAMETER,
                    reason=f"Request.Option {PAGE_OPTION} is {request.page}, but the reply has "
                           f"{outcome.parts} part(s)"),))))
        part = yield self._part(request, outcome, request.page)
        return encode_end_device_events_response(part)

    def _select_within_limit(self, request, admitted):
        """Deferred[EventOutcome]: the selection, or a 4.1 outcome once the sync time limit
        passes (a log read goes on, and stores what it gets)."""
        return within_limit(self._reactor, self._events.select(request),
                            self.limits.sync_time_limit, admitted, "an event read",
                            late=lambda: EventOutcome(errors=[Error(
                                code=ErrorCode.TIMED_OUT,
                                reason=f"no answer within the synchronous time limit of "
                                       f"{self.limits.sync_time_limit:g} s; the meters' logs "
                                       "are still being read and their events stored")]))

    def _response(self, request, reply: Reply, events=(), properties=()) -> EndDeviceEventsResponse:
        header = replace(reply_header(request.header, self._now(), source=SOURCE),
                         message_id=str(uuid.uuid4()), properties=tuple(properties))
        return EndDeviceEventsResponse(header=header, reply=reply, events=tuple(events))

    @inlineCallbacks
    def _part(self, request, outcome: EventOutcome, index: int):
        """Part ``index`` of the outcome as a response: its events, the outcome's Result and
        Errors, and, when there are several parts, which one it is (and 0.1 before the last)."""
        events = []
        if outcome.selection is not None and outcome.total:
            events = yield self._events.page(outcome.selection, index)
        errors = list(outcome.errors)
        properties = ()
        if outcome.parts > 1:
            properties = ((MESSAGE_INDEX_PROPERTY, str(index)),
                          (MESSAGE_COUNT_PROPERTY, str(outcome.parts)))
            if index < outcome.parts:
                errors.append(Error(
                    code=ErrorCode.MORE_TO_FOLLOW, level=ErrorLevel.INFORM,
                    reason=f"part {index} of {outcome.parts}; "
                           + ("the next part follows in its own message"
                              if request.header.async_reply else
                              f"ask again with Request.Option {PAGE_OPTION}={index + 1}")))
        return self._response(request, Reply(outcome.result, errors=tuple(errors)), events,
                              properties)

    def _record(self, logged: int, outcome: EventOutcome):
        return self._store.call(request_log.answered, self._store.store, logged,
                                replied_at=self._now(), result=outcome.result.value,
                                devices_asked=outcome.devices_asked,
                                devices_failed=outcome.devices_failed)

    @inlineCallbacks
    def _select_then_reply(self, request, logged, admitted=None):
        """The asynchronous half: select (reading logs if asked), then post each part; whether
        the ReplyAddress took every part (a part refused ends the round)."""
        try:
            outcome = yield self._events.select(request)
        finally:
            if admitted is not None:
                admitted.release()
        return (yield self._post(request, logged, outcome))

    @inlineCallbacks
    def _post(self, request, logged, outcome: EventOutcome):
        header = request.header
        delivered = True
        for index in range(1, outcome.parts + 1):  # one callback per part, in order
            part = yield self._part(request, outcome, index)
            delivered = yield self._replies.send(
                header.reply_address, encode_end_device_events_response(part),
                header.correlation_id or header.message_id)
            if not delivered:
                break
        yield self._record(logged, outcome)
        return delivered

    def _resumed(self, reply):
        """A GetEndDeviceEvents reply taken over (its process died, or a delivery round
        failed): run again as asked (DataSource=meter reads the logs again; the events are
        stored once), unless interrupted `max_interrupted` times: then FAILED 5.3."""
        request = decode_get_end_device_events(parse_xml(reply.request_xml.encode()))
        if reply.interrupted >= self._owed.settings.max_interrupted:
            return self._post(request, reply.request_id, EventOutcome(
                errors=[interrupted_error(reply)],
                devices_asked=len(request.meters) + len(request.end_device_groups)))
        return self._select_then_reply(request, reply.request_id)


def get_end_device_events_application(door: GetEndDeviceEventsDoor):
    """The spyne application for the GetEndDeviceEvents WSDL, bound to one door."""

    class GetEndDeviceEventsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="GetEndDeviceEvents",
             _returns=AnyXml, _operation_name="GetEndDeviceEvents")
        def GetEndDeviceEvents(ctx, element):
            return door.get_end_device_events(element, caller_of(ctx))

    return soap_application(GetEndDeviceEventsService, tns=MESSAGE_NS, name=WSDL_NAME)


def mount(head_end, reactor, settings, cim) -> GetEndDeviceEventsDoor:
    """The head-end's events on its EventStore (``head_end.events``, which writes an outbox row
    per event subscriber with each new event): the publisher delivering those rows
    (``settings.event_subscribers``, started with the reactor), the log reader, and the
    GetEndDeviceEvents door (limits ``settings.event_requests``) at ``cim``/GetEndDeviceEvents
    for the events-reader role. Sets ``head_end.event_publisher``; returns the door."""
    subscribers = dict(settings.event_subscribers)
    head_end.event_publisher = MdmPublisher(
        reactor, head_end.store_runner, subscribers, head_end.callback_session,
        first_retry=timedelta(seconds=settings.publish_first_retry), wsdl_file=EVENTS_WSDL,
        operation=EVENTS_OPERATION, destination=publishing.event_destination)
    reactor.callWhenRunning(head_end.event_publisher.start)  # and delivers what a last run left
    # DataSource=meter: the logs are read as the engine's "events" jobs (engine/event_fetches.py).
    door = GetEndDeviceEventsDoor(
        EventRequestService(head_end.store_runner, head_end.event_fetches,
                            head_end.readings.resolve,
                            settings.event_requests),
        head_end.store_runner, reactor=reactor, admission=head_end.admission,
        replies=ReplySender(reactor, head_end.callback_session, wsdl_file=REPLY_WSDL,
                            operation=REPLY_OPERATION),
        reply_addresses=ReplyAddressPolicy(settings.reply_addresses),
        owed=head_end.owed_replies)
    cim.putChild(WSDL_NAME.encode(), SoapResource(
        get_end_device_events_application(door), WSDL_FILE,
        SoapGuard(head_end.doorkeeper, {"GetEndDeviceEvents": Role.EVENTS_READER},
                  encode_get_end_device_events_fault),
        public_base_url=settings.public_base_url, observer=head_end.operations.requests))
    return door
