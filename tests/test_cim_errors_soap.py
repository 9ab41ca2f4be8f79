"""Every 61968-100 error code cimhes sends, each provoked through a real SOAP call (zeep built from
the served WSDL, or raw HTTP where a client library would refuse to send the bad message), and
the SOAP-level answers: VersionMismatch for SOAP 1.2, a Fault for unknown /cim/ paths, the
WSDL's address behind a reverse proxy."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
import requests
import zeep
from lxml import etree
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.meter_readings import ReadingRequestLimits
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.admission import RequestLimits
from cimhes.fixtures.fleet import start_fleet

from .credentials import TEST_PASSWORD, TEST_USER, add_test_user, zeep_client
from .schemas import assert_valid_everywhere

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
MSG = "http://iec.ch/TC57/2011/schema/message"
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
REACTIVE = "0.0.0.1.1.1.73.0.0.0.0.0.0.0.0.3.73.0"  # a valid code the IDIS driver does not map
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
FIRST_METER = 211  # hosts 127.0.1.211..; every meter on an ephemeral port (port 0)


def _head_end(tmp_path, fleet, **settings):
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key"), **settings),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    add_test_user(head_end)
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.base_url = f"http://127.0.0.1:{port.getHost().port}"
    head_end.port = port
    return head_end


def _close(head_end):
    pytest_twisted.blockon(head_end.port.stopListening())
    head_end.store_runner.stop()
    head_end.store.close()


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 2, clock=lambda: NOW, base_index=FIRST_METER, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet):
    head_end = _head_end(tmp_path, fleet, request_limits=RequestLimits(max_devices_per_request=3))
    yield head_end
    _close(head_end)


def _meters(fleet):
    return fleet.inventory()["meters"]


def _call(base_url, devices, reading_types=(PLUS_A,), header=None, window=False):
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl")
    profile = {"EndDevice": devices, "ReadingType": [{"mRID": rt} for rt in reading_types]}
    if window:
        end = NOW.replace(minute=0, second=0)
        profile["Reading"] = [{"timePeriod": {"start": end - timedelta(hours=1), "end": end}}]
    return client.service.GetMeterReadings(
        Header=header or {"Verb": "get", "Noun": "MeterReadings", "MessageID": "errors-1"},
        Request={"GetMeterReadings": profile})


def _fault_errors(fault: zeep.exceptions.Fault):
    """(code, details, ID) of each Error in a Fault's MeterReadingsFaultMessage detail."""
    message = fault.detail[0]  # (the raw fault's validity is checked by the 1.8 test below)
    return [(e.findtext(f"{{{MSG}}}code"), e.findtext(f"{{{MSG}}}details"),
             e.findtext(f"{{{MSG}}}ID")) for e in message.iter(f"{{{MSG}}}Error")]


def _post(base_url, body: bytes, content_type="text/xml; charset=utf-8", path="GetMeterReadings"):
    return requests.post(f"{base_url}/cim/{path}", data=body, auth=(TEST_USER, TEST_PASSWORD),
                         headers={"Content-Type": content_type,
                                  "SOAPAction": "http://iec.ch/TC57/2011/GetMeterReadings/"
                                                "GetMeterReadings"}, timeout=10)


