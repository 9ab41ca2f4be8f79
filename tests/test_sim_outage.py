"""A configured outage in the simulator writes what a meter writes: power down and power up in
the standard event log, the failure and its duration in the power failure log; read back over
DLMS by the head-end's event-log reader, mapped to their CIM EndDeviceEventTypes."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor

from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_events import read_events
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet

UTC = timezone.utc
FIRST = 4851  # 127.0.20.x: beside the controls tests' range, own indexes


@pytest.fixture
def fleet():
    running = start_fleet(reactor, 1, clock=lambda: datetime.now(UTC), port=0, base_index=FIRST)
    yield running
    pytest_twisted.blockon(running.stop_all())


@pytest_twisted.ensureDeferred
async def test_a_configured_outage_is_in_the_standard_and_power_failure_logs(fleet):
    entry = fleet.inventory()["meters"][0]
    meter = DeviceAddress.from_inventory(entry)
    now = datetime.now(UTC).replace(microsecond=0)
    down, up = now - timedelta(minutes=20), now - timedelta(minutes=20, seconds=-437)
    fleet.state(FIRST).outage(down, up)

    read = await read_events(reactor, meter, now - timedelta(minutes=30), now + timedelta(seconds=1),
                             5.0, logs=["standard", "power failure"])
    assert not read.errors
    # The documented history may hold other events in the window; the outage's are exactly these.
    mine = [(e.created, e.device_code, e.event_type) for e in read.events
            if e.created in (down, up)]
    assert (down, f"{meter_model.STANDARD_LOG}:1", "3.26.38.85") in mine
    assert (up, f"{meter_model.STANDARD_LOG}:2", "3.26.38.49") in mine
    failures = [e for e in read.events if e.device_code.startswith(meter_model.POWER_FAILURE_LOG)
                and e.created == up]
    assert len(failures) == 1, failures
    assert ("DurationSeconds", "437") in failures[0].details


def test_an_outage_that_ends_before_it_starts_is_refused(fleet):
    now = datetime.now(UTC)
    with pytest.raises(ValueError):
        fleet.state(FIRST).outage(now, now)
