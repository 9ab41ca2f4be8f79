"""Asynchronous GetMeterReadings and GetEndDeviceEvents survive a SIGKILL of a real `cimhes serve`.

Both requests are acknowledged while their meter (real DLMS over TCP, slow to answer) is still
being read; the process is killed at once, before any outcome was posted. The next start on the
same database takes the owed replies over once the dead process's lease has run out, runs the
requests again, and the MDM's ReplyMeterReadings / ReplyEndDeviceEvents services (a real spyne
server here, called by cimhes's zeep client) each get the outcome once, with the request's
CorrelationID. A request whose runs were interrupted as often as `--reply-max-interrupted`
allows is answered FAILED 5.3 "interrupted" instead of being run again."""
from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.cim.codec import decode_meter_readings_response, encode_meter_readings_response
from cimhes.cim.codec.end_device_events import (
    decode_end_device_events_response,
    encode_end_device_events_response,
)
from cimhes.cim.end_device_events import EndDeviceEventsResponse
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.cim.meter_readings import MeterReadingsResponse
from cimhes.drivers.idis_events import EVENT_LOGS
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.fixtures.fleet import start_fleet, write_inventory

from .credentials import zeep_client
from .schemas import assert_valid_everywhere
from .test_cli import CIMHES, _start, _stop
from .test_controls_async_restart import _killed, _rows

PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
METER = 5335 + 70
USER, PASSWORD = "mdm-reader", "mdm-reader-password-1"
LEASE = 3  # s: the dead process's replies are taken over this long after its last renewal


def now() -> datetime:
    return datetime.now(timezone.utc)


class Mdm:
    """The MDM's ReplyMeterReadings and ReplyEndDeviceEvents: every outcome posted, by noun."""

    def __init__(self):
        self.readings, self.events = [], []

    def take(self, element, into, answer):
        into.append(element)
        return answer


@pytest.fixture
def mdm():
    receiver = Mdm()
    readings_ok = encode_meter_readings_response(MeterReadingsResponse(
        header=Header(verb=Verb.REPLY, noun="MeterReadings"), reply=Reply(ReplyResult.OK)))
    events_ok = encode_end_device_events_response(EndDeviceEventsResponse(
        header=Header(verb=Verb.REPLY, noun="EndDeviceEvents"), reply=Reply(ReplyResult.OK)))

    class ReplyMeterReadingsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="MeterReadingsResponseMessage",
             _returns=AnyXml, _operation_name="ReplyMeterReadings")
        def ReplyMeterReadings(ctx, element):
            return receiver.take(element, receiver.readings, readings_ok)

    class ReplyEndDeviceEventsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="EndDeviceEventsResponseMessage",
             _returns=AnyXml, _operation_name="ReplyEndDeviceEvents")
        def ReplyEndDeviceEvents(ctx, element):
            return receiver.take(element, receiver.events, events_ok)

    root, folder = Resource(), Resource()
    root.putChild(b"mdm", folder)
    folder.putChild(b"ReplyMeterReadings", SoapResource(soap_application(
        ReplyMeterReadingsService, tns="http://iec.ch/TC57/2011/GetMeterReadingsMessage",
        name="ReplyMeterReadings"), "ReplyMeterReadings.wsdl"))
    folder.putChild(b"ReplyEndDeviceEvents", SoapResource(soap_application(
        ReplyEndDeviceEventsService, tns="http://iec.ch/TC57/2011/GetEndDeviceEventsMessage",
        name="ReplyEndDeviceEvents"), "ReplyEndDeviceEvents.wsdl"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.7.1")
    receiver.base = f"http://127.0.7.1:{port.getHost().port}"
    yield receiver
    pytest_twisted.blockon(port.stopListening())


def _header(mdm, noun, correlation, reply):
    return {"Verb": "get", "Noun": noun, "MessageID": f"m-{correlation}",
            "CorrelationID": correlation, "AsyncReplyFlag": True,
            "ReplyAddress": f"{mdm.base}/mdm/{reply}"}


def _ask_readings(base_url, mdm, mrid, correlation):
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl", name=USER, password=PASSWORD)
    return client.service.GetMeterReadings(
        Header=_header(mdm, "MeterReadings", correlation, "ReplyMeterReadings"),
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": mrid}],
                                      "ReadingType": [{"mRID": PLUS_A}]},
                 "Option": [{"name": "DataSource", "value": "meter"}]})


def _ask_events(base_url, mdm, mrid, correlation, start, end):
    client = zeep_client(f"{base_url}/cim/GetEndDeviceEvents?wsdl", name=USER,
                         password=PASSWORD)
    return client.service.GetEndDeviceEvents(
        Header=_header(mdm, "EndDeviceEvents", correlation, "ReplyEndDeviceEvents"),
        Request={"GetEndDeviceEvents": {
            "Meter": [{"mRID": mrid}],
            "TimeSchedule": [{"scheduleInterval": {"start": start, "end": end}}]},
            "Option": [{"name": "DataSource", "value": "meter"}]})


async def _until(condition, seconds: float):
    for _ in range(int(seconds / 0.25)):
        if condition():
            return True
        await deferLater(reactor, 0.25, lambda: None)
    return condition()


