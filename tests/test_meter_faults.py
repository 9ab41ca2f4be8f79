"""Meters that misbehave, each in its own way (fixtures.fleet FAULTS), read by the engine among
good ones: the bad meter comes back as one Error naming it (mRID, name, host:port) within its
limits, the good meters are read in full, and nothing is left behind: no socket, no file
descriptor, no timer."""
from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from cimhes.cim.message import ErrorCode, Header, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.drivers import DeviceAddress
from cimhes.drivers.limits import SessionLimits
from cimhes.drivers.security import HeadEndSecurity
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.security import CounterStore, StoredCounters
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import FAULTS, Fault, start_fleet

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
END = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
REGISTER = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"  # 96 rows: a block transfer
GOOD = 3
FAULTY = GOOD + 1
LIMITS = SessionLimits(connect_timeout=1.0, response_timeout=0.6, session_deadline=2.0,
                       max_answer_bytes=256 * 1024, max_answer_blocks=10_000)

# fault -> (its Fault, the Reply.Error code, words the reason must hold, seconds it may take)
CASES = {
    "silent": (Fault("silent"), ErrorCode.DEVICE_TIMEOUT, "no answer to AARQ within 0.6 s", 0.6),
    "garbage": (Fault("garbage"), ErrorCode.DEVICE_PROTOCOL_ERROR, "bad wrapper header", 0),
    "drop-mid-block": (Fault("drop-mid-block"), ErrorCode.DEVICE_UNREACHABLE,
                       "connection closed while waiting for GET 1.0.99.1.0.255 buffer", 0),
    "replay": (Fault("replay"), ErrorCode.DEVICE_PROTOCOL_ERROR, "does not answer invoke-id", 0),
    "bad-wrapper": (Fault("bad-wrapper"), ErrorCode.DEVICE_PROTOCOL_ERROR,
                    "bad wrapper header", 0),
    "bad-tag": (Fault("bad-tag"), ErrorCode.DEVICE_PROTOCOL_ERROR,
                "expected AARE, got APDU tag 0xee", 0),
    "refuse": (Fault("refuse"), ErrorCode.DEVICE_UNREACHABLE, "cannot connect to", 0),
    "refuse-association": (Fault("refuse-association"), ErrorCode.DEVICE_REFUSED,
                           "authentication-failure", 0),
    # 15 exchanges 0.3 s late each: every answer inside the response timeout, the session not
    # inside its deadline.
    "slow": (Fault("slow", 0.3), ErrorCode.DEVICE_TIMEOUT, "session deadline of 2 s passed", 2.0),
    "endless-blocks": (Fault("endless-blocks"), ErrorCode.DEVICE_PROTOCOL_ERROR,
                       "passed 262144 bytes; connection closed", 0),
    # read in an HLS-GMAC fleet (the faults below only exist where answers are ciphered)
    "bad-auth-tag": (Fault("bad-auth-tag"), ErrorCode.DEVICE_REFUSED,
                     "authentication tag does not match", 0),
}
CIPHERED = {"bad-auth-tag"}


# Faults of controls only (reads are served as by a good meter): tests/test_controls_driver.py.
CONTROL_FAULTS = {"refuse-controls", "lose-control-answers"}


def test_every_fault_kind_has_a_test():
    assert set(CASES) | CONTROL_FAULTS == set(FAULTS)


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'faults.sqlite'}")
    runner = StoreRunner(reactor, store)
    yield store, runner
    runner.stop()
    store.close()


def sleep(seconds):
    waiting = Deferred()
    reactor.callLater(seconds, waiting.callback, None)
    return waiting


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled(condition, within: float = 10.0) -> bool:
    """Wait until `condition()` holds (polled every 20 ms), at most `within` seconds; whether it
    held. Closing a socket on both ends takes a few reactor turns, more on a loaded machine."""
    deadline = reactor.seconds() + within
    while not condition():
        if reactor.seconds() >= deadline:
            return False
        await sleep(0.02)
    return True


async def quiet_descriptors() -> int:
    """The descriptor count once it holds still for 0.1 s."""
    count = -1
    while True:
        await sleep(0.1)
        now = open_descriptors()
        if now == count:
            return count
        count = now


