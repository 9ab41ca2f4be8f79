"""The meter configuration the IDIS driver remembers between reads (scaler_units, capture objects):
kept after a read, used instead of asking again, dropped on a failure, an error, a configuration
event or age, and re-read in the same association when a profile's rows do not fit it."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_twisted
from twisted.internet import reactor

from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis import IdisMeterDriver
from cimhes.drivers.meter_configuration import (
    ConfigurationCache,
    changes_configuration,
    note_events,
    CONFIGURATIONS,
)
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet

NOW = datetime(2024, 6, 15, 12, 7, 30, tzinfo=timezone.utc)
WINDOW = (NOW - timedelta(hours=3), NOW)
ENERGY = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"        # +A register 1.0.1.8.0.255, kWh
PROFILE_ENERGY = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"  # +A 15-minute deltas, load profile
LOAD_PROFILE = "1.0.99.1.0.255"


@pytest.fixture
def fleet():
    running = start_fleet(reactor, 1, clock=lambda: NOW, port=0)
    yield running
    pytest_twisted.blockon(running.stop_all())


def meter(fleet) -> DeviceAddress:
    return DeviceAddress.from_inventory(fleet.inventory()["meters"][0])


def register_kwh(serial: str) -> Decimal:
    scaler, _ = meter_model.SCALER_UNIT["1.0.1.8.0.255"]
    return Decimal(meter_model.register_raw(serial, "1.0.1.8.0.255", NOW)).scaleb(scaler - 3)


@pytest_twisted.ensureDeferred
async def test_a_read_remembers_scaler_units_and_capture_objects_and_the_next_read_uses_them(fleet):
    cache = ConfigurationCache()
    driver = IdisMeterDriver(cache)
    device = meter(fleet)
    first = await driver.read(reactor, device, [ENERGY, PROFILE_ENERGY], *WINDOW, 5.0)
    assert first.errors == ()
    known = cache.of(device.mrid)
    assert known.scaler_units == {(3, "1.0.1.8.0.255"): meter_model.SCALER_UNIT["1.0.1.8.0.255"]}
    assert [bytes(c[1]) for c in known.captures[LOAD_PROFILE]][:2] == [
        bytes((0, 0, 1, 0, 0, 255)), bytes((1, 0, 1, 8, 0, 255))]

    # A remembered scaler one decade off shows that the second read did not ask for it.
    scaler, unit = known.scaler_units[(3, "1.0.1.8.0.255")]
    known.scaler_units[(3, "1.0.1.8.0.255")] = (scaler + 1, unit)
    second = await driver.read(reactor, device, [ENERGY], *WINDOW, 5.0)
    [reading] = second.meter_reading.readings
    assert reading.value == register_kwh(device.name) * 10


@pytest_twisted.ensureDeferred
async def test_a_configuration_event_makes_the_next_read_ask_again(fleet):
    driver = IdisMeterDriver()  # the process's cache, which events reach
    device = meter(fleet)
    await driver.read(reactor, device, [ENERGY], *WINDOW, 5.0)
    known = CONFIGURATIONS.of(device.mrid)
    scaler, unit = known.scaler_units[(3, "1.0.1.8.0.255")]
    known.scaler_units[(3, "1.0.1.8.0.255")] = (scaler + 1, unit)
    other_event = EndDeviceEvent(device.mrid, NOW, "3.26.0.216", "0.0.99.98.0.255:1", "power down")
    note_events([other_event])
    assert CONFIGURATIONS.of(device.mrid).scaler_units  # a power down changes nothing

    note_events([EndDeviceEvent(device.mrid, NOW, "3.7.0.24", "0.0.99.98.0.255:47",
                                "parameters changed")])
    again = await driver.read(reactor, device, [ENERGY], *WINDOW, 5.0)
    [reading] = again.meter_reading.readings
    assert reading.value == register_kwh(device.name)


@pytest_twisted.ensureDeferred
async def test_rows_that_do_not_fit_the_remembered_capture_objects_make_it_read_them_again(fleet):
    cache = ConfigurationCache()
    driver = IdisMeterDriver(cache)
    device = meter(fleet)
    reference = await driver.read(reactor, device, [PROFILE_ENERGY], *WINDOW, 5.0)
    known = cache.of(device.mrid)
    right = known.captures[LOAD_PROFILE]
    known.captures[LOAD_PROFILE] = right[:2]  # as if the profile had captured two columns
    again = await driver.read(reactor, device, [PROFILE_ENERGY], *WINDOW, 5.0)
    assert again.errors == ()
    assert again.meter_reading.interval_blocks == reference.meter_reading.interval_blocks
    assert cache.of(device.mrid).captures[LOAD_PROFILE] == right


@pytest_twisted.ensureDeferred
async def test_a_read_with_an_error_forgets_the_meter(fleet):
    cache = ConfigurationCache()
    driver = IdisMeterDriver(cache)
    device = meter(fleet)
    await driver.read(reactor, device, [ENERGY], *WINDOW, 5.0)
    known = cache.of(device.mrid)
    known.scaler_units[(3, "1.0.1.8.0.255")] = (0, 27)  # W: not the unit the reading type needs
    wrong = await driver.read(reactor, device, [ENERGY], *WINDOW, 5.0)
    assert [type(e).__name__ for e in wrong.errors] == ["UnsupportedReadingType"]
    right = await driver.read(reactor, device, [ENERGY], *WINDOW, 5.0)
    assert right.errors == ()
    assert right.meter_reading.readings[0].value == register_kwh(device.name)


def test_entries_age_out_are_bounded_and_the_cache_can_be_off():
    now = [0.0]
    cache = ConfigurationCache(max_age=60, max_meters=2, clock=lambda: now[0])
    cache.of("a").scaler_units[(3, "x")] = (0, 30)
    now[0] = 59
    assert cache.of("a").scaler_units
    now[0] = 60
    assert not cache.of("a").scaler_units
    cache.of("b"), cache.of("c")
    assert len(cache) == 2 and not cache.of("a").scaler_units
    off = ConfigurationCache(max_age=0)
    off.of("a").scaler_units[(3, "x")] = (0, 30)
    assert not off.of("a").scaler_units and len(off) == 0


@pytest.mark.parametrize("code,changes", [
    ("0.0.99.98.0.255:47", True), ("0.0.99.98.0.255:18", True), ("0.0.99.98.0.255:254", True),
    ("0.0.99.98.0.255:1", False), ("0.0.99.98.1.255:47", False), ("0.0.97.98.0.255:bit 3", False),
])
def test_which_events_say_the_configuration_changed(code, changes):
    assert changes_configuration(code) is changes
