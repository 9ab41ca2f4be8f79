"""The whole path: a zeep client built from the served WSDL, SOAP over HTTP, the engine, DLMS over
TCP to simulated meters on loopback, SQLite, and back — checked against the simulator's documented
value functions and against the schemas."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from zeep.plugins import HistoryPlugin

from cimhes.cim.message import ErrorCode
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet

from .credentials import TEST_PASSWORD, TEST_USER, zeep_client
from .head_ends import close_head_end, devices_of, serve_head_end
from .schemas import assert_valid_everywhere

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
MESSAGE_NS = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
ENVELOPE_NS = "http://iec.ch/TC57/2011/schema/message"
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
WINDOW_END = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
WINDOW_START = WINDOW_END - timedelta(hours=24)

REGISTERS = {
    "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": "1.0.1.8.0.255",
    "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": "1.0.2.8.0.255",
    "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0": "1.0.1.8.1.255",
    "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0": "1.0.1.8.2.255",
}
PROFILE_PLUS_A = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
FIRST_METER = 201  # loopback 127.0.1.201.. keeps clear of a demo on 127.0.1.1..


def kwh(raw: int, obis: str) -> Decimal:
    scaler, _unit = meter_model.SCALER_UNIT[obis]
    return Decimal(raw).scaleb(scaler) / 1000


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 3, clock=lambda: NOW, base_index=FIRST_METER, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet):
    head_end = serve_head_end(tmp_path, devices_of(fleet))
    yield head_end
    close_head_end(head_end)


def _client(base_url: str):
    history = HistoryPlugin()
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl", plugins=[history])
    return client, history


def _ask(client, mrids: list[str]):
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings", "MessageID": "e2e-1",
                "Source": "test-mdm"},
        Request={"GetMeterReadings": {
            "EndDevice": [{"mRID": m} for m in mrids],
            "ReadingType": [{"mRID": rt} for rt in [*REGISTERS, PROFILE_PLUS_A]],
            "Reading": [{"timePeriod": {"start": WINDOW_START, "end": WINDOW_END}}],
        }})


@pytest_twisted.inlineCallbacks
def test_zeep_reads_three_meters_and_gets_the_simulators_values(head_end, fleet):
    meters = fleet.inventory()["meters"]
    client, history = yield deferToThread(_client, head_end.base_url)
    reply = yield deferToThread(_ask, client, [m["mrid"] for m in meters])

    body = history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0]
    assert_valid_everywhere(body)
    assert reply.Header.Verb == "reply"
    assert reply.Header.CorrelationID == "e2e-1"
    assert reply.Reply.Result == "OK", reply.Reply
    assert not reply.Reply.Error

    by_mrid = {mr.Meter.mRID: mr for mr in reply.Payload.MeterReadings.MeterReading}
    assert set(by_mrid) == {m["mrid"] for m in meters}
    for entry in meters:
        meter_reading = by_mrid[entry["mrid"]]
        serial = entry["name"]
        registers = {r.ReadingType.ref: r for r in meter_reading.Readings}
        assert set(registers) == set(REGISTERS)
        # The window ends before the meter's clock: a register gives the billing value the
        # daily profile captured inside it (at midnight), not its present value.
        midnight = WINDOW_END.replace(hour=0, minute=0)
        for reading_type, obis in REGISTERS.items():
            reading = registers[reading_type]
            assert reading.timeStamp == midnight
            assert Decimal(reading.value) == kwh(meter_model.register_raw(serial, obis, midnight), obis)
        (block,) = meter_reading.IntervalBlocks
        assert block.ReadingType.ref == PROFILE_PLUS_A
        rows = meter_model.profile_rows(serial, WINDOW_START, WINDOW_END)
        expected = [(ts, kwh(plus_a, "1.0.1.8.0.255")) for ts, plus_a, _minus_a in rows
                    if WINDOW_START < ts <= WINDOW_END]
        got = [(r.timeStamp, Decimal(r.value)) for r in block.IntervalReadings]
        assert len(got) == 96
        assert got == expected

    # What was read is stored.
    stored = head_end.store.stored_values(meters[0]["mrid"], PROFILE_PLUS_A)
    assert [(ts, value) for ts, value in stored] == [
        (r.timeStamp, Decimal(r.value))
        for r in by_mrid[meters[0]["mrid"]].IntervalBlocks[0].IntervalReadings]
    (logged,) = head_end.store.requests()
    assert (logged.message_id, logged.result, logged.devices_asked) == ("e2e-1", "OK", 3)


@pytest_twisted.inlineCallbacks
def test_a_stopped_meter_makes_the_reply_partial_and_the_others_complete(head_end, fleet):
    meters = fleet.inventory()["meters"]
    yield fleet.stop(FIRST_METER + 1)
    client, history = yield deferToThread(_client, head_end.base_url)
    reply = yield deferToThread(_ask, client, [m["mrid"] for m in meters])

    assert_valid_everywhere(history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0])
    assert reply.Reply.Result == "PARTIAL"
    (error,) = reply.Reply.Error
    dead = meters[1]["mrid"]
    assert error.ID._value_1 == dead
    assert dead in error.reason
    answered = {mr.Meter.mRID: mr for mr in reply.Payload.MeterReadings.MeterReading}
    assert set(answered) == {meters[0]["mrid"], meters[2]["mrid"]}
    for meter_reading in answered.values():
        assert len(meter_reading.Readings) == 4
        assert len(meter_reading.IntervalBlocks[0].IntervalReadings) == 96


@pytest_twisted.inlineCallbacks
def test_unknown_meters_are_errors_naming_them_and_none_known_fails(head_end):
    client, history = yield deferToThread(_client, head_end.base_url)
    reply = yield deferToThread(_ask, client, ["no-such-meter"])
    assert_valid_everywhere(history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0])
    assert reply.Reply.Result == "FAILED"
    (error,) = reply.Reply.Error
    assert error.ID._value_1 == "no-such-meter"
    assert "no-such-meter" in error.reason


@pytest_twisted.inlineCallbacks
def test_hostile_and_invalid_requests_get_a_fault_and_the_server_keeps_serving(head_end, fleet):
    import requests

    url = f"{head_end.base_url}/cim/GetMeterReadings"
    headers = {"Content-Type": "text/xml; charset=utf-8",
               "SOAPAction": '"http://iec.ch/TC57/2011/GetMeterReadings/GetMeterReadings"'}
    laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
              b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
              b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
              b'<soapenv:Body>&lol2;</soapenv:Body></soapenv:Envelope>')
    invalid = (b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
               b'<soapenv:Body><m:GetMeterReadings '
               b'xmlns:m="http://iec.ch/TC57/2011/GetMeterReadingsMessage">'
               b'<m:Header><x:Verb xmlns:x="http://iec.ch/TC57/2011/schema/message">fetch'
               b'</x:Verb></m:Header></m:GetMeterReadings></soapenv:Body></soapenv:Envelope>')
    refused = {}
    for name, payload in [("laughs", laughs), ("invalid", invalid), ("garbage", b"<not-xml")]:
        response = yield deferToThread(requests.post, url, data=payload, headers=headers,
                                       auth=(TEST_USER, TEST_PASSWORD))
        assert response.status_code == 500
        fault = etree.fromstring(response.content).find(f".//{{{SOAP_ENV}}}Fault")
        assert fault.findtext("faultcode").split(":")[-1].startswith("Client")
        refused[name] = fault
    assert "DTD" in refused["laughs"].findtext("faultstring") or \
        "DOCTYPE" in refused["laughs"].findtext("faultstring")

    # A request that parses but breaks the schema gets the WSDL's typed fault in the detail.
    (detail,) = refused["invalid"].find("detail")
    assert detail.tag == f"{{{MESSAGE_NS}}}MeterReadingsFaultMessage"
    assert_valid_everywhere(detail)
    reply = detail.find(f"{{{MESSAGE_NS}}}Reply")
    assert reply.findtext(f"{{{ENVELOPE_NS}}}Result") == "FAILED"
    error = reply.find(f"{{{ENVELOPE_NS}}}Error")
    assert error.findtext(f"{{{ENVELOPE_NS}}}code") == ErrorCode.SCHEMA_INVALID.value
    assert "fetch" in error.findtext(f"{{{ENVELOPE_NS}}}reason")
    assert error.findtext(f"{{{ENVELOPE_NS}}}details")

    client, _history = yield deferToThread(_client, head_end.base_url)
    reply = yield deferToThread(_ask, client, [fleet.inventory()["meters"][0]["mrid"]])
    assert reply.Reply.Result == "OK"


@pytest_twisted.inlineCallbacks
def test_another_vendors_request_gets_a_schema_valid_answer(head_end):
    import requests

    from .schemas import sample

    envelope = sample("connexo_GetMeterReadings_request_GetUsagePointReadingsRequest.xml")
    response = yield deferToThread(
        requests.post, f"{head_end.base_url}/cim/GetMeterReadings", data=envelope,
        headers={"Content-Type": "text/xml; charset=utf-8",
                 "SOAPAction": '"http://iec.ch/TC57/2011/GetMeterReadings/GetMeterReadings"'},
        auth=(TEST_USER, TEST_PASSWORD))

    assert response.status_code == 200
    (answer,) = etree.fromstring(response.content).find(f"{{{SOAP_ENV}}}Body")
    assert_valid_everywhere(answer)
    reply = answer.find(f"{{{MESSAGE_NS}}}Reply")
    # It asks by UsagePoint, which this head-end does not resolve yet: said, per usage point.
    assert reply.findtext(f"{{{ENVELOPE_NS}}}Result") == "FAILED"
    (error,) = reply.findall(f"{{{ENVELOPE_NS}}}Error")
    assert error.findtext(f"{{{ENVELOPE_NS}}}ID") == "00000000-0000-0000-0000-0000000000ff"
    assert "UsagePoint" in error.findtext(f"{{{ENVELOPE_NS}}}reason")
