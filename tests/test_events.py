"""IDIS event logs: the event-type table row by row, every mapped code read back from the
simulator over DLMS by time range, unknown codes kept raw, and each event stored once."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from cimhes.cim.end_device_event_types import (
    IDIS_EVENT_TYPES,
    LONG_POWER_FAILURE,
    UNMAPPED_EVENT_TYPE,
    event_type_for,
)
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_events import EVENT_LOGS, read_events
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.event_fetches import EventFetchService
from cimhes.engine.events import EventStore, UnrecognisedPush
from cimhes.engine.limits import EngineSettings
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet

UTC = timezone.utc
NOW = datetime(2024, 6, 15, 12, 7, 30, tzinfo=UTC)
FACTS = Path(__file__).resolve().parents[2] / "shared" / "design" / "REFERENCE-FACTS.md"
# The IDIS code ranges of each log (REFERENCE-FACTS.md, "IDIS event codes").
LOG_OF_CODE = {**{c: "standard" for c in (*range(1, 20), 47, 48, 51, 88, 89, 254, 255)},
               **{c: "fraud" for c in (*range(40, 47), 49, 50)},
               **{c: "disconnector" for c in range(59, 76)},
               **{c: "power quality" for c in range(76, 88)}}
LOG_OBIS = {log.name: log.obis for log in EVENT_LOGS.values()}


# -- the table, row by row -----------------------------------------------------------------

@pytest.mark.parametrize("code", sorted(IDIS_EVENT_TYPES))
def test_event_type_row(code):
    row = IDIS_EVENT_TYPES[code]
    assert row.code == code and row.meaning and row.source
    assert row.log == LOG_OF_CODE[code]
    kind, domain, sub, action = (int(part) for part in row.event_type.split("."))
    assert kind == 3  # electric meter
    assert event_type_for(code) == row.event_type
    # A row citing REFERENCE-FACTS's example keeps its domain, subdomain and event/action.
    cited = re.search(rf"REFERENCE-FACTS {code} -> 0\.(\d+\.\d+\.\d+)", row.source)
    if cited:
        assert row.event_type == f"3.{cited.group(1)}"
        if FACTS.exists():
            assert f"{code} → 0.{cited.group(1)}" in FACTS.read_text()


def test_unknown_codes_are_typed_unmapped_not_dropped():
    assert event_type_for(230) == UNMAPPED_EVENT_TYPE == "3.0.0.0"
    assert 230 not in IDIS_EVENT_TYPES


# -- over DLMS against the simulator -------------------------------------------------------

@pytest.fixture
def fleet():
    running = start_fleet(reactor, 2, clock=lambda: NOW, port=0, base_index=11)
    yield running
    pytest_twisted.blockon(running.stop_all())


def address(fleet, k) -> DeviceAddress:
    return next(DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]
                if m["name"] == meter_model.meter_identity(k).serial)


@pytest_twisted.ensureDeferred
async def test_every_mapped_code_written_by_the_meter_reads_back_typed_by_the_table(fleet):
    state = fleet.state(11)
    first = NOW - timedelta(hours=2)
    written = {}
    for n, code in enumerate(sorted(IDIS_EVENT_TYPES)):
        at = first + timedelta(seconds=10 * n)
        state.record(LOG_OBIS[IDIS_EVENT_TYPES[code].log], at, code)
        written[(LOG_OBIS[IDIS_EVENT_TYPES[code].log], at)] = code
    state.record(LOG_OBIS["standard"], first - timedelta(minutes=1), 231)  # unknown code
    meter = address(fleet, 11)
    result = await read_events(reactor, meter, first - timedelta(minutes=5), NOW, 5.0)
    assert result.errors == ()
    by_key = {(e.device_code.split(":")[0], e.created): e for e in result.events}
    for (log, at), code in written.items():
        event = by_key[(log, at)]
        assert event.event_type == IDIS_EVENT_TYPES[code].event_type
        assert event.device_code == f"{log}:{code}" and event.device_mrid == meter.mrid
        assert ("DlmsEventCode", str(code)) in event.details
    unknown = by_key[(LOG_OBIS["standard"], first - timedelta(minutes=1))]
    assert unknown.event_type == UNMAPPED_EVENT_TYPE
    assert ("DlmsEventCode", "231") in unknown.details and "231" in unknown.reason


@pytest_twisted.ensureDeferred
async def test_a_time_range_gives_the_documented_history_of_each_log(fleet):
    meter = address(fleet, 12)
    start, end = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
    result = await read_events(reactor, meter, start, end, 5.0)
    got = {(e.device_code, e.created) for e in result.events}
    want = set()
    for log in EVENT_LOGS.values():
        for at, value in meter_model.scheduled_events(meter.name, log.obis, start, end):
            want.add((f"{log.obis}:long power failure" if log.is_power_failure
                      else f"{log.obis}:{value}", at))
    assert got == want and len(got) > 20
    assert all(start <= e.created <= end for e in result.events)
    failures = [e for e in result.events if e.event_type == LONG_POWER_FAILURE.event_type
                and "long" in e.reason]
    assert failures and all(("DurationSeconds", "180") in e.details for e in failures)
    # The meter's manufacturer code 230 is kept, raw.
    assert any(e.event_type == UNMAPPED_EVENT_TYPE and e.device_code.endswith(":230")
               for e in result.events)
    only_fraud = await read_events(reactor, meter, start, end, 5.0, logs=["fraud"])
    assert {e.device_code.split(":")[0] for e in only_fraud.events} == {"0.0.99.98.1.255"}


# -- storage -------------------------------------------------------------------------------

@pytest.fixture
def stores(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'events.sqlite'}")
    runner = StoreRunner(reactor, store)
    yield store, runner, EventStore(store)
    runner.stop()
    store.close()


@pytest_twisted.inlineCallbacks
def test_events_read_twice_are_stored_once(fleet, stores):
    store, runner, events = stores
    devices = [address(fleet, 11), address(fleet, 12)]
    store.load_inventory(devices)
    dispatcher = Dispatcher(reactor, runner, EngineSettings(min_device_gap=0),
                            session_limits=SessionLimits.of(5.0))
    service = EventFetchService(reactor, runner, dispatcher, events, now=lambda: NOW)
    yield dispatcher.start()
    try:
        start = datetime(2024, 5, 20, tzinfo=UTC)
        first = yield service.read(devices, start, NOW)
        stored = {d.mrid: events.events(d.mrid) for d in devices}
        assert first.errors == [] and first.events == sum(map(len, stored.values())) > 0
        again = yield service.read(devices, start, NOW)
        assert again.errors == [] and again.events == first.events
        assert {d.mrid: events.events(d.mrid) for d in devices} == stored
        direct = yield read_events(reactor, devices[0], start, NOW, 5.0)
        assert [e for e, _ in stored[devices[0].mrid]] == sorted(direct.events,
                                                                 key=lambda e: e.created)
        assert {source for _, source in stored[devices[0].mrid]} == {"log"}
    finally:
        dispatcher.stop()


def test_an_unrecognised_push_is_recorded_for_review(stores):
    _store, _runner, events = stores
    push = UnrecognisedPush(NOW, "127.0.0.9:4059", "CIMHES999999", "unknown device",
                            "no device with that system title", 1200, bytes(range(256)) * 3)
    events.record_unrecognised(push)
    [kept] = events.unrecognised()
    assert kept.head == push.head[:512] and (kept.problem, kept.length) == ("unknown device", 1200)


def test_an_event_of_a_device_not_in_the_inventory_is_refused(stores):
    _store, _runner, events = stores
    with pytest.raises(ValueError, match="not in the inventory"):
        events.save_events([EndDeviceEvent("nobody", NOW, "3.26.38.85", "x:1", "power down")],
                            "push", NOW)


def test_the_documented_table_has_one_true_line_per_row():
    doc = Path(__file__).resolve().parent.parent / "docs" / "events.md"
    lines = [line for line in doc.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(line.split("|")[1]) for line in lines] == sorted(IDIS_EVENT_TYPES)
    for line in lines:
        row = IDIS_EVENT_TYPES[int(line.split("|")[1])]
        assert f"`{row.event_type}`" in line and row.source in line and row.meaning in line
