"""Meters behind a concentrator over one shared TCP association: the sans-IO gateway mux with
bytes, then reads, an event-log fetch and a disconnect through simulated concentrators
(fixtures/concentrator.py) that count the connections they accept; a dropped connection, a
misbehaving meter, the idle close and the concentrator's own session bound."""
from __future__ import annotations

import struct
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import DeferredList, gatherResults

from cimhes.drivers import driver_for
from cimhes.drivers.concentrator import Delivered, Gateway, GatewayMux, Stray, StreamBroken
from cimhes.drivers.concentrator_link import links_of
from cimhes.drivers.controls import ControlCommand, ControlKind, ControlStatus
from cimhes.drivers.errors import ConnectionFailed, ProtocolError, Timeout
from cimhes.drivers.idis import cim_value
from cimhes.drivers.idis_events import EVENT_LOGS, read_events
from cimhes.drivers.limits import SessionLimits
from cimhes.drivers.security import HeadEndSecurity
from cimhes.engine.concentrators import apply_concentrator_bounds, concentrator_bounds
from cimhes.engine.inventory import Inventory
from cimhes.engine.security import CounterStore, StoredCounters
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.concentrator import start_concentrators

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
LIMITS = SessionLimits(connect_timeout=2.0, response_timeout=1.5, session_deadline=20.0)
FIRST = 4001  # meter indexes behind the concentrators of this file
_WRAPPER = struct.Struct(">HHHH")


def _frame(client: int, apdu: bytes) -> bytes:
    return _WRAPPER.pack(1, 1, client, len(apdu)) + apdu


# -- the mux, sans-IO ------------------------------------------------------------------------

def test_the_mux_routes_each_answer_by_meter_and_client_wport():
    mux = GatewayMux()
    one, two = Gateway(0, b"\x00\x01"), Gateway(0, b"\x00\x02")
    mux.open(GatewayMux.channel_of(one, 1))
    mux.open(GatewayMux.channel_of(two, 1))
    mux.open(GatewayMux.channel_of(two, 16))
    answers = [_frame(1, bytes((0xE7, 0, 2, 0, 2, 0x61, 0x01))),
               _frame(16, bytes((0xE7, 0, 2, 0, 2, 0x61, 0x02))),
               _frame(1, bytes((0xE7, 0, 2, 0, 1, 0x61, 0x03)))]
    stream = b"".join(answers)
    # Cut anywhere: the frames come out whole and in order.
    events = mux.receive_data(stream[:5]) + mux.receive_data(stream[5:20])
    events += mux.receive_data(stream[20:])
    assert events == [Delivered((0, b"\x00\x02", 1), answers[0]),
                      Delivered((0, b"\x00\x02", 16), answers[1]),
                      Delivered((0, b"\x00\x01", 1), answers[2])]


def test_the_mux_drops_what_no_session_waits_for_and_stops_on_a_broken_stream():
    mux = GatewayMux()
    mux.open((0, b"\x00\x01", 1))
    [unknown, plain, other_network, fine] = mux.receive_data(
        _frame(1, bytes((0xE7, 0, 2, 0xEE, 0xEE, 0x61)))
        + _frame(1, bytes((0xD8, 1, 2)))
        + _frame(1, bytes((0xE7, 9, 2, 0, 1, 0x61)))
        + _frame(1, bytes((0xE7, 0, 2, 0, 1, 0x61))))
    assert isinstance(unknown, Stray) and "eeee" in unknown.reason
    assert isinstance(plain, Stray) and "gateway-response" in plain.reason
    assert isinstance(other_network, Stray) and "network 9" in other_network.reason
    assert isinstance(fine, Delivered)
    mux.close((0, b"\x00\x01", 1))
    [late] = mux.receive_data(_frame(1, bytes((0xE7, 0, 2, 0, 1, 0x61))))
    assert isinstance(late, Stray)  # an answer to a session already ended
    [broken] = mux.receive_data(b"\x00\x02" + b"\x00" * 10)
    assert isinstance(broken, StreamBroken)
    assert isinstance(mux.receive_data(_frame(1, b"\xE7"))[0], StreamBroken)
    mux.open((0, b"\x00\x05", 1))
    with pytest.raises(ValueError, match="already open"):
        mux.open((0, b"\x00\x05", 1))


# -- over TCP --------------------------------------------------------------------------------

def _addresses(running) -> list:
    return [d.address for d in Inventory.from_json(running.inventory()).devices]


def _plus_a_kwh(serial: str):
    scaler, _ = meter_model.SCALER_UNIT["1.0.1.8.0.255"]
    return cim_value(meter_model.register_raw(serial, "1.0.1.8.0.255", NOW), scaler, 3)


def _read(device, security=None):
    return driver_for(device.device_type).read(reactor, device, [PLUS_A], None, None, LIMITS,
                                               None, security)


@pytest.fixture
def security(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'engine.sqlite'}")
    runner = StoreRunner(reactor, store)
    yield HeadEndSecurity(b"CIMHES01", StoredCounters(runner, CounterStore(store)))
    runner.stop()
    store.close()


def _start(host: str, meters: int, **options):
    options.setdefault("latency", 0.02)
    options.setdefault("segment_sessions", meters)
    return start_concentrators(reactor, 1, meters, first_meter=FIRST, hosts=[host], port=0,
                               clock=lambda: NOW, **options)


