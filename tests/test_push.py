"""Pushes over real TCP to the listener: alarm and periodic, plain and ciphered, from the
simulator's push setups; unknown senders, bad keys and broken frames recorded, never fatal."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from cimhes.cim.end_device_event_types import IDIS_ALARM_BITS, UNMAPPED_EVENT_TYPE
from cimhes.drivers import DeviceAddress
from cimhes.endpoints.push_listener import PushListenerFactory
from cimhes.engine.events import EventStore
from cimhes.engine.push import PushIntake
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet
from cimhes.fixtures.meter_cipher import MeterSecurity
from cimhes.fixtures.push import alarm_body, data_notification, periodic_body, send

UTC = timezone.utc
NOW = datetime(2024, 6, 15, 12, 7, 30, tzinfo=UTC)


@pytest.fixture
def head_end(tmp_path):
    fleet = start_fleet(reactor, 2, clock=lambda: NOW, port=0, base_index=31, security="mixed")
    devices = [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]]
    store = Store(f"sqlite:///{tmp_path / 'push.sqlite'}")
    store.load_inventory(devices)
    runner = StoreRunner(reactor, store)
    events = EventStore(store)
    intake = PushIntake(runner, events, devices, now=lambda: NOW)
    port = reactor.listenTCP(0, PushListenerFactory(reactor, intake), interface="127.0.0.1")
    yield {"fleet": fleet, "devices": {d.name: d for d in devices}, "store": store,
           "events": events, "intake": intake, "port": port.getHost().port}
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(fleet.stop_all())
    runner.stop()
    store.close()


async def push(head_end, apdus):
    await send(reactor, "127.0.0.1", head_end["port"], apdus)
    await wait(0.05)  # the listener takes what arrived before the close
    await head_end["intake"].idle()


def wait(seconds):
    waiting = Deferred()
    reactor.callLater(seconds, waiting.callback, None)
    return waiting


def serial(k):
    return meter_model.meter_identity(k).serial


@pytest_twisted.ensureDeferred
async def test_a_plain_alarm_push_becomes_stored_events_one_per_set_bit(head_end):
    device = head_end["devices"][serial(32)]  # even index: LLS, pushes in the clear
    bits = 1 << 2 | 1 << 13 | 1 << 30  # power up, fraud attempt, an unknown bit
    await push(head_end, [data_notification(alarm_body(device.name, bits), NOW)])
    stored = head_end["events"].events(device.mrid)
    assert [(e.event_type, source) for e, source in stored] == [
        (IDIS_ALARM_BITS[2].event_type, "push"), (IDIS_ALARM_BITS[13].event_type, "push"),
        (UNMAPPED_EVENT_TYPE, "push")]
    assert all(e.created == NOW for e, _ in stored)
    assert ("AlarmRegisterBit", "30") in stored[2][0].details
    # The same push again is the same events: stored once.
    await push(head_end, [data_notification(alarm_body(device.name, bits), NOW)])
    assert len(head_end["events"].events(device.mrid)) == 3


@pytest_twisted.ensureDeferred
async def test_a_ciphered_periodic_push_becomes_stored_readings(head_end):
    device = head_end["devices"][serial(31)]  # odd index: HLS-GMAC
    security = head_end["fleet"].securities[31]
    await push(head_end, [data_notification(periodic_body(device.name, NOW), NOW, security=security)])
    store = head_end["store"]
    [(at, value)] = store.stored_values(device.mrid, "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0")
    assert at == NOW
    assert value == Decimal(meter_model.register_raw(device.name, meter_model.IMPORT_TOTAL, NOW)) / 1000
    rows = store.stored_values(device.mrid, "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0")
    expected = meter_model.profile_rows(device.name, NOW - timedelta(hours=1), NOW)
    assert [(at, value) for at, value in rows] == [
        (at, Decimal(minus).scaleb(1) / 1000) for at, _plus, minus in expected]
    assert head_end["intake"].counts["0.1.25.9.0.255"] == 1


@pytest_twisted.ensureDeferred
async def test_unknown_undecryptable_and_malformed_pushes_are_recorded_and_the_listener_serves_on(head_end):
    stranger = MeterSecurity.generate(999)  # a system title no device has
    wrong_keys = MeterSecurity(head_end["fleet"].securities[31].system_title, bytes(16), bytes(16))
    good = head_end["devices"][serial(32)]
    await push(head_end, [
        data_notification(alarm_body("CIMHES000777", 4), NOW),            # unknown plain sender
        data_notification(alarm_body(serial(31), 4), NOW, security=stranger),   # unknown title
        data_notification(alarm_body(serial(31), 4), NOW, security=wrong_keys),  # bad keys
        b"\x0f\x00\x00\x00\x01\x0c" + b"\x07" * 5,                       # truncated
        data_notification(alarm_body(good.name, 1), NOW),                 # and one good one
    ])
    problems = [(p.problem, p.identity) for p in head_end["events"].unrecognised()]
    assert problems == [("unknown device", "CIMCIMHES000777"),
                        ("unknown device", stranger.system_title.hex()),
                        ("undecryptable", wrong_keys.system_title.hex()),
                        ("malformed", None)]
    assert [e.event_type for e, _ in head_end["events"].events(good.mrid)] == [
        IDIS_ALARM_BITS[0].event_type]
    kept = head_end["events"].unrecognised()
    assert all(bytes(16).hex() not in p.reason for p in kept)  # no key in what is kept
    # A frame that breaks the wrapper is recorded and its connection closed; others still served.
    await send(reactor, "127.0.0.1", head_end["port"], [])  # an empty connection is harmless
    from twisted.internet.protocol import ClientCreator, Protocol
    raw = await ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", head_end["port"])
    raw.transport.write(b"\x00\x09" + bytes(20))
    await wait(0.1)
    await head_end["intake"].idle()
    assert head_end["events"].unrecognised()[-1].problem == "malformed"
    await push(head_end, [data_notification(alarm_body(good.name, 2), NOW + timedelta(seconds=1))])
    assert len(head_end["events"].events(good.mrid)) == 2


@pytest_twisted.ensureDeferred
async def test_a_silent_push_connection_is_closed_after_the_idle_timeout_a_talking_one_is_not(
        tmp_path):
    import socket

    from twisted.internet.threads import deferToThread

    store = Store(f"sqlite:///{tmp_path / 'idle.sqlite'}")
    runner = StoreRunner(reactor, store)
    factory = PushListenerFactory(reactor, PushIntake(runner, EventStore(store), []),
                                  idle_timeout=0.8)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    silent = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    talking = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        for _ in range(6):  # 1.2 s, each 0.2 s a byte of a frame that never completes
            talking.sendall(b"\x00")
            await wait(0.2)
        assert await deferToThread(silent.recv, 1) == b""  # closed by the listener
        assert len(factory.connections) == 1
        talking.sendall(b"\x01")
    finally:
        silent.close()
        talking.close()
        await port.stopListening()
        runner.stop()
        store.close()
