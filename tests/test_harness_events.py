"""The harness's GetEndDeviceEvents scenarios pass against cimhes and fail against a reply that
breaks the standard; ``--listen --send-created-events`` posts a schema-valid CreatedEndDeviceEvents
to a real ReceiveEndDeviceEvents endpoint."""
from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
import requests
from lxml import etree
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.cim.codec.end_device_events import encode_end_device_events_response
from cimhes.cim.end_device_events import EndDeviceEvent, EndDeviceEventsResponse
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.endpoints import harness
from cimhes.endpoints.harness_events import EVENT_SCENARIOS
from cimhes.fixtures.fleet import start_fleet
from cimhes.xsd import wsdl_text

from .credentials import TEST_PASSWORD, TEST_USER
from .head_ends import close_head_end, devices_of, serve_head_end
from .test_event_publishing import Subscriber

EVENT_NAMES = [name for name, _, _ in EVENT_SCENARIOS]


@pytest.fixture
def head_end(tmp_path):
    fleet = start_fleet(reactor, 1, clock=lambda: datetime.now(timezone.utc), base_index=301,
                        port=0)
    head_end = serve_head_end(tmp_path, devices_of(fleet))
    head_end.mrid = fleet.inventory()["meters"][0]["mrid"]
    yield head_end
    close_head_end(head_end)
    pytest_twisted.blockon(fleet.stop_all())


@pytest_twisted.inlineCallbacks
def test_the_event_scenarios_pass_against_cimhes(head_end):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    stored = [EndDeviceEvent(head_end.mrid, now - timedelta(days=d), "3.26.38.85",
                             f"0.0.99.98.0.255:{d}", "power down") for d in (1, 3, 9)]
    yield head_end.store_runner.call(head_end.events.save_events, stored, "push", now)
    session = requests.Session()
    session.auth = (TEST_USER, TEST_PASSWORD)
    out = io.StringIO()
    outcomes = yield deferToThread(harness.run, harness.Target(head_end.base_url, session,
                                                               [head_end.mrid]), EVENT_NAMES, out)
    assert [(o.name, o.passed) for o in outcomes] == [(n, True) for n in EVENT_NAMES], out.getvalue()
    by_name = {o.name: o for o in outcomes}
    assert by_name["events"].message == "2 event(s) in the last 7 days"
    assert by_name["events-unknown-meter"].message == "FAILED with 2.4"
    assert by_name["events-bad-period"].message == "FAILED with 1.8"
    assert f"6 passed, 0 failed" in out.getvalue()


class _EventsOutsideThePeriod(Resource):
    """A head-end that answers every GetEndDeviceEvents with a valid reply holding an event of
    ten years ago, and Result OK whatever was asked."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        return wsdl_text("GetEndDeviceEvents.wsdl", "http://127.0.0.1/cim/GetEndDeviceEvents")

    def render_POST(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        old = datetime(2016, 1, 1, tzinfo=timezone.utc)
        reply = encode_end_device_events_response(EndDeviceEventsResponse(
            Header(verb=Verb.REPLY, noun="EndDeviceEvents"), Reply(ReplyResult.OK),
            (EndDeviceEvent("m", old, "3.26.38.85", "x:1", "power down"),)))
        envelope = etree.Element("{http://schemas.xmlsoap.org/soap/envelope/}Envelope")
        etree.SubElement(envelope, "{http://schemas.xmlsoap.org/soap/envelope/}Body").append(reply)
        return etree.tostring(envelope)


@pytest_twisted.inlineCallbacks
def test_a_wrong_answer_fails_the_scenarios_that_see_it():
    root, cim = Resource(), Resource()
    root.putChild(b"cim", cim)
    cim.putChild(b"GetEndDeviceEvents", _EventsOutsideThePeriod())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        target = harness.Target(f"http://127.0.0.1:{port.getHost().port}", requests.Session(),
                                ["any-meter"])
        outcomes = yield deferToThread(harness.run, target, EVENT_NAMES, io.StringIO())
    finally:
        yield port.stopListening()
    verdicts = {o.name: o for o in outcomes}
    assert verdicts["events-wsdl"].passed
    assert not verdicts["events"].passed and "outside the period" in verdicts["events"].message
    for name in ("events-unknown-meter", "events-bad-period", "events-bad-type",
                 "events-wrong-verb"):
        assert not verdicts[name].passed
        assert "Result is OK" in verdicts[name].message


@pytest_twisted.inlineCallbacks
def test_listen_sends_a_created_end_device_events_sample():
    subscriber = Subscriber()
    try:
        from cimhes.endpoints.harness_events import send_created_events
        result = yield deferToThread(send_created_events, subscriber.url, requests.Session())
    finally:
        yield subscriber.down()
    assert result == "OK"
    ((header, events),) = subscriber.received
    assert (header.verb, header.noun) == (Verb.CREATED, "EndDeviceEvents")
    assert [e.event_type for e in events] == ["3.26.38.85", "3.26.38.49"]