@pytest_twisted.ensureDeferred
async def test_reads_of_many_meters_share_one_connection(security):
    running = _start("127.0.20.1", 6, security="mixed")
    try:
        devices = _addresses(running)
        results = await gatherResults([_read(d, security) for d in devices])
        assert [r.meter_reading.readings[0].value for r in results] == [
            _plus_a_kwh(d.name) for d in devices]
        concentrator = running[0]
        # Six meters, management and public clients: one TCP connection, and at times several
        # sessions on it at once.
        assert concentrator.accepted == 1
        assert concentrator.segment.peak > 1
        assert {client for seen in concentrator.forwarded.values() for client, _ in seen} == {
            1, 16}
        link = links_of(reactor).link(concentrator.host, concentrator.port)
        assert link.connections_opened == 1 and link.sessions == {}
        again = await _read(devices[0], security)  # the connection is still open: reused
        assert again.meter_reading.readings[0].value == _plus_a_kwh(devices[0].name)
        assert concentrator.accepted == 1
    finally:
        await running.stop_all()


@pytest_twisted.ensureDeferred
async def test_a_read_an_event_log_and_a_disconnect_share_the_connection(security):
    running = _start("127.0.20.2", 3, security="mixed")
    try:
        reader, logger, switched = _addresses(running)
        start, end = NOW - timedelta(days=20), NOW - timedelta(days=5)
        read, events, control = await gatherResults([
            _read(reader, security),
            read_events(reactor, logger, start, end, LIMITS, security=security),
            driver_for(switched.device_type).control(
                reactor, switched, ControlCommand(ControlKind.DISCONNECT), LIMITS, security,
                now=lambda: NOW)])
        assert read.meter_reading.readings[0].value == _plus_a_kwh(reader.name)
        want = {(f"{log.obis}:long power failure" if log.is_power_failure
                 else f"{log.obis}:{value}", at)
                for log in EVENT_LOGS.values()
                for at, value in meter_model.scheduled_events(logger.name, log.obis, start, end)}
        assert {(e.device_code, e.created) for e in events.events} == want and len(want) > 5
        assert control.status is ControlStatus.DONE, control.reason
        assert control.read_back["output_state"] is False
        assert running[0].meter(FIRST + 2).state.output_state is False
        assert running[0].accepted == 1
    finally:
        await running.stop_all()


@pytest_twisted.ensureDeferred
async def test_a_dropped_connection_fails_its_sessions_by_name_and_the_next_read_reconnects():
    running = _start("127.0.20.3", 3, latency=0.05)
    try:
        devices = _addresses(running)
        concentrator = running[0]
        concentrator.drop_after = 3  # the three AARQs are out: every session is in flight
        outcomes = await DeferredList([_read(d) for d in devices], consumeErrors=True)
        where = f"{concentrator.host}:{concentrator.port}"
        for device, (ok, failure) in zip(devices, outcomes):
            assert not ok and failure.check(ConnectionFailed)
            text = str(failure.value)
            assert device.name in text and f"physical address {device.physical_address}" in text
            assert f"the connection to the concentrator at {where} was lost" in text
        results = await gatherResults([_read(d) for d in devices])
        assert [r.meter_reading.readings[0].value for r in results] == [
            _plus_a_kwh(d.name) for d in devices]
        assert concentrator.accepted == 2
    finally:
        await running.stop_all()


@pytest_twisted.ensureDeferred
async def test_a_misbehaving_meter_spoils_only_its_own_session():
    running = _start("127.0.20.4", 4)
    try:
        concentrator = running[0]
        concentrator.meter(FIRST).misbehaving = "garbage"
        concentrator.meter(FIRST + 1).misbehaving = "unknown-address"
        devices = _addresses(running)
        garbage, unknown, *fine = await DeferredList([_read(d) for d in devices],
                                                     consumeErrors=True)
        assert not garbage[0] and garbage[1].check(ProtocolError)
        assert devices[0].name in str(garbage[1].value)
        assert not unknown[0] and unknown[1].check(Timeout)
        assert [ok for ok, _ in fine] == [True, True]
        assert [r.meter_reading.readings[0].value for _, r in fine] == [
            _plus_a_kwh(d.name) for d in devices[2:]]
        link = links_of(reactor).link(concentrator.host, concentrator.port)
        assert concentrator.accepted == 1 and link.connected and link.strays >= 1
    finally:
        await running.stop_all()


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_is_closed_and_opened_again_when_needed():
    running = _start("127.0.20.5", 1)
    try:
        concentrator = running[0]
        link = links_of(reactor).link(concentrator.host, concentrator.port)
        link.idle_timeout = 0.2
        [device] = _addresses(running)
        await _read(device)
        assert link.connected and len(concentrator.connections) == 1
        await task.deferLater(reactor, 0.5, lambda: None)
        assert not link.connected and not concentrator.connections
        await _read(device)
        assert concentrator.accepted == 2
    finally:
        await running.stop_all()


@pytest_twisted.ensureDeferred
async def test_the_concentrator_s_bound_holds_for_every_session_on_its_link(tmp_path):
    running = _start("127.0.20.6", 5, latency=0.05)
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    runner = StoreRunner(reactor, store)
    try:
        document = running.inventory()
        document["routes"][0]["max_sessions"] = 2
        inventory = Inventory.from_json(document)
        store.load_inventory(inventory)
        bounds = await runner.call(concentrator_bounds, store)
        concentrator = running[0]
        assert bounds == {(concentrator.host, concentrator.port): 2}
        apply_concentrator_bounds(reactor, bounds)
        devices = [d.address for d in inventory.devices]
        start = NOW - timedelta(days=3)
        # Driver calls made outside the dispatcher: the link alone keeps them to two.
        results = await gatherResults([read_events(reactor, d, start, NOW, LIMITS)
                                       for d in devices])
        assert len(results) == 5 and concentrator.segment.peak == 2
        assert concentrator.accepted == 1
    finally:
        links_of(reactor).bound(running[0].host, running[0].port, None)
        await running.stop_all()
        runner.stop()
        store.close()
