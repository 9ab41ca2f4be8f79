"""The engine's reading service against real simulated meters over TCP and a real SQLite store:
the concurrency bound, and each kind of failure as an Error on the device it concerns."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from cimhes.cim.message import ErrorCode, Header, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.drivers import DeviceAddress
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import start_fleet

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
FIRST_METER = 221  # 127.0.1.221.. : clear of the demo's and the other tests' meters


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 6, clock=lambda: NOW, base_index=FIRST_METER,
                        response_delay=0.02, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'engine.sqlite'}")
    runner = StoreRunner(reactor, store)
    yield store, runner
    runner.stop()
    store.close()


def _devices(fleet, **changes) -> list[DeviceAddress]:
    return [replace(DeviceAddress(**entry), **changes) for entry in fleet.inventory()["meters"]]


def _request(devices, reading_types, start=None, end=None) -> GetMeterReadings:
    return GetMeterReadings(
        header=Header(verb="get", noun="MeterReadings"),
        end_devices=[DeviceRef(mrid=d.mrid) for d in devices], usage_points=[],
        reading_types=reading_types, start=start, end=end)


@pytest_twisted.inlineCallbacks
def test_no_more_associations_are_open_at_once_than_the_bound(fleet, store):
    devices = _devices(fleet)
    store[0].load_inventory(devices)
    service = MeterReadingService(reactor, store[1], concurrency=2, timeout=3.0)
    most = [0]

    def sample():
        most[0] = max(most[0], fleet.open_associations())
    sampler = task.LoopingCall(sample)
    sampler.start(0.002)
    try:
        outcome = yield service.read(_request(devices, [PLUS_A]))
    finally:
        sampler.stop()

    assert outcome.result is ReplyResult.OK
    assert len(outcome.meter_readings) == 6
    assert most[0] == 2


@pytest_twisted.inlineCallbacks
def test_a_refused_association_is_an_error_on_that_device_only(fleet, store):
    devices = _devices(fleet)
    devices[3] = replace(devices[3], password="not-the-password")
    store[0].load_inventory(devices)
    service = MeterReadingService(reactor, store[1], timeout=3.0)

    outcome = yield service.read(_request(devices, [PLUS_A]))

    assert outcome.result is ReplyResult.PARTIAL
    (error,) = outcome.errors
    assert error.code == ErrorCode.DEVICE_REFUSED.value
    assert error.id == devices[3].mrid and error.object_type == "EndDevice"
    assert "authentication-failure" in error.reason
    assert {m.meter.mrid for m in outcome.meter_readings} == \
        {d.mrid for i, d in enumerate(devices) if i != 3}
    assert (outcome.devices_asked, outcome.devices_failed) == (6, 1)


@pytest_twisted.inlineCallbacks
def test_an_unsupported_reading_type_is_an_error_per_device_and_the_rest_is_read(fleet, store):
    devices = _devices(fleet)[:2]
    store[0].load_inventory(devices)
    service = MeterReadingService(reactor, store[1], timeout=3.0)
    reactive = "0.0.0.1.1.1.73.0.0.0.0.0.0.0.0.3.73.0"  # reactive energy: not in the IDIS table

    outcome = yield service.read(_request(devices, [PLUS_A, reactive]))

    assert outcome.result is ReplyResult.PARTIAL
    # The Error names the ReadingType (its ID); which device could not serve it is in details.
    assert [e.id for e in outcome.errors] == [reactive, reactive]
    assert sorted(e.details for e in outcome.errors) == sorted(f"EndDevice {d.mrid}" for d in devices)
    assert all(e.code == "2.10" and e.object_type == "ReadingType" and reactive in e.reason
               for e in outcome.errors)
    for meter_reading in outcome.meter_readings:
        assert [r.reading_type for r in meter_reading.readings] == [PLUS_A]


@pytest_twisted.inlineCallbacks
def test_interval_types_without_a_window_are_refused_and_registers_still_read(fleet, store):
    devices = _devices(fleet)[:1]
    store[0].load_inventory(devices)
    service = MeterReadingService(reactor, store[1], timeout=3.0)

    outcome = yield service.read(_request(devices, [PLUS_A, PLUS_A_PROFILE]))
    assert outcome.result is ReplyResult.PARTIAL
    (error,) = outcome.errors
    assert (error.code, error.id) == (ErrorCode.MISSING_PARAMETER.value, PLUS_A_PROFILE)
    (meter_reading,) = outcome.meter_readings
    assert [r.reading_type for r in meter_reading.readings] == [PLUS_A]
    assert not meter_reading.interval_blocks

    only_intervals = yield service.read(_request(devices, [PLUS_A_PROFILE]))
    assert only_intervals.result is ReplyResult.FAILED
    assert not only_intervals.meter_readings


@pytest_twisted.inlineCallbacks
def test_readings_are_stored_once_however_often_they_are_read(fleet, store):
    devices = _devices(fleet)[:1]
    store[0].load_inventory(devices)
    service = MeterReadingService(reactor, store[1], timeout=3.0, now=lambda: NOW)
    end = NOW.replace(minute=0, second=0)
    request = _request(devices, [PLUS_A_PROFILE], start=end - timedelta(hours=2), end=end)

    first = yield service.read(request)
    second = yield service.read(request)

    assert first.result is second.result is ReplyResult.OK
    stored = store[0].stored_values(devices[0].mrid, PLUS_A_PROFILE)
    assert len(stored) == 8
    assert [v for _, v in stored] == \
        [r.value for r in first.meter_readings[0].interval_blocks[0].readings]


@pytest_twisted.inlineCallbacks
def test_readings_that_cannot_be_stored_still_reach_the_caller_with_a_warning(fleet, store):
    from sqlalchemy import text

    devices = _devices(fleet)[:2]
    store[0].load_inventory(devices)
    with store[0].engine.begin() as connection:
        connection.execute(text("DROP TABLE reading"))
    service = MeterReadingService(reactor, store[1], timeout=3.0)

    outcome = yield service.read(_request(devices, [PLUS_A]))

    assert outcome.result is ReplyResult.PARTIAL
    assert len(outcome.meter_readings) == 2
    (error,) = outcome.errors
    assert error.code == ErrorCode.INTERNAL_ERROR.value and error.level.value == "WARNING"
    assert "2 of 2 devices' readings" in error.reason and "not stored" in error.reason


MAX_DEMAND = "8.8.2.6.1.1.8.0.0.0.0.0.0.0.0.3.38.0"


@pytest_twisted.inlineCallbacks
def test_a_register_type_with_period_parts_needs_no_window_when_the_driver_reads_it_as_a_register(
        fleet, store):
    # Maximum demand carries measuringPeriod 15 min, but it is a register: the catalogue says so.
    devices = _devices(fleet)[:1]
    store[0].load_inventory(devices)
    service = MeterReadingService(reactor, store[1], timeout=3.0)
    outcome = yield service.read(_request(devices, [MAX_DEMAND]))
    assert outcome.result is ReplyResult.OK, outcome.errors
    [reading] = outcome.meter_readings[0].readings
    assert reading.reading_type == MAX_DEMAND and reading.timestamp < NOW


@pytest_twisted.inlineCallbacks
def test_a_window_past_the_meters_history_is_partial_with_a_warning_and_stores_what_exists(
        fleet, store):
    devices = _devices(fleet)[:1]
    store[0].load_inventory(devices)
    service = MeterReadingService(reactor, store[1], timeout=5.0)
    start = NOW - timedelta(days=36)  # the 15-minute profile keeps 35 days
    outcome = yield service.read(_request(devices, [PLUS_A_PROFILE], start, NOW))
    assert outcome.result is ReplyResult.PARTIAL
    (warning,) = outcome.errors
    assert (warning.code, warning.level.value, warning.id) == (
        ErrorCode.PARTIAL_RESULT.value, "WARNING", devices[0].mrid)
    assert "96 missing" in warning.reason and PLUS_A_PROFILE in warning.reason
    [block] = outcome.meter_readings[0].interval_blocks
    assert len(block.readings) == 35 * 96
    stored = yield store[1].run("stored_values", devices[0].mrid, PLUS_A_PROFILE)
    assert len(stored) == 35 * 96