def _envelope(meter_mrid: str, extra: str = "") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}" xmlns:w="http://iec.ch/TC57/2011/GetMeterReadingsMessage"
    xmlns:m="{MSG}" xmlns:g="http://iec.ch/TC57/2011/GetMeterReadings#">
 <soapenv:Body><w:GetMeterReadings>
  <w:Header><m:Verb>get</m:Verb><m:Noun>MeterReadings</m:Noun></w:Header>
  <w:Request><g:GetMeterReadings><g:EndDevice><g:mRID>{meter_mrid}</g:mRID></g:EndDevice>{extra}
  </g:GetMeterReadings></w:Request>
 </w:GetMeterReadings></soapenv:Body></soapenv:Envelope>""".encode()


def _errors(reply):
    return [(e.code, e.details, e.ID._value_1 if e.ID is not None else None)
            for e in reply.Reply.Error]


# ------------------------------------------------------------------------------- the codes


@pytest_twisted.inlineCallbacks
def test_1_8_a_schema_invalid_request_is_a_fault_with_1_8(head_end, fleet):
    response = yield deferToThread(_post, head_end.base_url,
                                   _envelope(_meters(fleet)[0]["mrid"], "<g:Surprise/>"))
    assert response.status_code == 500
    detail = etree.fromstring(response.content).find(f".//{{{SOAP_ENV}}}Fault/detail")[0]
    assert_valid_everywhere(detail)
    assert detail.findtext(f".//{{{MSG}}}code") == "1.8"
    assert "Surprise" in detail.findtext(f".//{{{MSG}}}reason")


@pytest_twisted.inlineCallbacks
def test_2_4_an_unknown_meter_is_failed_with_2_4_naming_it(head_end):
    reply = yield deferToThread(_call, head_end.base_url, [{"mRID": "no-such-meter"}])
    assert reply.Reply.Result == "FAILED"
    assert _errors(reply) == [("2.4", None, "no-such-meter")]


@pytest_twisted.inlineCallbacks
def test_2_4_an_mrid_and_names_of_two_meters_is_an_error_not_a_choice(head_end, fleet):
    first, second = _meters(fleet)
    reply = yield deferToThread(_call, head_end.base_url, [
        {"mRID": first["mrid"], "Names": [{"name": second["name"]}]}])
    assert reply.Reply.Result == "FAILED"
    ((code, details, object_id),) = _errors(reply)
    assert (code, details, object_id) == ("2.4", "mrid-names-mismatch", first["mrid"])
    assert reply.Payload is None


@pytest_twisted.inlineCallbacks
def test_2_5_and_2_9_wrong_noun_and_verb(head_end, fleet):
    device = [{"mRID": _meters(fleet)[0]["mrid"]}]
    with pytest.raises(zeep.exceptions.Fault) as noun:
        yield deferToThread(_call, head_end.base_url, device,
                            header={"Verb": "get", "Noun": "EndDeviceEvents"})
    with pytest.raises(zeep.exceptions.Fault) as verb:
        yield deferToThread(_call, head_end.base_url, device,
                            header={"Verb": "create", "Noun": "MeterReadings"})
    assert [code for code, _, _ in _fault_errors(noun.value)] == ["2.5"]
    assert [code for code, _, _ in _fault_errors(verb.value)] == ["2.9"]


@pytest_twisted.inlineCallbacks
def test_2_6_a_malformed_reading_type_names_the_reading_type(head_end, fleet):
    with pytest.raises(zeep.exceptions.Fault) as caught:
        yield deferToThread(_call, head_end.base_url, [{"mRID": _meters(fleet)[0]["mrid"]}],
                            reading_types=["0.0.0.1.1.1.12.0"])
    ((code, _details, object_id),) = _fault_errors(caught.value)
    assert (code, object_id) == ("2.6", "0.0.0.1.1.1.12.0")


@pytest_twisted.inlineCallbacks
def test_2_10_an_unsupported_reading_type_is_partial_and_names_the_reading_type(head_end, fleet):
    meter = _meters(fleet)[0]
    reply = yield deferToThread(_call, head_end.base_url, [{"mRID": meter["mrid"]}],
                                reading_types=[PLUS_A, REACTIVE])
    assert reply.Reply.Result == "PARTIAL"
    assert _errors(reply) == [("2.10", f"EndDevice {meter['mrid']}", REACTIVE)]
    (meter_reading,) = reply.Payload.MeterReadings.MeterReading
    assert [r.ReadingType.ref for r in meter_reading.Readings] == [PLUS_A]


@pytest_twisted.inlineCallbacks
def test_1_6_an_interval_type_without_a_window_names_the_reading_type(head_end, fleet):
    reply = yield deferToThread(_call, head_end.base_url, [{"mRID": _meters(fleet)[0]["mrid"]}],
                                reading_types=[PLUS_A_PROFILE])
    assert reply.Reply.Result == "FAILED"
    assert _errors(reply) == [("1.6", "time-window-missing", PLUS_A_PROFILE)]


@pytest_twisted.inlineCallbacks
def test_3_1_too_many_items(head_end):
    reply = yield deferToThread(_call, head_end.base_url,
                                [{"mRID": f"m-{i}"} for i in range(4)])
    assert reply.Reply.Result == "FAILED"
    ((code, _, _),) = _errors(reply)
    assert code == "3.1"
    assert "at most 3" in reply.Reply.Error[0].reason


@pytest_twisted.inlineCallbacks
def test_3_2_and_4_1_pending_and_timed_out(tmp_path):
    # Meters answering slowly: the first request outlives the synchronous time limit (4.1) and,
    # while it is still reading, a second one finds the one pending slot taken (3.2).
    fleet = start_fleet(reactor, 1, clock=lambda: NOW, base_index=FIRST_METER + 10, port=0,
                        response_delay=0.4)
    head_end = _head_end(tmp_path, fleet, reading_requests=ReadingRequestLimits(
        sync_time_limit=0.5), request_limits=RequestLimits(max_pending_per_caller=1))
    try:
        device = [{"mRID": _meters(fleet)[0]["mrid"]}]
        first = deferToThread(_call, head_end.base_url, device)
        # Once its meter session is open, the first request holds the one slot (a full read of a
        # meter answering in 0.4 s takes several seconds).
        while not fleet.open_connections() and not first.called:
            yield deferToThread(time.sleep, 0.05)
        second = yield deferToThread(_call, head_end.base_url, device)
        first = yield first
        assert _errors(second)[0][0] == "3.2"
        assert second.Reply.Result == "FAILED"
        assert first.Reply.Result == "FAILED"
        assert _errors(first)[0][0] == "4.1"
        assert "still being read" in first.Reply.Error[0].reason
    finally:
        yield head_end.port.stopListening()
        head_end.store_runner.stop()
        head_end.store.close()
        yield fleet.stop_all()


@pytest_twisted.inlineCallbacks
def test_5_3_a_stopped_meter_is_5_3_with_the_device_named(head_end, fleet):
    first, second = _meters(fleet)
    yield fleet.stop(FIRST_METER + 1)
    reply = yield deferToThread(_call, head_end.base_url,
                                [{"mRID": first["mrid"]}, {"mRID": second["mrid"]}])
    assert reply.Reply.Result == "PARTIAL"
    ((code, details, object_id),) = _errors(reply)
    assert (code, object_id) == ("5.3", second["mrid"])
    assert details.startswith("device-unreachable")


@pytest_twisted.inlineCallbacks
def test_async_asked_without_reply_address_is_1_5_and_never_silently_sync(head_end, fleet):
    device = [{"mRID": _meters(fleet)[0]["mrid"]}]
    reply = yield deferToThread(_call, head_end.base_url, device, header={
        "Verb": "get", "Noun": "MeterReadings", "AsyncReplyFlag": True})
    assert reply.Reply.Result == "FAILED"
    assert _errors(reply) == [("1.5", "reply-address-missing", None)]
    assert reply.Payload is None


# ------------------------------------------------------------------------ SOAP-level answers


@pytest_twisted.inlineCallbacks
def test_a_soap_1_2_envelope_gets_a_version_mismatch_fault(head_end, fleet):
    body = _envelope(_meters(fleet)[0]["mrid"]).replace(
        SOAP_ENV.encode(), b"http://www.w3.org/2003/05/soap-envelope")
    response = yield deferToThread(_post, head_end.base_url, body)
    assert response.status_code == 500
    fault = etree.fromstring(response.content).find(f".//{{{SOAP_ENV}}}Fault")
    assert fault.findtext("faultcode").endswith(":VersionMismatch")
    # and as SOAP 1.2 says it is (its media type): the same fault
    response = yield deferToThread(_post, head_end.base_url, body,
                                   content_type="application/soap+xml; charset=utf-8")
    assert etree.fromstring(response.content).find(
        f".//{{{SOAP_ENV}}}Fault").findtext("faultcode").endswith(":VersionMismatch")


@pytest_twisted.inlineCallbacks
def test_xml_that_is_not_soap_is_a_client_fault(head_end):
    response = yield deferToThread(_post, head_end.base_url, b"<hello/>")
    assert response.status_code == 500
    fault = etree.fromstring(response.content).find(f".//{{{SOAP_ENV}}}Fault")
    assert "not a SOAP 1.1 Envelope" in fault.findtext("faultstring")


@pytest_twisted.inlineCallbacks
def test_an_unknown_cim_path_is_a_soap_fault_naming_the_services(head_end):
    got = yield deferToThread(requests.get, f"{head_end.base_url}/cim/GetMeterReading?wsdl",
                              timeout=10)
    posted = yield deferToThread(_post, head_end.base_url, b"<x/>", path="Nope")
    for response, status in ((got, 404), (posted, 500)):
        assert response.status_code == status
        assert response.headers["content-type"].startswith("text/xml")
        fault = etree.fromstring(response.content).find(f".//{{{SOAP_ENV}}}Fault")
        assert "/cim/GetMeterReadings" in fault.findtext("faultstring")


def _address(wsdl: bytes) -> str:
    return etree.fromstring(wsdl).find(
        ".//{http://schemas.xmlsoap.org/wsdl/soap/}address").get("location")


@pytest_twisted.inlineCallbacks
def test_the_wsdl_address_follows_a_reverse_proxy(head_end):
    url = f"{head_end.base_url}/cim/GetMeterReadings?wsdl"
    plain = yield deferToThread(requests.get, url, timeout=10)
    assert _address(plain.content) == f"{head_end.base_url}/cim/GetMeterReadings"
    proxied = yield deferToThread(requests.get, url, timeout=10, headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "hes.example.com:8443",
        "X-Forwarded-Prefix": "/api"})
    assert _address(proxied.content) == "https://hes.example.com:8443/api/cim/GetMeterReadings"
    rfc = yield deferToThread(requests.get, url, timeout=10, headers={
        "Forwarded": 'for=192.0.2.1;proto=https;host="hes.example.com"'})
    assert _address(rfc.content) == "https://hes.example.com/cim/GetMeterReadings"
    hostile = yield deferToThread(requests.get, url, timeout=10, headers={
        "X-Forwarded-Host": 'evil"><x'})
    assert _address(hostile.content).startswith("http://127.0.0.1:")
