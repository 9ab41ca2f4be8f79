"""Route session slots shared by engines (engine/route_leases.py) on a real PostgreSQL, and the
work queue's message helpers (cimhes.queue.job_queue)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from cimhes.cim.meter_readings import (
    DeviceRef,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    Reading,
)
from cimhes.drivers import MeterReadResult
from cimhes.drivers.errors import HistoryShortfall, Timeout, UnsupportedReadingType
from cimhes.engine.dispatch import JobOutcome
from cimhes.engine.jobs import JobState
from cimhes.engine.route_leases import RouteLeases
from cimhes.engine.store import Store
from cimhes.queue.job_queue import JobRef, decode_outcome, delay_for, encode_outcome

from .databases import postgres_or_skip

NOW = datetime(2026, 12, 3, 10, 0, tzinfo=timezone.utc)


def test_slots_of_a_route_are_bounded_over_engines_and_expire_with_a_dead_one(request):
    store = Store(postgres_or_skip(request).new_database(migrated=True))
    try:
        leases = RouteLeases(store, limit=3, ttl=60)
        assert leases.acquire("seg-1", "engine-a", 2, NOW) == 2
        assert leases.acquire("seg-1", "engine-b", 5, NOW) == 1  # only what is left
        assert leases.acquire("seg-1", "engine-b", 1, NOW) == 0
        assert leases.acquire("seg-2", "engine-b", 1, NOW) == 1  # another route, its own bound
        assert leases.acquire("dc-1", "engine-a", 4, NOW, limit=1) == 1  # a concentrator's bound
        assert leases.acquire("dc-1", "engine-b", 1, NOW, limit=1) == 0
        assert leases.held("seg-1", NOW) == {"engine-a": 2, "engine-b": 1}
        # engine-b renews and goes on; engine-a dies: its slots expire, and are taken again.
        later = NOW + timedelta(seconds=45)
        assert leases.renew("engine-b", later) == 2
        after = NOW + timedelta(seconds=61)
        assert leases.held("seg-1", after) == {"engine-b": 1}
        assert leases.acquire("seg-1", "engine-c", 3, after) == 2
        # Giving back: a count per route, only the engine's own.
        leases.release("engine-c", {"seg-1": 1})
        assert leases.held("seg-1", after) == {"engine-b": 1, "engine-c": 1}
        leases.release_all("engine-b")
        assert leases.held("seg-2", after) == {}
    finally:
        store.close()


def test_engines_racing_for_the_last_slots_never_exceed_the_bound(request):
    store = Store(postgres_or_skip(request).new_database(migrated=True))
    try:
        leases = RouteLeases(store, limit=5, ttl=60)
        with ThreadPoolExecutor(8) as pool:  # eight engines at once, each asking one at a time
            granted = list(pool.map(
                lambda i: sum(leases.acquire("seg-9", f"engine-{i % 8}", 1, NOW)
                              for _ in range(4)), range(8)))
        assert sum(granted) == 5
        assert sum(leases.held("seg-9", NOW).values()) == 5
    finally:
        store.close()


def test_a_wait_goes_to_the_longest_delay_queue_not_longer_than_it():
    assert delay_for(0.4) is None  # due now: straight back to the work queue
    assert delay_for(31) == 30
    assert delay_for(900 * 1.2) == 900
    assert delay_for(10 ** 6) == 1800  # the rest of the wait is held by the engine


def test_an_outcome_crosses_the_queue_with_its_values_and_error_classes():
    start = NOW - timedelta(days=1)
    reading = MeterReading(
        DeviceRef("m-1"),
        (Reading("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", Decimal("12.345"), NOW),),
        (IntervalBlock("0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", (
            IntervalReading(start + timedelta(minutes=15), Decimal("0.250")),)),),
        (start, NOW))
    errors = (UnsupportedReadingType("m-1", "no such object", "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0"),
              HistoryShortfall("m-1", "3 missing", "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", 3,
                               start).located("CIMHES000001", "127.0.0.1:4059"))
    job_id, outcome = decode_outcome(encode_outcome(JobOutcome(
        JobRef(7, "m-1"), JobState.DONE, MeterReadResult(reading, errors))))
    assert job_id == 7 and outcome.state is JobState.DONE and outcome.job.device.mrid == "m-1"
    assert outcome.result.meter_reading == reading
    assert outcome.result.errors == errors
    assert str(outcome.result.errors[1]) == str(errors[1])  # name and address too
    _, failed = decode_outcome(encode_outcome(JobOutcome(
        JobRef(8, "m-2"), JobState.FAILED, None, Timeout("m-2", "no answer in 20 s"))))
    assert failed.result is None and failed.error == Timeout("m-2", "no answer in 20 s")


def test_a_control_outcome_crosses_the_queue_too():
    from cimhes.drivers.controls import ControlKind, ControlOutcome, ControlStatus
    from cimhes.drivers.errors import ControlNotConfirmed

    sent = ControlOutcome("m-3", ControlKind.DISCONNECT, ControlStatus.FAILED, "not confirmed",
                          {"output_state": False}, ControlNotConfirmed("m-3", "state stayed on"))
    _, outcome = decode_outcome(encode_outcome(JobOutcome(JobRef(9, "m-3"), JobState.FAILED,
                                                          sent)))
    assert outcome.result == sent
