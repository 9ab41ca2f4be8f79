"""HLS-GMAC through the whole head-end: real TCP to simulated meters, the counter book in a real
SQLite store, and GetMeterReadings over SOAP; wrong keys, replays and restarts."""
from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from cimhes.cim.message import ErrorCode, Header, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.drivers import DeviceAddress
from cimhes.drivers.security import COUNTERS_PER_SESSION, HeadEndSecurity
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.security import SESSIONS_PER_RESERVATION, CounterStore, StoredCounters
from cimhes.engine.sealed import SecretBox
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import Fault, start_fleet

from .credentials import add_test_user, zeep_client

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
FIRST_METER = 2541  # 127.0.11.1.. with port 0: clear of other tests' meters
TITLE = bytes.fromhex("43494d4845530001")


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 5, clock=lambda: NOW, base_index=FIRST_METER, port=0,
                        security="hls-gmac", faults={FIRST_METER + 3: Fault("replay"),
                                                     FIRST_METER + 4: Fault("bad-auth-tag")})
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


class Engine:
    """A reading service on a store file, as one head-end process would have it."""

    def __init__(self, path):
        # The process's secret key, kept beside the store as a head-end keeps it.
        self.store = Store(f"sqlite:///{path}", SecretBox.from_file(f"{path}.secret-key"))
        self.runner = StoreRunner(reactor, self.store)
        self.counters = CounterStore(self.store)
        self.service = MeterReadingService(
            reactor, self.runner, timeout=3.0, now=lambda: NOW,
            security=HeadEndSecurity(TITLE, StoredCounters(self.runner, self.counters)))

    def read(self, devices, reading_types=(PLUS_A,), start=None):
        return self.service.read(GetMeterReadings(
            header=Header(verb="get", noun="MeterReadings"),
            end_devices=[DeviceRef(mrid=d.mrid) for d in devices], usage_points=[],
            reading_types=list(reading_types), start=start, end=start and NOW))

    def close(self):
        self.runner.stop()
        self.store.close()


@pytest.fixture
def captured_logs(caplog):
    """Everything logged, by Python logging and by Twisted's logger."""
    lines: list[str] = []

    def observe(event):
        lines.append(repr(event))

    globalLogPublisher.addObserver(observe)
    caplog.set_level(logging.DEBUG)
    yield lambda: "\n".join(lines) + caplog.text
    globalLogPublisher.removeObserver(observe)


def _devices(fleet):
    return [DeviceAddress.from_inventory(entry) for entry in fleet.inventory()["meters"]]


def _keys(fleet) -> list[str]:
    return [key for security in fleet.securities.values()
            for key in (security.encryption_key.hex(), security.authentication_key.hex())]


@pytest_twisted.inlineCallbacks
def test_hls_meters_are_read_and_their_counters_kept_across_a_restart(tmp_path, fleet):
    devices = _devices(fleet)[:2]
    first = fleet.securities[FIRST_METER]
    first.last_client_counter = 5000  # another head-end has talked to it before
    engine = Engine(tmp_path / "hes.sqlite")
    engine.store.load_inventory(devices)
    outcome = yield engine.read(devices, (PLUS_A, PLUS_A_PROFILE), start=NOW - timedelta(hours=6))
    assert outcome.result is ReplyResult.OK, outcome.errors
    reading = outcome.meter_readings[0]
    serial = devices[0].name
    assert reading.readings[0].value == Decimal(
        meter_model.register_raw(serial, meter_model.IMPORT_TOTAL, NOW)) / 1000
    assert len(reading.interval_blocks[0].readings) == 24
    # No counter was recorded: the head-end read the meter's (5000) as the public client first,
    # and took the counters of SESSIONS_PER_RESERVATION sessions from the store at once.
    next_client, last_server = engine.counters.counters(devices[0].mrid)
    assert next_client == 5001 + SESSIONS_PER_RESERVATION * COUNTERS_PER_SESSION
    assert 5001 < first.last_client_counter < 5001 + COUNTERS_PER_SESSION
    assert last_server == first.next_counter - 1
    # The next session in this process takes the next block from memory: the meter sees
    # larger counters, the store's mark (above them) does not move, its last_server does.
    used = first.last_client_counter
    outcome = yield engine.read(devices)
    assert outcome.result is ReplyResult.OK, outcome.errors
    assert used < 5001 + COUNTERS_PER_SESSION <= first.last_client_counter < next_client
    assert engine.counters.counters(devices[0].mrid) == (next_client, first.next_counter - 1)
    engine.close()

    # A new process on the same store skips what the last one held and continues above every
    # counter handed out before.
    used = first.last_client_counter
    engine = Engine(tmp_path / "hes.sqlite")
    outcome = yield engine.read(devices)
    assert outcome.result is ReplyResult.OK, outcome.errors
    assert first.last_client_counter >= next_client > used
    assert engine.counters.counters(devices[0].mrid)[0] == (
        next_client + SESSIONS_PER_RESERVATION * COUNTERS_PER_SESSION)
    assert engine.counters.security_events() == []
    engine.close()


