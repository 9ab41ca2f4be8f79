"""The harness's EndDeviceControls scenarios against a head-end whose control replies are
deliberately wrong: each scenario that sees the fault fails, saying what it saw; the one that
switches a meter refuses to run without --control-meter."""
from __future__ import annotations

import io

import pytest_twisted
import requests
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.endpoints import harness
from cimhes.xsd import wsdl_text


class _AlwaysOk(Resource):
    """Serves the real ExecuteEndDeviceControls WSDL, answers every request Result OK, naming
    no control: right for nothing the scenarios ask."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        return wsdl_text("ExecuteEndDeviceControls.wsdl",
                         "http://127.0.0.1/cim/ExecuteEndDeviceControls")

    def render_POST(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        return (b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
                b'<soapenv:Body><w:EndDeviceControlsResponseMessage '
                b'xmlns:w="http://iec.ch/TC57/2011/EndDeviceControlsMessage" '
                b'xmlns:m="http://iec.ch/TC57/2011/schema/message"><w:Header><m:Verb>reply'
                b'</m:Verb><m:Noun>EndDeviceControls</m:Noun></w:Header><w:Reply><m:Result>OK'
                b'</m:Result></w:Reply></w:EndDeviceControlsResponseMessage>'
                b'</soapenv:Body></soapenv:Envelope>')


@pytest_twisted.inlineCallbacks
def test_a_head_end_that_says_ok_to_everything_fails_the_control_scenarios():
    root, cim = Resource(), Resource()
    root.putChild(b"cim", cim)
    cim.putChild(b"ExecuteEndDeviceControls", _AlwaysOk())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    names = [name for name, _description, _run in harness.SCENARIOS if name.startswith("control")]
    try:
        target = harness.Target(f"http://127.0.0.1:{port.getHost().port}", requests.Session(),
                                ["any-meter"])
        outcomes = yield deferToThread(harness.run, target, names, io.StringIO())
    finally:
        yield port.stopListening()
    verdicts = {o.name: o for o in outcomes}
    assert verdicts["controls-wsdl"].passed
    assert "names no EndDeviceControl mRID" in verdicts["control-schedule-cancel"].message
    for name in ("control-unknown-meter", "control-unknown-type", "control-wrong-verb",
                 "control-cancel-unknown"):
        assert not verdicts[name].passed
        assert "Result is OK" in verdicts[name].message, verdicts[name].message
    assert "--control-meter" in verdicts["control-switch"].message
    assert sum(o.passed for o in outcomes) == 1
