"""Meter controls over real DLMS (TCP wrapper) against the simulator: each kind with its
read-back, each refused by a meter that will not, under HLS-GMAC too, and the events they write
read back through the event-log reader."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor

from cimhes.drivers import DeviceAddress
from cimhes.drivers.controls import (
    NO_LIMIT,
    ControlCommand,
    ControlKind,
    ControlStatus,
    checked,
)
from cimhes.drivers.errors import ConnectionFailed
from cimhes.drivers.idis import IdisMeterDriver
from cimhes.drivers.idis_events import read_events
from cimhes.drivers.security import HeadEndSecurity
from cimhes.engine.security import CounterStore, StoredCounters
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import Fault, start_fleet
from cimhes.fixtures.meter_controls import ControlState

UTC = timezone.utc
FIRST = 4827  # 127.0.20.1: this file's loopback range
DRIVER = IdisMeterDriver()


def clock():
    return datetime.now(UTC)


@pytest.fixture
def fleet():
    running = start_fleet(reactor, 4, clock=clock, port=0, base_index=FIRST,
                          faults={FIRST + 3: Fault("refuse-controls")})
    yield running
    pytest_twisted.blockon(running.stop_all())


def address(fleet, k, **changes) -> DeviceAddress:
    entry = next(m for m in fleet.inventory()["meters"]
                 if m["name"] == meter_model.meter_identity(k).serial)
    return DeviceAddress.from_inventory({**entry, **changes})


async def control(device, kind, resumed=False, **parameters):
    return await DRIVER.control(reactor, device, ControlCommand(kind, parameters), 5.0,
                                resumed=resumed)


@pytest_twisted.ensureDeferred
async def test_disconnect_then_connect_read_back_and_log_their_events(fleet):
    meter = address(fleet, FIRST)
    started = clock() - timedelta(seconds=1)
    off = await control(meter, ControlKind.DISCONNECT)
    assert off.status is ControlStatus.DONE, off.reason
    assert off.read_back == {"output_state": False, "control_state": "disconnected",
                             "control_mode": 4}
    assert fleet.state(FIRST).control_state is ControlState.DISCONNECTED
    on = await control(meter, ControlKind.CONNECT)
    assert on.status is ControlStatus.DONE, on.reason
    assert on.read_back["output_state"] is True and on.read_back["control_state"] == "connected"
    # The disconnector control log holds 62 (remote disconnection) then 63 (remote connection).
    events = await read_events(reactor, meter, started, clock() + timedelta(seconds=2), 5.0,
                               logs=["disconnector"])
    assert [e.device_code for e in events.events] == ["0.0.99.98.2.255:62", "0.0.99.98.2.255:63"]
    assert [e.event_type for e in events.events] == ["3.31.26.68", "3.31.26.42"]


@pytest_twisted.ensureDeferred
async def test_arm_leaves_the_meter_ready_for_the_customers_button(fleet):
    meter = address(fleet, FIRST + 1)
    state = fleet.state(FIRST + 1)
    armed = await control(meter, ControlKind.ARM)
    assert armed.status is ControlStatus.DONE, armed.reason
    # Mode 4 reconnects directly: the driver armed through mode 3 and set 4 back.
    assert armed.read_back == {"output_state": False, "control_state": "ready-for-reconnection",
                               "control_mode": 4}
    state.press_button(clock())
    assert state.output_state is True
    codes = [code for _, code in state.recorded[meter_model.DISCONNECTOR_LOG]]
    assert codes == [62, 59, 61]


@pytest_twisted.ensureDeferred
async def test_connect_in_an_arming_control_mode_is_refused_with_the_state_read_back(fleet):
    meter = address(fleet, FIRST + 1)
    state = fleet.state(FIRST + 1)
    state.disconnector.control_mode = 3
    assert (await control(meter, ControlKind.DISCONNECT)).status is ControlStatus.DONE
    on = await control(meter, ControlKind.CONNECT)
    assert on.status is ControlStatus.REFUSED
    assert "control mode 3" in on.reason and meter.mrid in on.reason
    assert on.read_back["control_state"] == "ready-for-reconnection"


@pytest_twisted.ensureDeferred
async def test_control_mode_0_refuses_remote_disconnection(fleet):
    meter = address(fleet, FIRST + 2)
    fleet.state(FIRST + 2).disconnector.control_mode = 0
    off = await control(meter, ControlKind.DISCONNECT)
    assert off.status is ControlStatus.REFUSED
    assert "remote_disconnect: other-reason" in off.reason
    assert off.read_back["control_state"] == "connected" and off.error is None
    assert fleet.state(FIRST + 2).recorded == {}


@pytest.mark.parametrize("kind, parameters", [
    (ControlKind.DISCONNECT, {}),
    (ControlKind.CONNECT, {}),
    (ControlKind.ARM, {}),
    (ControlKind.LOAD_LIMIT_SET, {"threshold_w": 5000, "duration_s": 30}),
    (ControlKind.LOAD_LIMIT_CLEAR, {}),
    (ControlKind.CLOCK_SYNC, {}),
    (ControlKind.TOU_ACTIVATE, {"calendar_name": "T2", "activate_at": "2030-01-01T00:00:00+00:00"}),
])
@pytest_twisted.ensureDeferred
async def test_a_meter_that_refuses_controls_gives_refused_with_its_reason(fleet, kind, parameters):
    meter = address(fleet, FIRST + 3)
    outcome = await control(meter, kind, **parameters)
    assert outcome.status is ControlStatus.REFUSED, outcome
    assert "read-write-denied" in outcome.reason and outcome.error is None
    assert fleet.state(FIRST + 3).recorded == {}


@pytest_twisted.ensureDeferred
async def test_the_public_client_may_not_control(fleet):
    meter = address(fleet, FIRST, client_address=16, security="none")
    outcome = await control(meter, ControlKind.CLOCK_SYNC)
    assert outcome.status is ControlStatus.REFUSED and "SET clock time: read-write-denied" in outcome.reason
    assert fleet.state(FIRST).clock_offset == timedelta(0)


@pytest_twisted.ensureDeferred
async def test_load_limit_set_with_emergency_profile_and_clear(fleet):
    meter = address(fleet, FIRST)
    start = clock() - timedelta(minutes=1)
    outcome = await control(meter, ControlKind.LOAD_LIMIT_SET, threshold_w=5000, duration_s=30,
                            emergency_threshold_w=2000, emergency_duration_s=3600,
                            emergency_profile_id=7, emergency_start=start)
    assert outcome.status is ControlStatus.DONE, outcome.reason
    back = outcome.read_back
    assert (back["threshold_w"], back["duration_s"], back["emergency_threshold_w"]) == (5000, 30, 2000)
    assert back["emergency_active"] is True and back["threshold_active_w"] == 2000
    assert back["emergency_group_ids"] == [7] and back["emergency_profile"]["duration_s"] == 3600
    limiter = fleet.state(FIRST).limiter
    assert (limiter.threshold_normal, limiter.min_over_threshold_duration) == (5000, 30)
    assert [c for _, c in fleet.state(FIRST).recorded[meter_model.DISCONNECTOR_LOG]] == [67, 67]
    cleared = await control(meter, ControlKind.LOAD_LIMIT_CLEAR)
    assert cleared.status is ControlStatus.DONE, cleared.reason
    assert cleared.read_back["threshold_w"] == cleared.read_back["threshold_active_w"] == NO_LIMIT
    assert cleared.read_back["emergency_active"] is False


@pytest_twisted.ensureDeferred
async def test_clock_sync_reports_the_deviation_it_found_and_corrects_it(fleet):
    meter = address(fleet, FIRST + 2)
    state = fleet.state(FIRST + 2)
    state.clock_offset = timedelta(seconds=-42.5)
    outcome = await control(meter, ControlKind.CLOCK_SYNC)
    assert outcome.status is ControlStatus.DONE, outcome.reason
    assert -43.5 < outcome.read_back["deviation_s"] < -41.5
    assert abs(outcome.read_back["deviation_after_s"]) < 1.0
    assert abs(state.clock_offset.total_seconds()) < 1.0
    # The standard log: 4 (old time) and 5 (new time).
    codes = [code for _, code in state.recorded[meter_model.STANDARD_LOG]]
    assert codes == [4, 5]


@pytest_twisted.ensureDeferred
async def test_tou_activate_writes_the_passive_calendar_and_its_activation_time(fleet):
    meter = address(fleet, FIRST + 1)
    at = datetime(2030, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)  # the meter keeps hundredths
    days = [{"id": 3, "actions": [{"start": "00:00", "script": "0.0.10.0.100.255", "selector": 2}]}]
    outcome = await control(meter, ControlKind.TOU_ACTIVATE, calendar_name="FLAT-T2",
                            activate_at=at, days=days,
                            weeks=[{"name": "W9", "days": [3] * 7}],
                            seasons=[{"name": "S9", "start": "01-01", "week": "W9"}])
    assert outcome.status is ControlStatus.DONE, outcome.reason
    assert outcome.read_back == {"calendar_name_passive": "FLAT-T2",
                                 "activate_at": at.replace(microsecond=120000).isoformat(),
                                 "calendar_name_active": "CIMHES-T1T2"}
    calendar = fleet.state(FIRST + 1).calendar
    assert calendar.passive["days"].value[0].value[0].value == 3
    # Immediate activation (no time): method activate_passive_calendar.
    now = await control(meter, ControlKind.TOU_ACTIVATE, calendar_name="NOW")
    assert now.status is ControlStatus.DONE and now.read_back["calendar_name_active"] == "NOW"
    codes = [code for _, code in fleet.state(FIRST + 1).recorded[meter_model.STANDARD_LOG]]
    assert codes == [19, 9]


@pytest_twisted.ensureDeferred
async def test_a_resumed_control_already_in_effect_is_not_sent_again(fleet):
    meter = address(fleet, FIRST)
    assert (await control(meter, ControlKind.DISCONNECT)).status is ControlStatus.DONE
    again = await control(meter, ControlKind.DISCONNECT, resumed=True)
    assert again.status is ControlStatus.DONE and again.read_back["already"] is True
    assert [c for _, c in fleet.state(FIRST).recorded[meter_model.DISCONNECTOR_LOG]] == [62]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_meter_is_failed_with_the_device_error(fleet):
    meter = address(fleet, FIRST)
    await fleet.stop(FIRST)
    outcome = await control(meter, ControlKind.DISCONNECT)
    assert outcome.status is ControlStatus.FAILED
    assert isinstance(outcome.error, ConnectionFailed) and meter.mrid in outcome.reason


def test_parameters_are_checked_before_anything_is_sent():
    with pytest.raises(ValueError, match="threshold_w is required"):
        checked(ControlCommand(ControlKind.LOAD_LIMIT_SET, {"duration_s": 3}))
    with pytest.raises(ValueError, match="unknown parameter"):
        checked(ControlCommand(ControlKind.DISCONNECT, {"now": True}))
    with pytest.raises(ValueError, match="time zone"):
        checked(ControlCommand(ControlKind.TOU_ACTIVATE, {"calendar_name": "x",
                                                          "activate_at": datetime(2030, 1, 1)}))
    with pytest.raises(ValueError, match=r"days\[0\]"):
        checked(ControlCommand(ControlKind.TOU_ACTIVATE, {"calendar_name": "x",
                                                          "days": [{"id": 1}]}))


HLS_FIRST = FIRST + 10


@pytest_twisted.ensureDeferred
async def test_disconnect_under_hls_gmac(tmp_path):
    fleet = start_fleet(reactor, 1, clock=clock, port=0, base_index=HLS_FIRST, security="hls-gmac")
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    runner = StoreRunner(reactor, store)
    try:
        meter = address(fleet, HLS_FIRST)
        security = HeadEndSecurity(b"CIMHES01", StoredCounters(runner, CounterStore(store)))
        outcome = await DRIVER.control(reactor, meter, ControlCommand(ControlKind.DISCONNECT),
                                       5.0, security)
        assert outcome.status is ControlStatus.DONE, outcome.reason
        assert fleet.state(HLS_FIRST).control_state is ControlState.DISCONNECTED
        refused_state = fleet.state(HLS_FIRST)
        refused_state.control_refusal = 250
        refused = await DRIVER.control(reactor, meter, ControlCommand(ControlKind.CONNECT), 5.0,
                                       security)
        assert refused.status is ControlStatus.REFUSED and "other-reason" in refused.reason
    finally:
        await fleet.stop_all()
        runner.stop()
