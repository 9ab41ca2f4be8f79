"""`cimhes harness`: every scenario passes against cimhes's own head-end and simulated meters; a
head-end whose reply is deliberately broken fails exactly the scenario that sees it; JUnit XML for
CI. `--listen` plays the head-end for an MDM: a zeep client generated from the standard's
reference WSDL (address changed only) gets schema-valid answers, and a reference sample request
gets its verdict."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest
import pytest_twisted
import requests
import zeep
from lxml import etree
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.endpoints import harness
from cimhes.endpoints.harness_listener import HarnessHeadEnd
from cimhes.fixtures.fleet import start_fleet
from cimhes.xsd import wsdl_text

from .credentials import TEST_PASSWORD, TEST_USER
from .head_ends import close_head_end, devices_of, serve_head_end
from .schemas import assert_valid_everywhere, reference, sample

NOW = datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 1, clock=lambda: datetime.now(timezone.utc), base_index=281,
                        port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet):
    head_end = serve_head_end(tmp_path, devices_of(fleet))
    yield head_end
    close_head_end(head_end)


def _session():
    session = requests.Session()
    session.auth = (TEST_USER, TEST_PASSWORD)
    return session


@pytest_twisted.inlineCallbacks
def test_every_scenario_passes_against_cimhes(head_end, fleet, tmp_path):
    out = io.StringIO()
    meter = fleet.inventory()["meters"][0]["mrid"]
    target = harness.Target(head_end.base_url, _session(), [meter], control_meters=[meter])
    outcomes = yield deferToThread(harness.run, target, None, out)
    assert [(o.name, o.passed) for o in outcomes] == [(s[0], True) for s in harness.SCENARIOS], \
        out.getvalue()
    count = len(harness.SCENARIOS)
    assert {"controls-wsdl", "control-switch"} <= {s[0] for s in harness.SCENARIOS}
    assert f"[1/{count}] wsdl" in out.getvalue() and f"{count} passed, 0 failed" in out.getvalue()
    suite = etree.fromstring(harness.junit_xml(outcomes, "cimhes-harness"))
    assert (suite.get("tests"), suite.get("failures")) == (str(count), "0")
    assert [case.get("name") for case in suite] == [s[0] for s in harness.SCENARIOS]


class _BrokenHeadEnd(Resource):
    """Serves the real WSDL, but answers every request with a reply that has no Reply element."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        return wsdl_text("GetMeterReadings.wsdl", "http://127.0.0.1/cim/GetMeterReadings")

    def render_POST(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        return (b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
                b'<soapenv:Body><w:MeterReadingsResponseMessage '
                b'xmlns:w="http://iec.ch/TC57/2011/GetMeterReadingsMessage" '
                b'xmlns:m="http://iec.ch/TC57/2011/schema/message"><w:Header><m:Verb>reply</m:Verb>'
                b'<m:Noun>MeterReadings</m:Noun></w:Header></w:MeterReadingsResponseMessage>'
                b'</soapenv:Body></soapenv:Envelope>')


@pytest_twisted.inlineCallbacks
def test_a_broken_reply_fails_the_scenarios_that_see_it(tmp_path):
    root, cim = Resource(), Resource()
    root.putChild(b"cim", cim)
    cim.putChild(b"GetMeterReadings", _BrokenHeadEnd())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        target = harness.Target(f"http://127.0.0.1:{port.getHost().port}", requests.Session(),
                                ["any-meter"])
        out = io.StringIO()
        outcomes = yield deferToThread(harness.run, target, ["wsdl", "registers", "unknown-meter"],
                                       out)
    finally:
        yield port.stopListening()
    verdicts = {o.name: o for o in outcomes}
    assert verdicts["wsdl"].passed
    assert not verdicts["registers"].passed and not verdicts["unknown-meter"].passed
    assert "not valid against GetMeterReadingsMessage.xsd" in verdicts["registers"].message
    assert "Reply" in verdicts["registers"].message
    suite = etree.fromstring(harness.junit_xml(outcomes, "cimhes-harness"))
    assert suite.get("failures") == "2"
    assert suite.find("testcase[@name='registers']/failure") is not None


def test_the_command_exits_1_and_writes_junit_when_a_scenario_fails(tmp_path):
    junit = tmp_path / "harness.xml"
    # Nothing listens on this port: every scenario fails, cleanly, with a line each.
    code = harness.harness_main(["--url", "http://127.0.0.1:9", "--junit", str(junit),
                                 "--scenario", "wsdl"])
    assert code == 1
    assert etree.parse(str(junit)).getroot().get("failures") == "1"


@pytest.fixture
def listener():
    out = io.StringIO()
    resource = HarnessHeadEnd(out)
    root, cim = Resource(), Resource()
    root.putChild(b"cim", cim)
    cim.putChild(b"GetMeterReadings", resource)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    resource.url = f"http://127.0.0.1:{port.getHost().port}/cim/GetMeterReadings"
    yield resource
    pytest_twisted.blockon(port.stopListening())


def _reference_client(url: str):
    wsdl = reference("connexo", "coko-outbound", "meterreadings", "GetMeterReadings.wsdl")
    client = zeep.Client(str(wsdl))
    return client.create_service("{http://iec.ch/TC57/2011/GetMeterReadings}GetMeterReadings_Binding",
                                 url)


@pytest_twisted.inlineCallbacks
def test_listen_answers_a_client_generated_from_the_reference_wsdl(listener):
    service = yield deferToThread(_reference_client, listener.url)
    reply = yield deferToThread(
        service.GetMeterReadings,
        Header={"Verb": "get", "Noun": "MeterReadings", "MessageID": "mdm-1"},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": "mdm-meter-1"}],
                                      "ReadingType": [{"mRID": harness.PLUS_A}]}})
    assert reply.Reply.Result == "OK"
    assert reply.Header.CorrelationID == "mdm-1"
    assert reply.Payload.MeterReadings.MeterReading[0].Meter.mRID == "mdm-meter-1"
    assert listener.verdicts == [(True, "valid GetMeterReadings for 1 EndDevice(s), "
                                        "1 ReadingType(s); answered with samples")]


@pytest_twisted.inlineCallbacks
def test_listen_judges_a_vendor_sample_request(listener):
    body = sample("connexo_GetMeterReadings_request_GetUsagePointReadingsRequest.xml")
    response = yield deferToThread(requests.post, listener.url, data=body, timeout=10,
                                   headers={"Content-Type": "text/xml; charset=utf-8"})
    ((ok, verdict),) = listener.verdicts
    answer = etree.fromstring(response.content)
    message = answer.find(".//{http://schemas.xmlsoap.org/soap/envelope/}Body")[0]
    if ok:
        assert_valid_everywhere(message)
    else:  # a fault whose detail is the schema-valid FaultMessage naming the problem
        assert_valid_everywhere(message.find("detail")[0])
        assert verdict.startswith("request refused:")
