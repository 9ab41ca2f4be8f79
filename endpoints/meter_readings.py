"""The GetMeterReadings SOAP door: CIM request element in, MeterReadingsResponseMessage out.

It translates and delegates: the codec decodes and validates, the engine reads the meters, and
this module turns the outcome into the 61968-100 reply (Result OK / PARTIAL / FAILED with one
Error per failed device). A request that cannot be decoded is answered with a SOAP Fault whose
detail is the WSDL's MeterReadingsFaultMessage, so a generated client sees a typed fault.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from lxml import etree
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import reactor as default_reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from cimhes.cim.codec import (
    CodecError,
    parse_xml,
    decode_get_meter_readings,
    encode_fault,
    encode_meter_readings_response,
)
from cimhes.cim.message import Error, ErrorCode, ErrorLevel, Reply, ReplyResult, reply_header
from cimhes.cim.meter_readings import (
    MESSAGE_COUNT_PROPERTY,
    MESSAGE_INDEX_PROPERTY,
    PAGE_OPTION,
    MeterReadingsResponse,
    ReadingSource,
    split_into_messages,
)
from cimhes.endpoints.arrival import ArrivalDesk, within_limit
from cimhes.endpoints.async_replies import ReplyAddressPolicy, ReplySender
from cimhes.endpoints.owed_replies import OwedReplies
from cimhes.cim.header_limits import check_header
from cimhes.endpoints.soap_resource import CimFault, soap_application
from cimhes.engine.admission import Admission
from cimhes.engine.reading import ReadOutcome
from cimhes.engine.reading_sources import ReadingRequestService
from cimhes.engine import request_log
from cimhes.engine.garbage_collection import release_memory_soon
from cimhes.engine.store import StoreRunner

WSDL_NAME = "GetMeterReadings"
WSDL_FILE = "GetMeterReadings.wsdl"
MESSAGE_NS = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
SOURCE = "cimhes"
NOUN = "MeterReadings"

log = logging.getLogger(__name__)


def encode_off_the_reactor(response: MeterReadingsResponse):
    """Deferred[element] of the encoded response, built on a worker thread.

    A reply for 1,000 meter reads holds 196,000 values and takes about a second of CPU to build;
    on the reactor thread that second would stall every other request and DLMS session
    (bench/encode_response.py measures the longest stall). lxml allows a tree built in one thread
    to be placed in another's document, which is what the SOAP layer does with it.
    """
    return deferToThread(encode_meter_readings_response, response)


@dataclass(frozen=True)
class ReadingRequestLimits:
    """Bounds on GetMeterReadings requests (defaults documented in README, "Limits").

    (How many devices one request may name and how many one caller may have pending are the
    Admission's: engine/admission.py, 3.1 and 3.2.)
    ``sync_time_limit``: seconds a synchronous answer may take; past it the reply is FAILED 4.1
    while the meters are still read and stored (s);
    ``max_values_per_message``: past it the reply is split into parts (see ``_parts``)."""

    sync_time_limit: float = 120.0
    # Values (register readings + interval readings) in one reply message; a larger outcome is
    # split into several messages (Header.Property MessageIndex/MessageCount, Error 0.1).
    max_values_per_message: int = 50_000
    # A request for more meters than this leaves its values in the store and each reply part
    # is built from there, one at a time (engine/reading_sources.py, StoredAnswer), so its
    # memory is one part's, not all its values.
    stream_above_meters: int = 50


class GetMeterReadingsDoor:
    """Answers GetMeterReadings requests with the engine's readings."""

    def __init__(self, readings: ReadingRequestService, store: StoreRunner,
                 now: Callable[[], datetime] | None = None, *, reactor=None,
                 limits: ReadingRequestLimits | None = None,
                 admission: Admission | None = None,
                 replies: ReplySender | None = None,
                 reply_addresses: ReplyAddressPolicy | None = None,
                 owed: OwedReplies | None = None):
        """``replies`` posts asynchronous outcomes (None: AsyncReplyFlag is refused), to the
        addresses ``reply_addresses`` allows; ``owed`` keeps each owed until it is taken
        (endpoints/owed_replies.py)."""
        self._replies = replies
        self._reply_addresses = reply_addresses or ReplyAddressPolicy()
        self._readings = readings
        self._store = store
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._reactor = reactor or default_reactor
        self._limits = limits or ReadingRequestLimits()
        self._admission = admission or Admission()
        self._arrivals = ArrivalDesk(store, self._admission, replies, self._reply_addresses)
        self._owed = owed or OwedReplies(self._reactor, store)
        self._owed.register(NOUN, self._resumed)

    @inlineCallbacks
    def get_meter_readings(self, element, caller: str | None = None):
        """`caller` is who is asking (`caller_of`); without one the request counts against its
        Header User.UserID."""
        received_at = self._now()
        try:
            request = decode_get_meter_readings(element)
            check_header(request.header)
        except CodecError as exc:
            reply = Reply(ReplyResult.FAILED, errors=(exc.to_error(),))
            raise CimFault("Client", exc.reason, encode_fault(reply))

        if request.page > 1:
            # Later parts come from the store, where the first call put what it read, so every
            # part describes the same readings.
            request = replace(request, source=ReadingSource.STORE)
        asked = (len(request.end_devices) + len(request.usage_points)
                 + len(request.end_device_groups))
        arrival = yield self._arrivals.arrive(
            request.header, noun="MeterReadings", verb="get", received_at=received_at,
            devices_asked=asked, caller=caller)
        logged, admitted = arrival.logged, arrival.admitted
        if arrival.refusal is not None:
            outcome = ReadOutcome(errors=[arrival.refusal], devices_asked=asked)
        elif request.header.async_reply:
            # Owed before it is acknowledged (pending_reply): a restart re-runs it (`_resumed`).
            yield self._owed.owe(NOUN, request.header, logged, admitted,
                                 etree.tostring(element, encoding="unicode"),
                                 lambda: self._read_then_reply(request, logged, admitted))
            ack = Error(code=ErrorCode.ACKNOWLEDGED, level=ErrorLevel.INFORM,
                        reason="request accepted; the outcome will be sent to the ReplyAddress "
                               "with this CorrelationID")
            return (yield encode_off_the_reactor(self._response(request, Reply(
                ReplyResult.OK, errors=(ack,)), ())))
        else:
            outcome = yield within_limit(
                self._reactor, self._readings.read(request, self._limits.stream_above_meters),
                self._limits.sync_time_limit, admitted, "a read")
            if outcome is None:
                outcome = ReadOutcome(errors=[Error(
                    code=ErrorCode.TIMED_OUT,
                    reason=f"no answer within the synchronous time limit of "
                           f"{self._limits.sync_time_limit:g} s; the meters are still being "
                           "read and their values stored")])
        yield self._record(logged, outcome)
        parts = self._parts(request, outcome)
        if request.page > len(parts):
            return (yield encode_off_the_reactor(self._response(request, Reply(
                ReplyResult.FAILED, errors=(Error(
                    code=ErrorCode.INVALID_PARAMETER, reason=f"Request.Option Page is "
                    f"{request.page}, but the reply has {len(parts)} part(s)"),)), ())))
        large = outcome.in_store is not None
        try:
            part = yield self._filled(outcome, parts[request.page - 1])
            return (yield encode_off_the_reactor(part))
        finally:
            if large:  # once the part is written, give what it took back to the system
                release_memory_soon(self._reactor)

    def _response(self, request, reply: Reply, meter_readings, properties=()) -> MeterReadingsResponse:
        header = replace(reply_header(request.header, self._now(), source=SOURCE),
                         message_id=str(uuid.uuid4()), properties=tuple(properties))
        return MeterReadingsResponse(header=header, reply=reply, meter_readings=meter_readings)

    def _parts(self, request, outcome) -> list[MeterReadingsResponse]:
        """The outcome as one message, or as several when it holds more values than one may:
        each part says which it is (Header.Property MessageIndex, MessageCount), each but the
        last carries Error 0.1 (more to follow) naming the way to the next, every part the
        outcome's Result and Errors."""
        if outcome.in_store is not None:
            # Placeholders: the slices of each part; `_filled` reads their values when the
            # part is sent.
            chunks = outcome.in_store.plan(self._limits.max_values_per_message)
        else:
            chunks = split_into_messages(outcome.meter_readings,
                                         self._limits.max_values_per_message)
        if len(chunks) == 1 and outcome.in_store is None:
            return [self._response(request, Reply(outcome.result, errors=tuple(outcome.errors)),
                                   outcome.meter_readings)]
        parts = []
        for index, chunk in enumerate(chunks, start=1):
            errors = list(outcome.errors)
            if index < len(chunks):
                errors.append(Error(
                    code=ErrorCode.MORE_TO_FOLLOW, level=ErrorLevel.INFORM,
                    reason=f"part {index} of {len(chunks)}; "
                           + ("the next part follows in its own message"
                              if request.header.async_reply else
                              f"ask again with Request.Option {PAGE_OPTION}={index + 1}")))
            parts.append(self._response(
                request, Reply(outcome.result, errors=tuple(errors)), chunk,
                ((MESSAGE_INDEX_PROPERTY, str(index)), (MESSAGE_COUNT_PROPERTY, str(len(chunks))))))
        return parts

    @inlineCallbacks
    def _filled(self, outcome, part: MeterReadingsResponse):
        """The part with its MeterReadings: as planned, or read from the store for an answer
        left there (only this part's values are in memory)."""
        if outcome.in_store is None:
            return part
        meter_readings = yield self._store.call_bulk(outcome.in_store.part, self._store.store,
                                                     part.meter_readings)
        return replace(part, meter_readings=tuple(meter_readings))

    def _record(self, logged: int, outcome):
        return self._store.call(request_log.answered, self._store.store, logged,
                                replied_at=self._now(), result=outcome.result.value,
                                devices_asked=outcome.devices_asked,
                                devices_failed=outcome.devices_failed)

    @inlineCallbacks
    def _read_then_reply(self, request, logged, admitted=None):
        """The asynchronous half: read, then post the outcome to the ReplyAddress, part by part;
        whether the ReplyAddress took every part (a part refused ends the round: the next
        round posts them all again)."""
        try:
            outcome = yield self._readings.read(request, self._limits.stream_above_meters)
        finally:
            if admitted is not None:
                admitted.release()
        return (yield self._post(request, logged, outcome))

    @inlineCallbacks
    def _post(self, request, logged, outcome):
        header = request.header
        delivered = True
        try:
            for part in self._parts(request, outcome):  # one callback per part, in order
                element = yield encode_off_the_reactor((yield self._filled(outcome, part)))
                delivered = yield self._replies.send(header.reply_address, element,
                                                     header.correlation_id or header.message_id)
                del element
                if not delivered:
                    break
            yield self._record(logged, outcome)
        finally:
            if outcome.in_store is not None:
                release_memory_soon(self._reactor)
        return delivered

    def _resumed(self, reply):
        """A GetMeterReadings reply taken over (its process died, or a delivery round failed):
        the request is run again as it was asked (a read changes nothing; with the default
        DataSource what an interrupted run stored comes from the store, and only what is
        missing is read), unless its runs were interrupted `max_interrupted` times: then it is
        answered FAILED 5.3 "interrupted" rather than risk a request that stops the process."""
        request = decode_get_meter_readings(parse_xml(reply.request_xml.encode()))
        if reply.interrupted >= self._owed.settings.max_interrupted:
            outcome = ReadOutcome(errors=[interrupted_error(reply)], devices_asked=(
                len(request.end_devices) + len(request.usage_points)
                + len(request.end_device_groups)))
            return self._post(request, reply.request_id, outcome)
        return self._read_then_reply(request, reply.request_id)


def interrupted_error(reply) -> Error:
    """The Error of an asynchronous request not run again after interrupted runs."""
    return Error(code=ErrorCode.INTERRUPTED, reason=(
        f"the head-end stopped {reply.interrupted} time(s) while carrying out this request; "
        "it is not run again: send it again if its outcome is still wanted"))


def get_meter_readings_application(door: GetMeterReadingsDoor):
    """The spyne application for the GetMeterReadings WSDL, bound to one door."""

    class GetMeterReadingsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="GetMeterReadings",
             _returns=AnyXml, _operation_name="GetMeterReadings")
        def GetMeterReadings(ctx, element):
            return door.get_meter_readings(element, caller_of(ctx))

    return soap_application(GetMeterReadingsService, tns=MESSAGE_NS, name=WSDL_NAME)


def caller_of(ctx) -> str | None:
    """Who a SOAP request counts against: its authenticated user (endpoints/auth.py), else the
    client's address. (A Header User.UserID is the caller's own claim, so it is used only when
    neither is known.)"""
    name = getattr(getattr(ctx, "udc", None), "name", None)
    if name:
        return f"user {name}"
    request = getattr(ctx.transport, "req", None)
    address = request.getClientAddress() if request is not None else None
    host = getattr(address, "host", None)
    return f"address {host}" if host else None