@pytest_twisted.inlineCallbacks
def test_a_book_behind_the_meter_is_resynchronised_from_its_counter_and_the_read_goes_on(
        tmp_path, fleet):
    device = _devices(fleet)[0]
    meter = fleet.securities[FIRST_METER]
    engine = Engine(tmp_path / "hes.sqlite")
    engine.store.load_inventory([device])
    # The book says counters from 100 are free (a store restored from an old backup), but the
    # meter has accepted up to 7000 from this head-end's key since.
    yield StoredCounters(engine.runner, engine.counters).start(device.mrid, 100, 1)
    meter.last_client_counter = 7000
    outcome = yield engine.read([device])
    assert outcome.result is ReplyResult.OK, outcome.errors
    assert outcome.meter_readings[0].readings[0].value == Decimal(
        meter_model.register_raw(device.name, meter_model.IMPORT_TOTAL, NOW)) / 1000
    # Refused once (invocation-counter-error), read as the public client, moved past 7000.
    next_client, _ = engine.counters.counters(device.mrid)
    # (The book's mark was above 7000 already, by the range the first attempt reserved.)
    assert 7001 < meter.last_client_counter < next_client
    assert next_client - meter.last_client_counter > (SESSIONS_PER_RESERVATION - 1) * COUNTERS_PER_SESSION
    [event] = engine.counters.security_events(device.mrid)
    assert event.kind == "counter-resync"
    assert "invocation-counter-error" in event.detail and "7000" in event.detail
    # The next read needs no resync.
    outcome = yield engine.read([device])
    assert outcome.result is ReplyResult.OK, outcome.errors
    assert len(engine.counters.security_events(device.mrid)) == 1
    engine.close()


@pytest_twisted.inlineCallbacks
def test_concurrent_reads_of_one_meter_never_share_a_counter(tmp_path, fleet):
    device = _devices(fleet)[0]
    engine = Engine(tmp_path / "hes.sqlite")
    engine.store.load_inventory([device])
    counters = StoredCounters(engine.runner, engine.counters)
    yield counters.start(device.mrid, 1, 10)
    reservations = yield gatherResults([counters.reserve(device.mrid, 10) for _ in range(20)])
    ranges = sorted((r.first, r.limit) for r in reservations)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint
    assert ranges[0][0] == 11 and ranges[-1][1] == 211
    engine.close()


