"""Publishing to an MDM: every set of values read from meters goes as CreatedMeterReadings to each
subscriber's ReceiveMeterReadings service (a spyne SOAP server on Twisted here, on port 0). A
subscriber that is down gets retries with backoff and nothing is dropped: what was not delivered
stays in the outbox, and a head-end started again on the same database delivers it."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
import pytest_twisted
from spyne import AnyXml, ServiceBase, rpc
from sqlalchemy import select
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.cim.codec import decode_created_meter_readings, encode_event_response
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.drivers import DeviceAddress
from cimhes.endpoints.publisher import parse_subscriber
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.engine.store import OutboxMessage
from cimhes.fixtures.fleet import start_fleet

from .credentials import add_test_user, zeep_client
from .schemas import REFERENCE, _compiled

PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
EVENTS_NS = "http://iec.ch/TC57/2011/MeterReadingsMessage"
REFERENCE_EVENTS = REFERENCE / "connexo" / "coko-outbound" / "meterreadings" / "xsd" / "MeterReadingsMessage.xsd"


def _mdm_site(received: list, arrived: defer.Deferred) -> Site:
    class ReceiveMeterReadingsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="CreatedMeterReadings",
             _returns=AnyXml, _operation_name="CreatedMeterReadings")
        def CreatedMeterReadings(ctx, element):
            received.append(element)
            if not arrived.called:
                arrived.callback(element)
            return encode_event_response(Header(verb=Verb.REPLY, noun="MeterReadings"),
                                         Reply(ReplyResult.OK))

    root, mdm = Resource(), Resource()
    root.putChild(b"mdm", mdm)
    mdm.putChild(b"ReceiveMeterReadings", SoapResource(
        soap_application(ReceiveMeterReadingsService, tns=EVENTS_NS, name="ReceiveMeterReadings"),
        "ReceiveMeterReadings.wsdl"))
    return Site(root)


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 1, clock=lambda: NOW, base_index=271, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


def _head_end(tmp_path, fleet, subscriber_url):
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key"),
        subscribers=(("mdm-a", subscriber_url),), publish_first_retry=0.2),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    add_test_user(head_end)
    head_end.port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.base_url = f"http://127.0.0.1:{head_end.port.getHost().port}"
    return head_end


@defer.inlineCallbacks
def _close(head_end):
    head_end.publisher.stop()
    yield head_end.port.stopListening()
    head_end.store_runner.stop()
    head_end.store.close()


def _outbox(head_end):
    with head_end.store._session() as session:
        return [(r.attempts, r.published_at is not None, r.last_error)
                for r in session.scalars(select(OutboxMessage))]


def _read(base_url, mrid):
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl")
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings"},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": mrid}],
                                      "ReadingType": [{"mRID": PLUS_A}]}})


@pytest_twisted.inlineCallbacks
def test_an_mdm_that_is_down_gets_its_readings_after_a_restart(tmp_path, fleet):
    # A port nothing listens on (yet): the subscriber is down.
    probe = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    mdm_port = probe.getHost().port
    yield probe.stopListening()
    url = f"http://127.0.0.1:{mdm_port}/mdm/ReceiveMeterReadings"
    meter = fleet.inventory()["meters"][0]

    first = _head_end(tmp_path, fleet, url)
    try:
        reply = yield deferToThread(_read, first.base_url, meter["mrid"])
        assert reply.Reply.Result == "OK"
        for _ in range(100):  # retried with backoff (0.2 s, 0.4 s ...) while it is down
            rows = _outbox(first)
            if rows and rows[0][0] >= 2:
                break
            yield deferToThread(time.sleep, 0.1)
        ((attempts, published, error),) = _outbox(first)
        assert attempts >= 2 and not published
        assert "Connection" in error
    finally:
        yield _close(first)

    received, arrived = [], defer.Deferred()
    mdm = reactor.listenTCP(mdm_port, _mdm_site(received, arrived), interface="127.0.0.1")
    second = _head_end(tmp_path, fleet, url)  # same database: the outbox row is still there
    try:
        element = yield arrived
        header, readings = decode_created_meter_readings(element)
        assert (header.verb, header.noun) == (Verb.CREATED, "MeterReadings")
        ((reading,),) = [m.readings for m in readings]
        assert (readings[0].meter.mrid, reading.reading_type, reading.timestamp) == (
            meter["mrid"], PLUS_A, NOW)
        if REFERENCE_EVENTS.exists():
            _compiled(REFERENCE_EVENTS).assertValid(element)
        for _ in range(50):
            if _outbox(second)[0][1]:
                break
            yield deferToThread(time.sleep, 0.1)
        ((_attempts, published, error),) = _outbox(second)
        assert published and error is None
        assert len(received) == 1
    finally:
        yield _close(second)
        yield mdm.stopListening()


def test_a_subscriber_is_name_equals_url():
    assert parse_subscriber("mdm-a=https://mdm.example/cim/ReceiveMeterReadings") == (
        "mdm-a", "https://mdm.example/cim/ReceiveMeterReadings")
    with pytest.raises(ValueError):
        parse_subscriber("https://mdm.example/x")