def request(devices) -> GetMeterReadings:
    return GetMeterReadings(
        header=Header(verb="get", noun="MeterReadings"),
        end_devices=[DeviceRef(mrid=d.mrid) for d in devices], usage_points=[],
        reading_types=[REGISTER, PROFILE], start=END - timedelta(days=1), end=END)


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest_twisted.ensureDeferred
async def test_a_faulty_meter_is_one_error_naming_it_and_leaves_nothing_behind(kind, store):
    fault, code, words, may_take = CASES[kind]
    fleet = start_fleet(reactor, FAULTY, clock=lambda: NOW, base_index=241, port=0,
                        faults={241 + GOOD: fault},
                        security="hls-gmac" if kind in CIPHERED else "low")
    try:
        devices = [DeviceAddress(**entry) for entry in fleet.inventory()["meters"]]
        bad = devices[GOOD]
        store[0].load_inventory(devices)
        counters = StoredCounters(store[1], CounterStore(store[0]))
        service = MeterReadingService(reactor, store[1], limits=LIMITS,
                                      security=HeadEndSecurity(b"CIMHES01", counters))
        # A first read warms the store up (SQLite opens its WAL files on the first write).
        assert (await service.read(request(devices[:1]))).result is ReplyResult.OK
        assert await settled(lambda: fleet.open_connections() == 0)
        async def timed(devices_read):
            started = reactor.seconds()
            result = await service.read(request(devices_read))
            return result, reactor.seconds() - started

        # The good meters alone, timed in this run: what the machine's load makes of a read.
        good, good_alone = await timed(devices[:GOOD])
        assert good.result is ReplyResult.OK
        assert await settled(lambda: fleet.open_connections() == 0)
        descriptors = await quiet_descriptors()
        timers = set(reactor.getDelayedCalls())

        outcome, took = await timed(devices)

        assert outcome.result is ReplyResult.PARTIAL
        assert sorted(m.meter.mrid for m in outcome.meter_readings) == sorted(
            d.mrid for d in devices[:GOOD])
        for reading in outcome.meter_readings:
            assert len(reading.readings) == 1
            assert [len(block.readings) for block in reading.interval_blocks] == [96]
        [error] = outcome.errors
        assert error.id == bad.mrid and error.object_type == "EndDevice"
        assert error.code == code
        assert words in error.reason
        assert bad.mrid in error.reason and bad.name in error.reason
        assert f"{bad.host}:{bad.port}" in error.reason
        # The fault ends within its own timeout: beside the good meters' reads it adds no more
        # than that (a hang or a re-armed timer would add seconds), however loaded the machine.
        if took >= may_take + 2 * good_alone + 0.5:
            # A load spike on a shared machine, or a hang: time both reads once more. A hang
            # or a re-armed timer is there again; a spike is not.
            assert await settled(lambda: fleet.open_connections() == 0)
            good, good_alone = await timed(devices[:GOOD])
            assert await settled(lambda: fleet.open_connections() == 0)
            again, took = await timed(devices)
            assert [e.code for e in again.errors] == [code]
        assert took < may_take + 2 * good_alone + 0.5, (took, good_alone)

        # Nothing left behind, once the sockets' closing has run its course (bounded wait).
        await settled(lambda: fleet.open_connections() == 0
                      and open_descriptors() == descriptors
                      and set(reactor.getDelayedCalls()) <= timers)
        assert fleet.open_connections() == 0
        assert open_descriptors() == descriptors
        assert set(reactor.getDelayedCalls()) <= timers
    finally:
        await fleet.stop_all()


@pytest_twisted.ensureDeferred
async def test_an_answer_past_the_byte_cap_is_refused_even_from_a_good_meter(store):
    fleet = start_fleet(reactor, 1, clock=lambda: NOW, base_index=246, port=0)
    try:
        devices = [DeviceAddress(**entry) for entry in fleet.inventory()["meters"]]
        store[0].load_inventory(devices)
        service = MeterReadingService(reactor, store[1],
                                      limits=replace(LIMITS, max_answer_bytes=1500))
        outcome = await service.read(request(devices))
        [error] = outcome.errors
        assert error.code == ErrorCode.DEVICE_PROTOCOL_ERROR
        assert "AnswerTooLarge" in error.reason and "passed 1500 bytes" in error.reason
        await settled(lambda: fleet.open_connections() == 0)
        assert fleet.open_connections() == 0
    finally:
        await fleet.stop_all()
