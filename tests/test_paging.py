"""A reply larger than one message: several schema-valid messages, each naming its part
(Header.Property MessageIndex/MessageCount) and each but the last carrying 0.1 "more to follow";
synchronously the next part is asked for with Request.Option Page, asynchronously each part is
its own callback."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from zeep.plugins import HistoryPlugin

from cimhes.cim.codec import decode_meter_readings_response
from cimhes.cim.meter_readings import DeviceRef, IntervalBlock, IntervalReading, MeterReading, Reading
from cimhes.cim.meter_readings import split_into_messages
from cimhes.endpoints.meter_readings import ReadingRequestLimits
from cimhes.fixtures.fleet import start_fleet

from .credentials import zeep_client
from .head_ends import close_head_end, devices_of, serve_head_end
from .schemas import assert_valid_everywhere
from .test_async_replies import mdm  # noqa: F401 (the MDM's ReplyMeterReadings receiver)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
END = datetime(2026, 11, 20, 12, 7, tzinfo=timezone.utc)  # reaches the meters' clock: registers
START = END - timedelta(hours=4)  # are their present values; 16 intervals + 1 register = 17


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 3, clock=lambda: NOW, base_index=261, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet, mdm):  # noqa: F811
    head_end = serve_head_end(
        tmp_path, devices_of(fleet), reply_addresses=(f"{mdm.base}/mdm/",),
        reading_requests=ReadingRequestLimits(max_values_per_message=20))
    yield head_end
    close_head_end(head_end)


def _ask(base_url, mrids, page=None, header=None):
    history = HistoryPlugin()
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl", plugins=[history])
    request = {"GetMeterReadings": {
        "EndDevice": [{"mRID": m} for m in mrids],
        "ReadingType": [{"mRID": PLUS_A}, {"mRID": PROFILE}],
        "Reading": [{"timePeriod": {"start": START, "end": END}}]}}
    if page is not None:
        request["Option"] = [{"name": "Page", "value": str(page)}]
    reply = client.service.GetMeterReadings(
        Header=header or {"Verb": "get", "Noun": "MeterReadings", "CorrelationID": "paged"},
        Request=request)
    assert_valid_everywhere(history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0])
    return reply


def _properties(reply):
    return {p.Name: p.Value for p in reply.Header.Property}


@pytest_twisted.inlineCallbacks
def test_a_large_reply_is_fetched_part_by_part(head_end, fleet):
    mrids = sorted(m["mrid"] for m in fleet.inventory()["meters"])
    first = yield deferToThread(_ask, head_end.base_url, mrids)
    assert _properties(first) == {"MessageIndex": "1", "MessageCount": "3"}
    assert first.Reply.Result == "OK"
    assert [(e.code, e.level) for e in first.Reply.Error] == [("0.1", "INFORM")]
    assert "Page=2" in first.Reply.Error[0].reason
    parts = [first]
    for page in (2, 3):
        part = yield deferToThread(_ask, head_end.base_url, mrids, page=page)
        assert _properties(part) == {"MessageIndex": str(page), "MessageCount": "3"}
        parts.append(part)
    assert [e.code for e in parts[1].Reply.Error] == ["0.1"], parts[1].Reply.Error
    assert not parts[2].Reply.Error
    got = [m.Meter.mRID for part in parts for m in part.Payload.MeterReadings.MeterReading]
    assert sorted(got) == mrids  # each meter once, over the three parts
    for part in parts:
        for meter_reading in part.Payload.MeterReadings.MeterReading:
            assert len(meter_reading.IntervalBlocks[0].IntervalReadings) == 16
            assert [r.ReadingType.ref for r in meter_reading.Readings] == [PLUS_A]
    beyond = yield deferToThread(_ask, head_end.base_url, mrids, page=4)
    assert beyond.Reply.Result == "FAILED" and "has 3 part(s)" in beyond.Reply.Error[0].reason


@pytest_twisted.inlineCallbacks
def test_an_asynchronous_large_reply_is_several_callbacks(head_end, fleet, mdm):  # noqa: F811
    mrids = sorted(m["mrid"] for m in fleet.inventory()["meters"])
    ack = yield deferToThread(_ask, head_end.base_url, mrids, header={
        "Verb": "get", "Noun": "MeterReadings", "AsyncReplyFlag": True, "CorrelationID": "c-9",
        "ReplyAddress": f"{mdm.base}/mdm/ReplyMeterReadings"})
    assert ack.Reply.Error[0].code == "0.3"
    for _ in range(100):
        if len(mdm.received) == 3:
            break
        yield deferToThread(__import__("time").sleep, 0.1)
    outcomes = [decode_meter_readings_response(e) for e in mdm.received]
    assert [dict(o.header.properties)["MessageIndex"] for o in outcomes] == ["1", "2", "3"]
    assert all(o.header.correlation_id == "c-9" for o in outcomes)
    assert [[e.code for e in o.reply.errors] for o in outcomes] == [["0.1"], ["0.1"], []]
    assert sorted(m.meter.mrid for o in outcomes for m in o.meter_readings) == mrids
    yield defer.succeed(None)


def test_split_never_cuts_a_meter_reading_and_keeps_the_order():
    def meter(name, values):
        block = IntervalBlock(PROFILE, tuple(IntervalReading(NOW, i) for i in range(values)))
        return MeterReading(DeviceRef(mrid=name), readings=(Reading(PLUS_A, 1, NOW),),
                            interval_blocks=(block,))
    readings = [meter("a", 9), meter("b", 9), meter("c", 30), meter("d", 1)]
    parts = split_into_messages(readings, 20)
    assert [[m.meter.mrid for m in part] for part in parts] == [["a", "b"], ["c"], ["d"]]
    assert split_into_messages([], 20) == [()]
