"""The invocation-counter book reserves ranges: a process takes the counters of several sessions
from the store at once and hands them out from memory; every counter handed out stays below the
store's mark, across processes sharing a store and across restarts."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from cimhes.engine.security import CounterStore, StoredCounters
from cimhes.engine.store import Store, StoreRunner


@pytest.fixture
def store(database_url):
    """On SQLite and on PostgreSQL (the statements differ in how they lock)."""
    store = Store(database_url)
    runner = StoreRunner(reactor, store)
    yield store, runner
    runner.stop()
    store.close()


def _disjoint(reservations) -> bool:
    ranges = sorted((r.first, r.limit) for r in reservations)
    return all(r.first < r.limit for r in reservations) and all(
        a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


@pytest_twisted.inlineCallbacks
def test_sessions_take_counters_from_a_range_and_the_mark_stays_above_them(store):
    counters = StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=4)
    first = yield counters.start("m0", 100, 10)
    assert (first.first, first.limit) == (100, 110)
    assert counters.store.counters("m0") == (140, -1)  # 4 sessions' worth taken from the store
    later = []
    for _ in range(3):
        later.append((yield counters.reserve("m0", 10)))
    assert [(r.first, r.limit) for r in later] == [(110, 120), (120, 130), (130, 140)]
    assert counters.store.counters("m0") == (140, -1)  # handed from memory: no store move
    fifth = yield counters.reserve("m0", 10)
    assert (fifth.first, fifth.limit) == (140, 150)
    assert counters.store.counters("m0") == (180, -1)


@pytest_twisted.inlineCallbacks
def test_a_restart_skips_what_the_last_process_held(store):
    counters = StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=8)
    yield counters.start("m0", 1, 10)
    used = yield counters.reserve("m0", 10)  # from memory; the rest of the range is lost below
    restarted = StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=8)
    after = yield restarted.reserve("m0", 10)
    assert after.first >= 81 > used.limit


@pytest_twisted.inlineCallbacks
def test_two_processes_on_one_store_never_share_a_counter(store):
    one = StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=3)
    two = StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=5)
    yield one.start("m1", 1, 7)
    reservations = yield gatherResults(
        [book.reserve("m1", 7) for _ in range(12) for book in (one, two)])
    assert None not in reservations
    assert _disjoint(reservations)
    assert max(r.limit for r in reservations) <= one.store.counters("m1")[0]


@pytest_twisted.inlineCallbacks
def test_a_session_from_a_held_range_still_gets_the_last_counter_another_process_saw(store):
    one = StoredCounters(store[1], CounterStore(store[0]))
    other = StoredCounters(store[1], CounterStore(store[0]))
    yield one.start("m2", 1, 10)
    yield other.seen("m2", 555)  # another engine's session with the meter
    reservation = yield one.reserve("m2", 10)
    assert reservation.first == 11  # from memory
    assert reservation.last_server_counter == 555
    yield one.seen("m2", 400)  # never moves the recorded one down
    assert one.store.counters("m2")[1] == 555


@pytest_twisted.inlineCallbacks
def test_many_devices_reserved_in_one_batch_get_their_own_ranges(store):
    counters = StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=2)
    for device in ("m0", "m1"):
        yield counters.start(device, 1000, 5)
    # Both devices' and unknown devices' calls queued at once: one transaction answers them.
    answers = yield gatherResults([counters.reserve(device, 5)
                                   for device in ("m0", "m1", "nobody", "m0", "m1", "m0")])
    assert answers[2] is None  # no row: the driver reads that meter's counter first
    for device, picks in (("m0", (0, 3, 5)), ("m1", (1, 4))):
        mine = [answers[k] for k in picks]
        assert _disjoint(mine) and min(r.first for r in mine) == 1005
        assert max(r.limit for r in mine) <= counters.store.counters(device)[0]


def test_at_least_one_session_per_reservation(store):
    with pytest.raises(ValueError, match="at least 1"):
        StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=0)


@pytest_twisted.inlineCallbacks
def test_starts_queued_together_are_each_above_the_mark_and_their_first(store):
    counters = StoredCounters(store[1], CounterStore(store[0]), sessions_per_reservation=1)
    yield counters.start("m0", 500, 10)  # m0's mark is 510
    # Queued at once (one transaction): a new device twice, m0 below and above its mark.
    answers = yield gatherResults([
        counters.start("m1", 100, 10), counters.start("m0", 50, 10),
        counters.start("m1", 300, 10), counters.start("m0", 900, 10)])
    assert [(r.first, r.limit) for r in answers] == [(100, 110), (510, 520), (300, 310),
                                                      (900, 910)]
    assert counters.store.counters("m0") == (910, -1)
    assert counters.store.counters("m1") == (310, -1)
