"""The simulated limiter acts: demand above the active threshold for min_over_threshold_duration
writes "limiter threshold exceeded" and opens the disconnector (local disconnect), demand back
under for min_under_threshold_duration writes "threshold ok" (fixtures/meter_controls.py:
supervise). Checked as the pure function with a demand the test writes, then end to end: the
head-end's load-limit-set control on a simulated meter, its clock moved on, the event log read
and stored through the head-end with the CIM EndDeviceEventTypes, the disconnector read back."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor

from cimhes.cim.end_device_event_types import event_type_for
from cimhes.drivers import driver_for
from cimhes.drivers.controls import ControlCommand, ControlKind, ControlStatus
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.event_fetches import EventFetchService
from cimhes.engine.events import EventStore
from cimhes.engine.inventory import Inventory
from cimhes.engine.limits import EngineSettings
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.meter_controls import (
    LIMITER_THRESHOLD_EXCEEDED,
    LIMITER_THRESHOLD_OK,
    LOCAL_DISCONNECTION,
    LOCAL_RECONNECTION,
    ControlState,
    Disconnector,
    Limiter,
    supervise,
)
from cimhes.fixtures.fleet import start_fleet

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=timezone.utc)  # a quarter-hour boundary
LIMITS = SessionLimits(connect_timeout=2.0, response_timeout=2.0, session_deadline=20.0)
METER = 19 * 254 + 1  # meter index on 127.0.20.1, this suite's loopback range
DISCONNECTOR_STATE = "0.0.0.6.0.1.43.0.0.0.0.0.0.0.0.0.0.0"  # control_state, the catalogue's row
LOG = meter_model.DISCONNECTOR_LOG


# -- the rule, as a function of a demand the test writes --------------------------------------

def _watch(limiter, disconnector, demand, until):
    found = []
    supervise(limiter, disconnector, until, demand, lambda at, code: code is not None
              and found.append((int((at - NOW).total_seconds()), code)))
    return found


def test_demand_over_the_threshold_long_enough_trips_and_its_absence_restores():
    limiter = Limiter(threshold_normal=100, min_over_threshold_duration=600,
                      min_under_threshold_duration=120, supervised_to=NOW)
    disconnector = Disconnector(control_mode=6)  # reconnects locally (transition h)
    # 200 W in the first quarter-hour, 50 W after.
    demand = lambda at: 200 if at < NOW + timedelta(minutes=15) else 50  # noqa: E731
    found = _watch(limiter, disconnector, demand, NOW + timedelta(minutes=30))
    # Over from 0 s: exceeded at 600 s, the disconnector opens (demand 0 from then), ok at
    # 720 s and it closes again (mode 6): 200 W again until 900 s is 180 s, too short to trip.
    assert found == [(600, LIMITER_THRESHOLD_EXCEEDED), (600, LOCAL_DISCONNECTION),
                     (720, LIMITER_THRESHOLD_OK), (720, LOCAL_RECONNECTION)]
    assert disconnector.control_state is ControlState.CONNECTED and not limiter.tripped


def test_an_interrupted_excess_does_not_trip_and_mode_4_stays_open():
    limiter = Limiter(threshold_normal=100, min_over_threshold_duration=600,
                      supervised_to=NOW + timedelta(minutes=10))
    disconnector = Disconnector()  # control mode 4: no local reconnection
    dip = lambda at: 200 if at < NOW + timedelta(minutes=15) else 50  # noqa: E731
    assert _watch(limiter, disconnector, dip, NOW + timedelta(hours=1)) == []  # 300 s over only
    steady = lambda at: 200  # noqa: E731
    found = _watch(limiter, disconnector, steady, NOW + timedelta(hours=2))
    assert found == [(3600 + 600, LIMITER_THRESHOLD_EXCEEDED), (3600 + 600, LOCAL_DISCONNECTION),
                     (3600 + 660, LIMITER_THRESHOLD_OK)]
    assert disconnector.control_state is ControlState.READY_FOR_RECONNECTION


def test_no_limit_is_never_exceeded():
    limiter, disconnector = Limiter(supervised_to=NOW), Disconnector()
    assert _watch(limiter, disconnector, lambda at: 2**31, NOW + timedelta(days=3)) == []


# -- end to end through the head-end ----------------------------------------------------------

@pytest.fixture
def meter():
    clock = [NOW]
    fleet = start_fleet(reactor, 1, clock=lambda: clock[0], base_index=METER, port=0)
    inventory = Inventory.from_json(fleet.inventory())
    yield fleet, inventory, clock
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def events_service(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'events.sqlite'}")
    runner = StoreRunner(reactor, store)
    dispatcher = Dispatcher(reactor, runner, EngineSettings(min_device_gap=0),
                            session_limits=LIMITS, connections_per_second=0)
    events = EventStore(store)
    fetches = EventFetchService(reactor, runner, dispatcher, events)
    dispatcher.start()
    yield store, fetches, events
    dispatcher.stop()
    runner.stop()
    store.close()


@pytest.mark.parametrize("mode, after", [(4, ControlState.READY_FOR_RECONNECTION),
                                         (6, ControlState.CONNECTED)])
@pytest_twisted.ensureDeferred
async def test_a_limit_below_the_demand_trips_the_meter_and_its_events_are_read(
        meter, events_service, mode, after):
    fleet, inventory, clock = meter
    store, fetches, events = events_service
    store.load_inventory(inventory)
    [device] = [d.address for d in inventory.devices]
    fleet.state(METER).disconnector.control_mode = mode
    demand = meter_model.instantaneous_raw(device.name, meter_model.POWER_TOTAL, NOW)
    threshold = demand // 2  # the model's demand is at least 120 W in every quarter-hour
    driver = driver_for(device.device_type)
    limited = await driver.control(
        reactor, device, ControlCommand(ControlKind.LOAD_LIMIT_SET,
                                        {"threshold_w": threshold, "duration_s": 60}),
        LIMITS, now=lambda: clock[0])
    assert limited.status is ControlStatus.DONE, limited.reason
    under_s = fleet.state(METER).limiter.min_under_threshold_duration  # default 60 s
    clock[0] = NOW + timedelta(seconds=60 + under_s + 30)

    outcome = await fetches.read([device], NOW, clock[0], logs=["disconnector"])
    assert not outcome.errors
    stored = [e for e, _ in events.events(device.mrid, NOW, clock[0])]
    assert len(stored) == outcome.events
    found = [(e.created, e.device_code, e.event_type) for e in stored
             if e.device_code != f"{LOG}:67"]  # 67: the SET itself (threshold changed)
    tripped, restored = NOW + timedelta(seconds=60), NOW + timedelta(seconds=60 + under_s)
    want = [(tripped, f"{LOG}:65", event_type_for(65)), (tripped, f"{LOG}:64", event_type_for(64)),
            (restored, f"{LOG}:66", event_type_for(66))]
    if mode == 6:
        want.append((restored, f"{LOG}:69", event_type_for(69)))
    assert sorted(found) == sorted(want)
    assert event_type_for(65) == "3.15.261.139" and event_type_for(66) == "3.15.261.216"

    state = await driver.read(reactor, device, [DISCONNECTOR_STATE], None, None, LIMITS)
    assert [r.value for r in state.meter_reading.readings] == [after.value]
