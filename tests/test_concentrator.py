"""Meters behind data concentrators: the gateway protocol's bytes (against gurux-dlms's own),
and reads, event logs, the per-concentrator bound and failures over real DLMS on TCP through
simulated concentrators (fixtures/concentrator.py), with direct meters in the same requests."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from gurux_dlms import GXDLMSClient
from gurux_dlms.enums import Authentication, InterfaceType
from gurux_dlms.GXDLMSGateway import GXDLMSGateway
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from cimhes.cim.message import ErrorCode, Header, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.drivers import DeviceAddress
from cimhes.drivers.concentrator import Gateway, GatewayError, gateway_of
from cimhes.drivers.controls import ControlCommand, ControlKind, ControlStatus
from cimhes.drivers.dlms_session import ClientSession
from cimhes.drivers.errors import ProtocolError
from cimhes.drivers.idis import cim_value
from cimhes.drivers.idis_events import EVENT_LOGS, read_events
from cimhes.drivers.limits import SessionLimits
from cimhes.drivers.security import HeadEndSecurity
from cimhes.engine.controls import ControlService
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.inventory import Inventory
from cimhes.engine.limits import EngineSettings
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.security import CounterStore, StoredCounters
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.concentrator import physical_address, start_concentrators
from cimhes.fixtures.fleet import start_fleet

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
HOSTS = ["127.0.21.1", "127.0.21.2"]  # this suite's loopback range
FIRST_BEHIND = 3001  # meter indexes behind the concentrators (they listen nowhere themselves)
FIRST_DIRECT = 251  # two direct meters, 127.0.1.251-252
REMOTE_DISCONNECTION = 62  # IDIS disconnector control log event code
LIMITS = SessionLimits(connect_timeout=2.0, response_timeout=1.5, session_deadline=20.0)


# -- the gateway APDUs, sans-IO --------------------------------------------------------------

def test_the_gateway_request_is_the_one_gurux_dlms_builds():
    address = bytes.fromhex("0000000000000bb9")
    ours = ClientSession("m", 1, 1, "low", "12345678", gateway=Gateway(3, address)).associate()
    gurux = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    gurux.gateway = GXDLMSGateway()
    gurux.gateway.networkId = 3
    gurux.gateway.physicalDeviceAddress = address
    assert ours == bytes(gurux.aarqRequest()[0])
    assert ours[8:11] == bytes((0xE6, 3, 8)) and ours[11:19] == address and ours[19] == 0x60


def test_an_answer_is_taken_only_from_the_meter_asked():
    gateway = Gateway(0, b"\x00\x01")
    session = ClientSession("meter-1", 1, 1, "low", "12345678", gateway=gateway)
    session.associate()
    from_other = bytes((0xE7, 0, 2, 0, 2, 0x61, 0x00))
    frame = bytes((0, 1, 0, 1, 0, 1, 0, len(from_other))) + from_other
    [event] = session.receive_data(frame)
    assert isinstance(event, ProtocolError) and event.device_mrid == "meter-1"
    assert "address 0002" in event.reason and "address 0001" in event.reason
    plain = bytes((0, 1, 0, 1, 0, 1, 0, 2, 0x61, 0x00))
    session.associate()
    [event] = session.receive_data(plain)
    assert isinstance(event, ProtocolError) and "gateway-response" in event.reason
    with pytest.raises(GatewayError):
        gateway.response(bytes((0xE7, 0, 0x85)))


def test_a_direct_meter_has_no_gateway():
    direct = DeviceAddress("m", "M", "idis-meter", "127.0.0.1")
    behind = DeviceAddress("m", "M", "idis-meter", "127.0.0.1", physical_address="0a0b",
                           network_id=2)
    assert gateway_of(direct) is None
    assert gateway_of(behind) == Gateway(2, b"\x0a\x0b")
    with pytest.raises(ValueError, match="physical_address"):
        DeviceAddress("m", "M", "idis-meter", "127.0.0.1", physical_address="xyz")


# -- the inventory ---------------------------------------------------------------------------

def _inventory_document(meters_behind, route_changes=None):
    return {"meters": meters_behind,
            "routes": [{"name": "DC-1", "kind": "concentrator", "host": "127.0.21.9",
                        "port": 4060, **(route_changes or {})}]}


def test_the_inventory_places_a_meter_behind_its_concentrator():
    meter = {"mrid": "m1", "name": "M1", "device_type": "idis-meter", "route": "DC-1",
             "physical_address": "0001", "security": "low", "password": "pw"}
    inventory = Inventory.from_json(_inventory_document([meter]))
    [device] = inventory.devices
    assert (device.address.host, device.address.port, device.address.network_id,
            device.address.physical_address, device.route) == ("127.0.21.9", 4060, 0, "0001",
                                                               "DC-1")
    assert inventory.routes[0].max_sessions == 4  # a concentrator's documented default


@pytest.mark.parametrize("change, words", [
    ({"physical_address": None}, "needs its physical_address"),
    ({"route": None}, 'route of kind "concentrator"'),
    ({"host": "127.0.21.10"}, "is not its concentrator DC-1's"),
])
def test_an_inconsistent_meter_behind_a_concentrator_is_refused(change, words):
    meter = {"mrid": "m1", "name": "M1", "device_type": "idis-meter", "route": "DC-1",
             "physical_address": "0001"}
    meter.update(change)
    meter = {k: v for k, v in meter.items() if v is not None}
    if "route" not in meter:
        meter["host"] = "127.0.21.9"
    with pytest.raises(ValueError, match=words):
        Inventory.from_json(_inventory_document([meter]))


def test_a_gateway_needs_its_concentrator_s_host_and_a_positive_bound():
    with pytest.raises(ValueError, match='kind "concentrator" with its host'):
        Inventory.from_json(_inventory_document([{
            "mrid": "m1", "name": "M1", "device_type": "idis-meter", "route": "DC-1",
            "physical_address": "0001", "host": "127.0.21.9"}], {"host": None, "port": None}))
    with pytest.raises(ValueError, match="max_sessions"):
        Inventory.from_json(_inventory_document([], {"max_sessions": 0}))
    with pytest.raises(ValueError, match='kind "concentrator"'):
        Inventory.from_json({"meters": [], "routes": [{"name": "cell", "host": "x"}]})


def test_the_store_keeps_the_way_to_a_meter_behind_a_concentrator(tmp_path):
    meter = {"mrid": "m1", "name": "M1", "device_type": "idis-meter", "route": "DC-1",
             "physical_address": "0001"}
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        store.load_inventory(Inventory.from_json(
            _inventory_document([meter], {"max_sessions": 3, "network_id": 7})))
        address = store.find_devices(["m1"], [])["m1"]
        assert (address.host, address.port, address.physical_address, address.network_id) == (
            "127.0.21.9", 4060, "0001", 7)
        assert store.route_session_limits() == {"DC-1": 3}
        assert store.routes_of(["m1"]) == {"m1": "DC-1"}
    finally:
        store.close()


# -- over DLMS on TCP ------------------------------------------------------------------------

@pytest.fixture
def concentrators():
    running = start_concentrators(
        reactor, 2, 3, first_meter=FIRST_BEHIND, hosts=HOSTS, port=0, latency=0.02,
        segment_sessions=6, security="mixed", clock=lambda: NOW, silent=[FIRST_BEHIND + 4])
    yield running
    pytest_twisted.blockon(running.stop_all())


@pytest.fixture
def direct():
    fleet = start_fleet(reactor, 2, clock=lambda: NOW, base_index=FIRST_DIRECT, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def engine(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'engine.sqlite'}")
    runner = StoreRunner(reactor, store)
    security = HeadEndSecurity(b"CIMHES01", StoredCounters(runner, CounterStore(store)))
    yield store, runner, security
    runner.stop()
    store.close()


def _load(store, concentrators, direct=None, max_sessions=None) -> Inventory:
    document = concentrators.inventory()
    if max_sessions is not None:
        for route in document["routes"]:
            route["max_sessions"] = max_sessions
    if direct is not None:
        document["meters"] += direct.inventory()["meters"]
    inventory = Inventory.from_json(document)
    store.load_inventory(inventory)
    return inventory


def _request(mrids, reading_types, start=None, end=None) -> GetMeterReadings:
    return GetMeterReadings(header=Header(verb="get", noun="MeterReadings"),
                            end_devices=[DeviceRef(mrid=m) for m in mrids], usage_points=[],
                            reading_types=reading_types, start=start, end=end)


def _plus_a_kwh(serial: str):
    scaler, _ = meter_model.SCALER_UNIT["1.0.1.8.0.255"]
    return cim_value(meter_model.register_raw(serial, "1.0.1.8.0.255", NOW), scaler, 3)


@pytest_twisted.inlineCallbacks
def test_direct_and_concentrator_meters_are_read_in_one_request(concentrators, direct, engine):
    store, runner, security = engine
    inventory = _load(store, concentrators, direct)
    answering = [d.address for d in inventory.devices
                 if d.address.physical_address != physical_address(FIRST_BEHIND + 4).hex()]
    service = MeterReadingService(reactor, runner, limits=LIMITS, security=security)
    outcome = yield service.read(_request([d.mrid for d in answering], [PLUS_A, PLUS_A_PROFILE],
                                          NOW - timedelta(hours=2), NOW))

    assert outcome.result is ReplyResult.OK, outcome.errors
    by_mrid = {r.meter.mrid: r for r in outcome.meter_readings}
    assert set(by_mrid) == {d.mrid for d in answering}
    for device in answering:
        reading = by_mrid[device.mrid]
        assert [r.value for r in reading.readings] == [_plus_a_kwh(device.name)]
        assert len(reading.interval_blocks[0].readings) == 8
    behind = [d for d in answering if d.physical_address is not None]
    assert {d.security for d in behind} == {"low", "hls-gmac"}
    # The concentrators carried every APDU of their meters, and the HLS-GMAC meters'
    # management-client APDUs only ciphered (glo-get 0xC8, glo-action 0xCB, general-glo 0xDB):
    # they forward what they cannot read. (The public client's counter read is plain, as direct.)
    for concentrator in concentrators:
        for meter in concentrator.meters.values():
            if meter.silent:
                continue
            assert meter.identity.mrid in by_mrid
            management = {tag for client, tag in concentrator.forwarded[meter.address]
                          if client == 1}
            if meter.security is not None:
                assert management and management <= {0x60, 0x62, 0xC8, 0xCB, 0xDB}
            else:
                assert 0xC0 in management


@pytest_twisted.inlineCallbacks
def test_a_meter_behind_a_concentrator_that_does_not_answer_fails_alone(concentrators, engine):
    store, runner, security = engine
    inventory = _load(store, concentrators)
    service = MeterReadingService(reactor, runner, limits=LIMITS, security=security)
    outcome = yield service.read(_request([d.address.mrid for d in inventory.devices], [PLUS_A]))

    silent = concentrators[1].meter(FIRST_BEHIND + 4).identity
    assert outcome.result is ReplyResult.PARTIAL
    [error] = outcome.errors
    assert error.id == silent.mrid and error.code == ErrorCode.DEVICE_TIMEOUT.code
    assert silent.serial in error.reason
    assert f"physical address {physical_address(FIRST_BEHIND + 4).hex()}" in error.reason
    assert f"concentrator at {HOSTS[1]}" in error.reason
    assert len(outcome.meter_readings) == 5


@pytest_twisted.inlineCallbacks
def test_the_per_concentrator_bound_holds_across_requests(engine):
    store, runner, security = engine
    running = start_concentrators(reactor, 1, 6, first_meter=FIRST_BEHIND + 20,
                                  hosts=HOSTS[:1], port=0, latency=0.05, segment_sessions=6,
                                  clock=lambda: NOW)
    try:
        inventory = _load(store, running, max_sessions=2)
        mrids = [d.address.mrid for d in inventory.devices]
        service = MeterReadingService(reactor, runner, limits=LIMITS, security=security)
        first, second = yield gatherResults([
            service.read(_request(mrids[:3], [PLUS_A])),
            service.read(_request(mrids[3:], [PLUS_A]))])
        assert first.result is second.result is ReplyResult.OK
        # The segment could serve six; the route's own bound let two in at a time.
        assert running[0].segment.peak == 2
    finally:
        yield running.stop_all()


@pytest_twisted.ensureDeferred
async def test_an_event_log_is_fetched_through_a_concentrator(concentrators, engine):
    store, runner, security = engine
    inventory = _load(store, concentrators)
    start, end = NOW - timedelta(days=20), NOW - timedelta(days=5)
    for device in inventory.devices[:2]:  # one LLS meter, one HLS-GMAC meter
        address = device.address
        result = await read_events(reactor, address, start, end, LIMITS, security=security)
        want = {(f"{log.obis}:long power failure" if log.is_power_failure
                 else f"{log.obis}:{value}", at)
                for log in EVENT_LOGS.values()
                for at, value in meter_model.scheduled_events(address.name, log.obis, start, end)}
        assert {(e.device_code, e.created) for e in result.events} == want
        assert len(want) > 5


@pytest_twisted.ensureDeferred
async def test_a_disconnect_through_a_concentrator_is_done_and_read_back(concentrators, direct,
                                                                          engine):
    store, runner, security = engine
    _load(store, concentrators, direct)
    # The silent meter's control is retried: quickly here (the default waits 30 s, then 60 s).
    dispatcher = Dispatcher(reactor, runner, EngineSettings(min_device_gap=0.0, retry_delay=0.2,
                                                            retry_jitter=0.0),
                            session_limits=LIMITS, connections_per_second=0, security=security)
    service = ControlService(reactor, runner, dispatcher)
    dispatcher.start()
    try:
        behind = [concentrators[0].meter(FIRST_BEHIND), concentrators[0].meter(FIRST_BEHIND + 1)]
        assert [m.security is not None for m in behind] == [True, False]  # HLS-GMAC, LLS
        asked = [m.identity.mrid for m in behind] + [direct.meters[0].mrid]
        batch = await service.execute(asked, ControlCommand(ControlKind.DISCONNECT), user="op",
                                      correlation_id="dc-1")
        assert [o.device_mrid for o in batch.outcomes] == asked
        assert [o.status for o in batch.outcomes] == [ControlStatus.DONE] * 3, [
            o.reason for o in batch.outcomes]
        assert all(o.read_back["output_state"] is False for o in batch.outcomes)
        for meter in behind:  # the meters themselves, behind the concentrator, are open
            assert meter.state.output_state is False
            assert REMOTE_DISCONNECTION in [code for _, code in meter.state.recorded.get(
                meter_model.DISCONNECTOR_LOG, [])]
        assert direct.state(FIRST_DIRECT).output_state is False
        assert all(tag != 0xC3 for client, tag in concentrators[0].forwarded[behind[0].address]
                   if client == 1)  # the HLS-GMAC meter's ACTION went ciphered (glo-action)
        silent = concentrators[1].meter(FIRST_BEHIND + 4).identity
        [gone] = (await service.execute([silent.mrid], ControlCommand(ControlKind.DISCONNECT),
                                        user="op", correlation_id="dc-2")).outcomes
        assert gone.status is ControlStatus.FAILED
        assert silent.serial in gone.reason and "behind the concentrator" in gone.reason
    finally:
        dispatcher.stop()
