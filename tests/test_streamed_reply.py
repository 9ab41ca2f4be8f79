"""A request for many meters leaves its values in the store and each reply part is built from
there (engine/reading_sources.py, StoredAnswer): every part schema-valid, every meter in exactly
one part with all its values, the same values an in-memory answer gives, synchronously page by
page and asynchronously part by part."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from zeep.plugins import HistoryPlugin

from cimhes.cim.codec import decode_meter_readings_response
from cimhes.cim.message import Header, Verb
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings, ReadingSource
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
END = datetime(2026, 11, 20, 12, 7, tzinfo=timezone.utc)
START = END - timedelta(hours=4)  # 16 intervals + 1 register = 17 values a meter
METERS = 12
STREAM_ABOVE = 5  # more meters than this: the answer stays in the store
PER_PART = 40     # values a message: two meters (34 values) a part, six parts


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, METERS, clock=lambda: NOW, base_index=371, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet, mdm):  # noqa: F811
    head_end = serve_head_end(
        tmp_path, devices_of(fleet), device_timeout=5.0, reply_addresses=(f"{mdm.base}/mdm/",),
        reading_requests=ReadingRequestLimits(max_values_per_message=PER_PART,
                                              stream_above_meters=STREAM_ABOVE))
    yield head_end
    close_head_end(head_end)


def _ask(base_url, mrids, page=None, header=None, source=None):
    history = HistoryPlugin()
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl", plugins=[history])
    options = [{"name": "Page", "value": str(page)}] if page is not None else []
    if source:
        options.append({"name": "DataSource", "value": source})
    request = {"GetMeterReadings": {
        "EndDevice": [{"mRID": m} for m in mrids],
        "ReadingType": [{"mRID": PLUS_A}, {"mRID": PROFILE}],
        "Reading": [{"timePeriod": {"start": START, "end": END}}]}}
    if options:
        request["Option"] = options
    reply = client.service.GetMeterReadings(
        Header=header or {"Verb": "get", "Noun": "MeterReadings", "CorrelationID": "many"},
        Request=request)
    assert_valid_everywhere(history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0])
    return reply


def _values(meter_reading) -> tuple:
    registers = tuple((r.ReadingType.ref, str(r.value)) for r in meter_reading.Readings)
    intervals = tuple((r.timeStamp, str(r.value)) for block in meter_reading.IntervalBlocks
                      for r in block.IntervalReadings)
    return registers, intervals


@pytest_twisted.inlineCallbacks
def test_a_many_meter_reply_is_built_from_the_store_part_by_part(head_end, fleet):
    mrids = [m["mrid"] for m in fleet.inventory()["meters"]]
    first = yield deferToThread(_ask, head_end.base_url, mrids)
    count = int({p.Name: p.Value for p in first.Header.Property}["MessageCount"])
    assert count == METERS // 2
    parts = [first]
    for page in range(2, count + 1):
        parts.append((yield deferToThread(_ask, head_end.base_url, mrids, page=page)))
    got = {}
    for index, part in enumerate(parts, start=1):
        assert {p.Name: p.Value for p in part.Header.Property} == {
            "MessageIndex": str(index), "MessageCount": str(count)}
        assert part.Reply.Result == "OK"
        assert [e.code for e in part.Reply.Error or []] == (["0.1"] if index < count else [])
        for meter_reading in part.Payload.MeterReadings.MeterReading:
            assert meter_reading.Meter.mRID not in got  # each meter in one part only
            got[meter_reading.Meter.mRID] = _values(meter_reading)
    # The parts follow the request's order, and every meter has all its values.
    assert list(got) == mrids
    assert all(len(registers) == 1 and len(intervals) == 16
               for registers, intervals in got.values())
    # A small request (one part) is answered from memory: the same values.
    few = yield deferToThread(_ask, head_end.base_url, mrids[4:6], source="store")
    assert not few.Reply.Error
    assert {m.Meter.mRID: _values(m) for m in few.Payload.MeterReadings.MeterReading} == {
        m: got[m] for m in mrids[4:6]}


@pytest_twisted.inlineCallbacks
def test_the_outcome_of_a_many_meter_read_holds_counts_not_values(head_end, fleet):
    mrids = [m["mrid"] for m in fleet.inventory()["meters"]]
    service = head_end.meter_readings_door._readings  # noqa: SLF001 (what the door calls)
    request = GetMeterReadings(header=Header(verb=Verb.GET, noun="MeterReadings"),
                               end_devices=tuple(DeviceRef(mrid=m) for m in mrids),
                               reading_types=(PLUS_A, PROFILE), start=START, end=END,
                               source=ReadingSource.STORE_THEN_METER)
    outcome = yield service.read(request, STREAM_ABOVE)
    assert outcome.meter_readings == [] and not outcome.errors
    assert outcome.in_store.counts == [17] * METERS
    assert [s.device.mrid for s in outcome.in_store.slices] == mrids
    assert outcome.in_store.plan(PER_PART) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    part = yield head_end.store_runner.call(outcome.in_store.part, head_end.store, [2, 3])
    assert [m.meter.mrid for m in part] == mrids[2:4]
    assert all(len(m.interval_blocks[0].readings) == 16 for m in part)
    # The same request for fewer meters keeps its values in the outcome, as before.
    small = yield service.read(GetMeterReadings(
        header=request.header, end_devices=request.end_devices[:2], reading_types=request.reading_types, start=START,
        end=END, source=ReadingSource.STORE), STREAM_ABOVE)
    assert small.in_store is None and len(small.meter_readings) == 2


@pytest_twisted.inlineCallbacks
def test_an_asynchronous_many_meter_reply_is_one_callback_per_part(head_end, fleet, mdm):  # noqa: F811
    mrids = [m["mrid"] for m in fleet.inventory()["meters"]]
    ack = yield deferToThread(_ask, head_end.base_url, mrids, header={
        "Verb": "get", "Noun": "MeterReadings", "AsyncReplyFlag": True, "CorrelationID": "c-12",
        "ReplyAddress": f"{mdm.base}/mdm/ReplyMeterReadings"})
    assert ack.Reply.Error[0].code == "0.3"
    for _ in range(200):
        if len(mdm.received) == METERS // 2:
            break
        yield deferToThread(time.sleep, 0.1)
    for element in mdm.received:
        assert_valid_everywhere(element)
    outcomes = [decode_meter_readings_response(e) for e in mdm.received]
    assert [dict(o.header.properties)["MessageIndex"] for o in outcomes] == [
        str(i) for i in range(1, METERS // 2 + 1)]
    assert [m.meter.mrid for o in outcomes for m in o.meter_readings] == mrids
    assert all(len(m.interval_blocks[0].readings) == 16 and len(m.readings) == 1
               for o in outcomes for m in o.meter_readings)
