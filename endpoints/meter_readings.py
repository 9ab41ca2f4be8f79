"""The GetMeterReadings SOAP door: CIM request element in, MeterReadingsResponseMessage out.

It translates and delegates: the codec decodes and validates, the engine reads the meters, and
this module turns the outcome into the 61968-100 reply (Result OK / PARTIAL / FAILED with one
Error per failed device). A request that cannot be decoded is answered with a SOAP Fault whose
detail is the WSDL's MeterReadingsFaultMessage, so a generated client sees a typed fault.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

from spyne import AnyXml, ServiceBase, rpc
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from cimhes.cim.codec import (
    CodecError,
    decode_get_meter_readings,
    encode_fault,
    encode_meter_readings_response,
)
from cimhes.cim.header_limits import check_header
from cimhes.cim.message import Reply, ReplyResult, reply_header
from cimhes.cim.meter_readings import MeterReadingsResponse
from cimhes.endpoints.soap_resource import CimFault, soap_application
from cimhes.engine.admission import Admission, Refused
from cimhes.engine.reading import MeterReadingService, ReadOutcome
from cimhes.engine import request_log
from cimhes.engine.store import StoreRunner

WSDL_NAME = "GetMeterReadings"
WSDL_FILE = "GetMeterReadings.wsdl"
MESSAGE_NS = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
SOURCE = "cimhes"


def encode_off_the_reactor(response: MeterReadingsResponse):
    """Deferred[element] of the encoded response, built on a worker thread.

    A reply for 1,000 meter reads holds 196,000 values and takes about a second of CPU to build;
    on the reactor thread that second would stall every other request and DLMS session
    (bench/encode_response.py measures the longest stall). lxml allows a tree built in one thread
    to be placed in another's document, which is what the SOAP layer does with it.
    """
    return deferToThread(encode_meter_readings_response, response)


class GetMeterReadingsDoor:
    """Answers GetMeterReadings requests with the engine's readings."""

    def __init__(self, readings: MeterReadingService, store: StoreRunner,
                 now: Callable[[], datetime] | None = None, admission: Admission | None = None):
        self._readings = readings
        self._store = store
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._admission = admission or Admission()

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

        asked = len(request.end_devices) + len(request.usage_points)
        # Logged as it arrives: a crash before the answer leaves it "interrupted" at restart.
        logged = yield self._store.call(
            request_log.arrived, self._store.store, message_id=request.header.message_id,
            correlation_id=request.header.correlation_id, noun="MeterReadings", verb="get",
            source=request.header.source, received_at=received_at, devices_asked=asked)
        try:
            admitted = self._admission.admit(
                caller or request.header.user_id or "anonymous", asked)
        except Refused as refused:
            outcome = ReadOutcome(errors=[refused.error], devices_asked=asked)
        else:
            try:
                outcome = yield self._readings.read(request)
            finally:
                admitted.release()
        reply = Reply(outcome.result, errors=tuple(outcome.errors))
        header = replace(reply_header(request.header, self._now(), source=SOURCE),
                         message_id=str(uuid.uuid4()))
        response = MeterReadingsResponse(
            header=header,
            reply=reply,
            meter_readings=outcome.meter_readings,
        )
        yield self._store.call(request_log.answered, self._store.store, logged,
                               replied_at=self._now(), result=outcome.result.value,
                               devices_asked=outcome.devices_asked,
                               devices_failed=outcome.devices_failed)
        element = yield encode_off_the_reactor(response)
        return element


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