@pytest_twisted.inlineCallbacks
def test_wrong_keys_and_replays_are_device_errors_and_security_events(tmp_path, fleet, captured_logs):
    devices = _devices(fleet)
    wrong_key = replace(devices[1], encryption_key="00" * 16)
    wrong_title = replace(devices[2], system_title="4349 4d00 0000 0999".replace(" ", ""))
    replaying, forging = devices[3], devices[4]
    asked = [devices[0], wrong_key, wrong_title, replaying, forging]
    engine = Engine(tmp_path / "hes.sqlite")
    engine.store.load_inventory(asked)
    outcome = yield engine.read(asked, (PLUS_A, PLUS_A_PROFILE), start=NOW - timedelta(hours=2))

    assert outcome.result is ReplyResult.PARTIAL
    assert [m.meter.mrid for m in outcome.meter_readings] == [devices[0].mrid]
    errors = {error.id: error for error in outcome.errors}
    for device in (wrong_key, wrong_title, forging):
        error = errors[device.mrid]
        assert error.code == ErrorCode.DEVICE_REFUSED.value
        assert "AuthenticationFailed" in error.reason and "authentication failed" in error.reason
        assert device.name in error.reason and device.mrid in error.reason
    assert "system title" in errors[wrong_title.mrid].reason
    replay = errors[replaying.mrid]
    assert replay.code == ErrorCode.DEVICE_PROTOCOL_ERROR.value and "ReplayDetected" in replay.reason

    events = {(event.device_mrid, event.kind) for event in engine.counters.security_events()}
    assert events == {(wrong_key.mrid, "authentication-failure"),
                      (wrong_title.mrid, "authentication-failure"), (replaying.mrid, "replay"),
                      (forging.mrid, "authentication-failure")}
    everything = captured_logs() + repr(outcome) + repr(asked) + repr(engine.counters.security_events())
    assert [key for key in _keys(fleet) if key in everything.lower()] == []
    assert "0" * 32 not in everything
    engine.close()


@pytest_twisted.inlineCallbacks
def test_a_mixed_fleet_reads_its_lls_and_hls_meters_alike(tmp_path):
    fleet = start_fleet(reactor, 4, clock=lambda: NOW, base_index=FIRST_METER + 10, port=0,
                        security="mixed")
    try:
        devices = _devices(fleet)
        assert [d.security for d in devices] == ["hls-gmac", "low", "hls-gmac", "low"]
        engine = Engine(tmp_path / "hes.sqlite")
        engine.store.load_inventory(devices)
        outcome = yield engine.read(devices)
        assert outcome.result is ReplyResult.OK, outcome.errors
        values = {m.meter.mrid: m.readings[0].value for m in outcome.meter_readings}
        assert values == {d.mrid: Decimal(meter_model.register_raw(d.name, meter_model.IMPORT_TOTAL, NOW)) / 1000
                          for d in devices}
        # An HLS meter no longer takes the LLS password for its management client.
        lls = replace(devices[0], security="low", password=meter_model.DEFAULT_PASSWORD,
                      system_title=None, encryption_key=None, authentication_key=None)
        engine.store.load_inventory([lls])
        outcome = yield engine.read([lls])
        assert outcome.errors[0].code == ErrorCode.DEVICE_REFUSED.value
        engine.close()
    finally:
        yield fleet.stop_all()


@pytest_twisted.inlineCallbacks
def test_get_meter_readings_over_soap_from_an_hls_fleet(tmp_path, fleet, captured_logs):
    devices = _devices(fleet)[:3]
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key")), devices)
    add_test_user(head_end)
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/cim/GetMeterReadings?wsdl"
        client = yield deferToThread(zeep_client, url)
        reply = yield deferToThread(lambda: client.service.GetMeterReadings(
            Header={"Verb": "get", "Noun": "MeterReadings", "MessageID": "hls-1"},
            Request={"GetMeterReadings": {"EndDevice": [{"mRID": d.mrid} for d in devices],
                                          "ReadingType": [{"mRID": PLUS_A}]}}))
        assert reply.Reply.Result == "OK", reply.Reply
        by_mrid = {mr.Meter.mRID: mr for mr in reply.Payload.MeterReadings.MeterReading}
        for device in devices:
            (reading,) = by_mrid[device.mrid].Readings
            assert Decimal(reading.value) == Decimal(
                meter_model.register_raw(device.name, meter_model.IMPORT_TOTAL, reading.timeStamp)) / 1000
        assert head_end.counters.store.counters(devices[0].mrid) is not None
        assert [k for k in _keys(fleet) if k in captured_logs().lower()] == []
    finally:
        yield port.stopListening()
        head_end.store_runner.stop()
        head_end.store.close()