@pytest_twisted.ensureDeferred
async def test_async_readings_and_events_owed_at_a_sigkill_reach_the_mdm_after_the_restart(
        tmp_path, mdm):
    # Every DLMS answer of the meter takes 1.5 s: a read is still under way at the kill.
    fleet = start_fleet(reactor, 1, clock=now, base_index=METER, port=0, response_delay=1.5)
    # At half past a minute, and asked for over 20 s around it: the simulated meters' own
    # history (fixtures/meter_model.py: whole minutes, e.g. power quality at 18:00 + k min on
    # some days) never falls in, whatever the time of day the test runs.
    power_down_at = (now() - timedelta(hours=2)).replace(second=30, microsecond=0)
    fleet.state(METER).record(EVENT_LOGS["standard"].obis, power_down_at, 1)
    processes = []
    try:
        inventory, db = tmp_path / "inventory.json", tmp_path / "cimhes.sqlite"
        write_inventory(inventory, fleet)
        mrid = fleet.inventory()["meters"][0]["mrid"]
        await deferToThread(subprocess.run, [
            str(CIMHES), "user", "add", USER, "--role", "readings-reader", "--role",
            "events-reader", "--password-stdin", "--db", str(db)], input=PASSWORD + "\n",
            text=True, check=True, capture_output=True)
        serve = ("serve", "--inventory", str(inventory), "--db", str(db), "--port", "0",
                 "--push-port", "0", "--reply-address", f"{mdm.base}/mdm/",
                 "--reply-lease", str(LEASE))
        first, ready = await deferToThread(_start, *serve)
        processes.append(first)
        ack = await deferToThread(_ask_readings, ready["base_url"], mdm, mrid, "corr-readings")
        assert ack.Reply.Result == "OK" and [e.code for e in ack.Reply.Error] == ["0.3"]
        ack = await deferToThread(_ask_events, ready["base_url"], mdm, mrid, "corr-events",
                                  power_down_at - timedelta(seconds=10),
                                  power_down_at + timedelta(seconds=10))
        assert ack.Reply.Result == "OK" and [e.code for e in ack.Reply.Error] == ["0.3"]

        # Killed while the meter is being read: nothing posted, both replies owed.
        await deferToThread(_killed, first)
        assert mdm.readings == [] and mdm.events == []
        assert _rows(db, "SELECT noun, correlation_id, sent_at, runs FROM pending_reply "
                         "ORDER BY id") == [("MeterReadings", "corr-readings", None, 1),
                                            ("EndDeviceEvents", "corr-events", None, 1)]

        second, ready = await deferToThread(_start, *serve)
        processes.append(second)
        assert await _until(lambda: mdm.readings and mdm.events, LEASE + 60), (
            "an owed reply did not reach the MDM after the restart")
        readings = decode_meter_readings_response(mdm.readings[0])
        assert_valid_everywhere(mdm.readings[0])
        assert readings.header.correlation_id == "corr-readings"
        assert readings.reply.result is ReplyResult.OK, readings.reply
        (meter_reading,) = readings.meter_readings
        assert meter_reading.meter.mrid == mrid
        assert [r.reading_type for r in meter_reading.readings] == [PLUS_A]
        events = decode_end_device_events_response(mdm.events[0])
        assert events.header.correlation_id == "corr-events"
        assert events.reply.result is ReplyResult.OK, events.reply
        assert [(e.device_mrid, e.created, e.device_code) for e in events.events] == [
            (mrid, power_down_at, f"{EVENT_LOGS['standard'].obis}:1")]
        assert await _until(lambda: _rows(
            db, "SELECT COUNT(*) FROM pending_reply WHERE sent_at IS NULL") == [(0,)], 10)
        assert _rows(db, "SELECT runs, attempts FROM pending_reply") == [(2, 0), (2, 0)]
        # Answered, never taken for interrupted synchronous requests.
        assert sorted(_rows(db, "SELECT message_id, result FROM request")) == [
            ("m-corr-events", "OK"), ("m-corr-readings", "OK")]

        # A request killed again, with a start that re-runs none after one interruption:
        # FAILED 5.3 "interrupted", with its CorrelationID, instead of a third run.
        ack = await deferToThread(_ask_readings, ready["base_url"], mdm, mrid, "corr-again")
        assert ack.Reply.Result == "OK"
        await deferToThread(_killed, second)
        third, _ = await deferToThread(_start, *serve, "--reply-max-interrupted", "1")
        processes.append(third)
        assert await _until(lambda: len(mdm.readings) == 2, LEASE + 60)
        again = decode_meter_readings_response(mdm.readings[1])
        assert_valid_everywhere(mdm.readings[1])
        assert again.header.correlation_id == "corr-again"
        assert again.reply.result is ReplyResult.FAILED
        assert [(e.code, (e.details or "").split(":")[0]) for e in again.reply.errors] == [
            ("5.3", "interrupted")]
        await deferToThread(_stop, third)
        assert len(mdm.readings) == 2 and len(mdm.events) == 1  # each outcome once
        assert "carrying on the asynchronous reply corr-again" in third.stderr.read()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        await fleet.stop_all()
