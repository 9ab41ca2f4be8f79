"""The 61968-100 asynchronous pattern end to end: a zeep client asks with AsyncReplyFlag, a
ReplyAddress and a CorrelationID; the synchronous answer is the acknowledgment (Result OK, 0.3),
and the outcome arrives, with the same CorrelationID, at an MDM's ReplyMeterReadings service — a
real spyne SOAP server on Twisted in this test, on port 0, built from the project's own
ReplyMeterReadings WSDL. A ReplyAddress the operator did not allow is refused and never called."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import pytest_twisted
import requests
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.cim.codec import decode_meter_readings_response, encode_meter_readings_response
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.cim.meter_readings import MeterReadingsResponse
from cimhes.endpoints.async_replies import ReplyAddressPolicy
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.fixtures.fleet import start_fleet

from .credentials import zeep_client
from .head_ends import close_head_end, devices_of, serve_head_end
from .schemas import assert_valid_everywhere

PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
MESSAGE_NS = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"


class MdmReceiver:
    """The MDM side: takes each MeterReadingsResponseMessage posted to it, answers Result OK."""

    def __init__(self):
        self.received = []
        self.waiting = defer.Deferred()

    def take(self, element):
        assert_valid_everywhere(element)
        self.received.append(element)
        if not self.waiting.called:
            self.waiting.callback(element)
        return encode_meter_readings_response(MeterReadingsResponse(
            header=Header(verb=Verb.REPLY, noun="MeterReadings"),
            reply=Reply(ReplyResult.OK)))


@pytest.fixture
def mdm():
    receiver = MdmReceiver()

    class ReplyMeterReadingsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="MeterReadingsResponseMessage",
             _returns=AnyXml, _operation_name="ReplyMeterReadings")
        def ReplyMeterReadings(ctx, element):
            return receiver.take(element)

    root = Resource()
    mdm = Resource()
    root.putChild(b"mdm", mdm)
    mdm.putChild(b"ReplyMeterReadings", SoapResource(
        soap_application(ReplyMeterReadingsService, tns=MESSAGE_NS, name="ReplyMeterReadings"),
        "ReplyMeterReadings.wsdl"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    receiver.base = f"http://127.0.0.1:{port.getHost().port}"
    yield receiver
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 1, clock=lambda: NOW, base_index=251, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet, mdm):
    head_end = serve_head_end(tmp_path, devices_of(fleet), reply_addresses=(f"{mdm.base}/mdm/",))
    yield head_end
    close_head_end(head_end)


def _ask_async(base_url, mrid, reply_address, correlation="corr-42"):
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl")
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings", "AsyncReplyFlag": True,
                "ReplyAddress": reply_address, "CorrelationID": correlation},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": mrid}],
                                      "ReadingType": [{"mRID": PLUS_A}]}})


@pytest_twisted.inlineCallbacks
def test_the_outcome_reaches_the_reply_address_with_the_correlation_id(head_end, fleet, mdm):
    meter = fleet.inventory()["meters"][0]
    ack = yield deferToThread(_ask_async, head_end.base_url, meter["mrid"],
                              f"{mdm.base}/mdm/ReplyMeterReadings")
    assert ack.Reply.Result == "OK"
    assert [(e.code, e.level) for e in ack.Reply.Error] == [("0.3", "INFORM")]
    assert ack.Header.CorrelationID == "corr-42"
    assert ack.Payload is None

    element = yield mdm.waiting
    outcome = decode_meter_readings_response(element)
    assert outcome.header.correlation_id == "corr-42"
    assert outcome.header.verb is Verb.REPLY
    assert outcome.reply.result is ReplyResult.OK
    (meter_reading,) = outcome.meter_readings
    assert meter_reading.meter.mrid == meter["mrid"]
    assert [r.reading_type for r in meter_reading.readings] == [PLUS_A]


@pytest_twisted.inlineCallbacks
def test_a_reply_address_not_allowed_is_refused_and_never_called(head_end, fleet, mdm):
    meter = fleet.inventory()["meters"][0]
    for address in (f"{mdm.base}/elsewhere/ReplyMeterReadings",
                    f"http://127.0.0.2:{mdm.base.rsplit(':', 1)[1]}/mdm/ReplyMeterReadings",
                    "file:///etc/passwd"):
        reply = yield deferToThread(_ask_async, head_end.base_url, meter["mrid"], address)
        assert reply.Reply.Result == "FAILED"
        assert [(e.code, e.details) for e in reply.Reply.Error] == [
            ("7.2", "reply-address-not-allowed")]
    yield deferToThread(requests.get, f"{mdm.base}/mdm/ReplyMeterReadings?wsdl", timeout=5)
    assert mdm.received == []


@pytest_twisted.inlineCallbacks
def test_async_without_any_correlation_is_refused(head_end, fleet, mdm):
    client = yield deferToThread(zeep_client, f"{head_end.base_url}/cim/GetMeterReadings?wsdl")
    reply = yield deferToThread(
        client.service.GetMeterReadings,
        Header={"Verb": "get", "Noun": "MeterReadings", "AsyncReplyFlag": True,
                "ReplyAddress": f"{mdm.base}/mdm/ReplyMeterReadings"},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": "x"}]}})
    assert [(e.code, e.ID) for e in reply.Reply.Error] == [("1.5", None)]
    assert mdm.received == []


def test_reply_address_policy_rows():
    policy = ReplyAddressPolicy(("http://mdm.example:8080/cb/", "https://mdm.example/"))
    assert policy.allows("http://mdm.example:8080/cb/ReplyMeterReadings")
    assert policy.allows("http://MDM.example:8080/cb")
    assert not policy.allows("http://mdm.example:8080/cbx")
    assert not policy.allows("http://mdm.example:8081/cb/x")
    assert not policy.allows("https://mdm.example:8080/cb/x")
    assert not policy.allows("http://user:pw@mdm.example:8080/cb/x")
    assert policy.allows("https://mdm.example:443/any/path")
    assert not ReplyAddressPolicy().allows("http://mdm.example:8080/cb/")
    with pytest.raises(ValueError):
        ReplyAddressPolicy(("ftp://mdm.example/",))
