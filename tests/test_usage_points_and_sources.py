"""GetMeterReadings by UsagePoint (each meter over the part of the window it served the point) and
by EndDeviceGroup, and the request's DataSource option: store only, meter on demand, or the store
completed from the meters (the default) — through zeep, SOAP and DLMS to simulated meters."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from zeep.plugins import HistoryPlugin

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.inventory import Inventory
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet

from .credentials import add_test_user, zeep_client
from .schemas import assert_valid_everywhere

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
END = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
START = END - timedelta(hours=4)
EXCHANGE = END - timedelta(hours=1, minutes=30)  # meter B replaced meter A at the usage point
FIRST_METER = 241


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 3, clock=lambda: NOW, base_index=FIRST_METER, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet):
    meters = fleet.inventory()["meters"]
    a, b, c = (m["mrid"] for m in meters)
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key")),
        [DeviceAddress.from_inventory(m) for m in meters],
        links={"usage_points": [{"mrid": "UP-1", "name": "Main street 1", "meters": [
            {"mrid": a, "from": "2020-01-01T00:00:00Z", "to": EXCHANGE.isoformat()},
            {"mrid": b, "from": EXCHANGE.isoformat()}]}],
            "groups": [{"mrid": "G-1", "name": "feeder 7", "members": [a, c]}]})
    add_test_user(head_end)
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.base_url = f"http://127.0.0.1:{port.getHost().port}"
    yield head_end
    pytest_twisted.blockon(port.stopListening())
    head_end.store_runner.stop()
    head_end.store.close()


def _ask(base_url, profile, start=START, end=END, source=None, types=(PROFILE,)):
    history = HistoryPlugin()
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl", plugins=[history])
    request = {"GetMeterReadings": {**profile, "ReadingType": [{"mRID": t} for t in types]}}
    if start is not None:
        request["GetMeterReadings"]["Reading"] = [{"timePeriod": {"start": start, "end": end}}]
    if source is not None:
        request["Option"] = [{"name": "DataSource", "value": source}]
    reply = client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings"}, Request=request)
    assert_valid_everywhere(history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0])
    return reply


def _profile(serial, start, end):
    return [(ts, Decimal(plus_a).scaleb(meter_model.SCALER_UNIT["1.0.1.8.0.255"][0]) / 1000)
            for ts, plus_a, _ in meter_model.profile_rows(serial, start, end) if start < ts <= end]


def _values(meter_reading):
    (block,) = meter_reading.IntervalBlocks
    return [(r.timeStamp, Decimal(r.value)) for r in block.IntervalReadings]


@pytest_twisted.inlineCallbacks
def test_a_usage_point_is_read_from_each_meter_for_the_time_it_served(head_end, fleet):
    a, b, _c = fleet.inventory()["meters"]
    reply = yield deferToThread(_ask, head_end.base_url, {"UsagePoint": [{"mRID": "UP-1"}]})
    assert reply.Reply.Result == "OK", reply.Reply
    readings = {m.Meter.mRID: m for m in reply.Payload.MeterReadings.MeterReading}
    assert set(readings) == {a["mrid"], b["mrid"]}
    assert all(m.UsagePoint.mRID == "UP-1" for m in readings.values())
    assert _values(readings[a["mrid"]]) == _profile(a["name"], START, EXCHANGE)
    assert _values(readings[b["mrid"]]) == _profile(b["name"], EXCHANGE, END)
    assert len(_values(readings[a["mrid"]])) == 10 and len(_values(readings[b["mrid"]])) == 6


@pytest_twisted.inlineCallbacks
def test_a_usage_point_by_name_and_an_unknown_one(head_end, fleet):
    reply = yield deferToThread(_ask, head_end.base_url, {"UsagePoint": [
        {"Names": [{"name": "Main street 1"}]}, {"mRID": "UP-404"}]}, start=EXCHANGE)
    assert reply.Reply.Result == "PARTIAL"
    ((error),) = reply.Reply.Error
    assert (error.code, error.details, error.ID._value_1, error.ID.objectType) == (
        "2.4", "unknown-usage-point", "UP-404", "UsagePoint")
    (only,) = reply.Payload.MeterReadings.MeterReading  # after the exchange: meter B alone
    assert only.Meter.mRID == fleet.inventory()["meters"][1]["mrid"]


@pytest_twisted.inlineCallbacks
def test_an_end_device_group_reads_its_members(head_end, fleet):
    a, _b, c = fleet.inventory()["meters"]
    reply = yield deferToThread(_ask, head_end.base_url,
                                {"EndDeviceGroup": [{"mRID": "G-1"}, {"mRID": "G-404"}]},
                                start=None, types=(PLUS_A,))
    assert reply.Reply.Result == "PARTIAL"
    assert [(e.code, e.details) for e in reply.Reply.Error] == [("2.4", "unknown-group")]
    assert {m.Meter.mRID for m in reply.Payload.MeterReadings.MeterReading} == {
        a["mrid"], c["mrid"]}


@pytest_twisted.inlineCallbacks
def test_the_data_source_option(head_end, fleet):
    a = fleet.inventory()["meters"][0]
    device = {"EndDevice": [{"mRID": a["mrid"]}]}
    # Nothing stored yet: "store" has nothing to give, and says so per ReadingType (5.5).
    empty = yield deferToThread(_ask, head_end.base_url, device, source="store")
    assert empty.Reply.Result == "FAILED"
    assert [(e.code, e.ID._value_1) for e in empty.Reply.Error] == [("5.5", PROFILE)]

    # "meter" reads it, and stores it.
    read = yield deferToThread(_ask, head_end.base_url, device, source="meter")
    assert read.Reply.Result == "OK"
    expected = _profile(a["name"], START, END)
    assert _values(read.Payload.MeterReadings.MeterReading[0]) == expected

    # The meter is gone now: the store alone, and the default (store, completed from the
    # meter only where incomplete), both answer the stored window without calling it.
    yield fleet.stop(FIRST_METER)
    for source in ("store", None):
        stored = yield deferToThread(_ask, head_end.base_url, device, source=source)
        assert stored.Reply.Result == "OK", (source, stored.Reply)
        assert _values(stored.Payload.MeterReadings.MeterReading[0]) == expected

    # A window reaching past what is stored needs the meter, which is gone: the default tries
    # it (5.3 naming the device) and still returns what the store has.
    wider = yield deferToThread(_ask, head_end.base_url, device, start=START - timedelta(hours=1))
    assert wider.Reply.Result == "PARTIAL"
    assert [(e.code, e.ID._value_1) for e in wider.Reply.Error] == [("5.3", a["mrid"])]
    assert _values(wider.Payload.MeterReadings.MeterReading[0]) == expected


@pytest_twisted.inlineCallbacks
def test_an_unknown_data_source_is_refused(head_end, fleet):
    import zeep

    with pytest.raises(zeep.exceptions.Fault) as caught:
        yield deferToThread(_ask, head_end.base_url,
                            {"EndDevice": [{"mRID": fleet.inventory()["meters"][0]["mrid"]}]},
                            source="cache")
    assert "DataSource is 'cache'" in caught.value.message


def test_links_naming_a_meter_not_in_the_inventory_are_refused(head_end):
    with pytest.raises(ValueError, match="names meter nope"):
        head_end.store.load_inventory(Inventory.with_links([], {"usage_points": [
            {"mrid": "UP-2", "meters": [{"mrid": "nope", "from": "2020-01-01T00:00:00Z"}]}]}))
    with pytest.raises(ValueError, match="group G: meter nope is not in the inventory"):
        Inventory.with_links([], {"groups": [{"mrid": "G", "members": ["nope"]}]})
    with pytest.raises(ValueError, match="unknown keys"):
        Inventory.with_links([], {"groups": [{"mrid": "G", "member": []}]})
