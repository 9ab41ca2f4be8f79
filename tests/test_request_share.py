"""The per-request share of the session bound: while another request has a job that may start,
no request starts sessions beyond its share; a lone request uses every session. The queue's rule
on its own, then a dispatcher against real simulated meters over TCP and a real SQLite store."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from cimhes.drivers import DeviceAddress
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.dispatch import Dispatcher, FairQueue
from cimhes.engine.jobs import Job, JobState, NewJob, Priority
from cimhes.engine.limits import EngineSettings
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import start_fleet

METER_CLOCK = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
FIRST_METER = 5081  # 127.0.21.1 ...: this test file's loopback range


def _job(job_id: int, request: str, priority: int = Priority.ON_DEMAND,
         device: str | None = None) -> Job:
    address = DeviceAddress(mrid=device or f"m{job_id}", name="n", device_type="idis-meter",
                            host="127.0.0.1")
    return Job(job_id, request, "read", priority, address, None, (PLUS_A,), None, None, 0, 1, 0,
               None)


# -- the queue's rule ------------------------------------------------------------------------

def test_a_request_holding_its_share_is_passed_over_while_another_may_start():
    queue = FairQueue()
    for i in range(1, 5):
        queue.push(_job(i, "large"))
    holding = {"large"}
    queue.push(_job(10, "small"))
    queue.push(_job(11, "small"))

    def take():
        return queue.take(lambda job: 0.0, lambda key: key in holding)[0].id

    # The small request's turn passes after its first job, but the large one holds its share.
    assert [take(), take()] == [10, 11]
    # No other request left: the large one gets every session.
    assert [take(), take()] == [1, 2]


def test_a_request_over_its_share_still_starts_when_no_other_job_may():
    queue = FairQueue()
    queue.push(_job(1, "large"))
    queue.push(_job(10, "small", device="busy"))
    job, _ = queue.take(lambda job: None if job.device.mrid == "busy" else 0.0,
                        lambda key: key == "large")
    assert job.id == 1  # the small request's meter is in a session: nobody is kept waiting


def test_the_share_does_not_bend_priorities():
    queue = FairQueue()
    queue.push(_job(1, "urgent-large", Priority.ON_DEMAND))
    queue.push(_job(10, "nightly", Priority.SCHEDULED))
    job, _ = queue.take(lambda job: 0.0, lambda key: key == "urgent-large")
    assert job.id == 1


def test_the_share_is_a_part_of_the_session_bound_of_at_least_one():
    assert EngineSettings().request_session_share == 0.5
    assert EngineSettings().session_share(200) == 100
    assert EngineSettings(request_session_share=0.25).session_share(10) == 2
    assert EngineSettings(request_session_share=0.01).session_share(10) == 1
    assert EngineSettings(request_session_share=1).session_share(10) == 10
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="request_session_share"):
            EngineSettings(request_session_share=bad)


# -- against meters --------------------------------------------------------------------------

@pytest.fixture
def engine(tmp_path):
    """(make dispatcher, the large request's 12 meters, the small one's 4, runner): the large
    request's meters answer slowly (50 ms), the small one's fast (5 ms)."""
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    runner = StoreRunner(reactor, store)
    fleets = [start_fleet(reactor, count, clock=lambda: METER_CLOCK, base_index=first, port=0,
                          response_delay=delay)
              for count, first, delay in ((12, FIRST_METER, 0.05), (4, FIRST_METER + 12, 0.005))]
    slow, fast = ([DeviceAddress(**entry) for entry in fleet.inventory()["meters"]]
                  for fleet in fleets)
    store.load_inventory(slow + fast)
    made: list[Dispatcher] = []

    def dispatcher(share: float) -> Dispatcher:
        made.append(Dispatcher(
            reactor, runner, EngineSettings(min_device_gap=0, request_session_share=share),
            max_sessions=4, session_limits=SessionLimits.of(3.0), jitter=lambda: 0.0))
        return made[-1]

    yield dispatcher, slow, fast, runner
    for made_dispatcher in made:
        made_dispatcher.stop()
    for fleet in fleets:
        pytest_twisted.blockon(fleet.stop_all())
    runner.stop()
    store.close()


def _submit(dispatcher, runner, key, devices):
    created = runner.call(dispatcher.jobs.create_request, key, "on-demand",
                          [NewJob(d.mrid, (PLUS_A,)) for d in devices],
                          priority=Priority.ON_DEMAND, max_attempts=1,
                          now=datetime.now(timezone.utc))
    return created.addCallback(lambda result: [dispatcher.wait(i) for i in result[0]])


class Starts:
    """Each session start as the dispatcher made it: (request, that request's open sessions)."""

    def __init__(self, dispatcher: Dispatcher):
        self.seen: list[tuple[str, int]] = []
        dispatcher.on_session_started = lambda job: self.seen.append(
            (job.request_key, dispatcher.sessions_of(job.request_key)))

    def keys(self) -> list[str]:
        return [key for key, _ in self.seen]


@pytest_twisted.inlineCallbacks
def test_a_large_request_holds_at_most_its_share_while_a_second_waits(engine):
    make_dispatcher, slow, fast, runner = engine
    dispatcher = make_dispatcher(share=0.5)  # 2 of 4 sessions
    starts = Starts(dispatcher)
    large = yield _submit(dispatcher, runner, "large", slow)
    small = yield _submit(dispatcher, runner, "small", fast)
    yield dispatcher.start(requeue=False)  # both requests are queued when dispatching begins
    outcomes = yield gatherResults(large + small)

    assert [o.state for o in outcomes] == [JobState.DONE] * 16
    keys = starts.keys()
    last_small = max(i for i, key in enumerate(keys) if key == "small")
    # While the small request had a job waiting, the large one never held more than 2 ...
    assert max(n for key, n in starts.seen[:last_small + 1] if key == "large") <= 2
    # ... so the sessions the small request's quick reads freed went to it: its four started
    # before the large request's third.
    assert keys[:last_small + 1].count("large") == 2
    # Alone afterwards, the large request used every session.
    assert max(n for key, n in starts.seen if key == "large") == 4


@pytest_twisted.inlineCallbacks
def test_with_the_whole_bound_as_share_the_turns_alternate_instead(engine):
    make_dispatcher, slow, fast, runner = engine
    dispatcher = make_dispatcher(share=1.0)  # the rule off: round-robin alone
    starts = Starts(dispatcher)
    large = yield _submit(dispatcher, runner, "large", slow)
    small = yield _submit(dispatcher, runner, "small", fast)
    yield dispatcher.start(requeue=False)
    yield gatherResults(large + small)

    keys = starts.keys()
    last_small = max(i for i, key in enumerate(keys) if key == "small")
    assert keys[:last_small + 1].count("large") >= 3  # the large request took its turns
    assert max(n for key, n in starts.seen[:last_small + 1] if key == "large") >= 3


@pytest_twisted.inlineCallbacks
def test_a_request_arriving_while_a_large_one_holds_every_session_gets_each_freed_one(engine):
    make_dispatcher, slow, fast, runner = engine
    dispatcher = make_dispatcher(share=0.5)
    starts = Starts(dispatcher)
    yield dispatcher.start(requeue=False)
    large = yield _submit(dispatcher, runner, "large", slow)
    dispatcher.wake()
    while dispatcher.sessions_of("large") < 4:  # the lone request takes all four sessions
        yield _tick()
    small = yield _submit(dispatcher, runner, "small", fast[:3])
    dispatcher.wake()
    outcomes = yield gatherResults(large + small)

    assert [o.state for o in outcomes] == [JobState.DONE] * 15
    keys = starts.keys()
    first_small, last_small = keys.index("small"), len(keys) - keys[::-1].index("small") - 1
    # Running sessions are not cut short: the large request held all four when the small one
    # arrived, and the first session freed went to the small one ...
    assert keys[:first_small + 1] == ["large"] * 4 + ["small"]
    # ... and until all three of its jobs had started, the large request started sessions only
    # below its share of 2.
    assert all(n <= 2 for key, n in starts.seen[first_small:last_small] if key == "large")


def _tick():
    from twisted.internet import task
    return task.deferLater(reactor, 0.005, lambda: None)


# -- the readings' writes ----------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_a_small_requests_readings_are_written_in_a_batch_of_their_own_beside_a_backlog(tmp_path):
    from decimal import Decimal

    from cimhes.cim.meter_readings import DeviceRef, MeterReading, Reading
    from cimhes.engine.store import ReadingWriter

    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    runner = StoreRunner(reactor, store)
    meters = [DeviceAddress(mrid=f"meter-{i}", name=f"m{i}", device_type="idis-meter",
                            host="127.0.21.1") for i in range(12)]
    store.load_inventory(meters)
    writer = ReadingWriter(runner, lambda: METER_CLOCK)
    writer.MAX_BATCH_VALUES = 2  # two meters' one value each per batch

    def reading(meter):
        return MeterReading(DeviceRef(mrid=meter.mrid),
                            (Reading(PLUS_A, Decimal("1.5"), METER_CLOCK),))
    order: list[str] = []
    try:
        # The first large reading starts a write; nine more queue behind it, then the small one.
        saved = [writer.save(reading(m), "large").addCallback(
            lambda _, mrid=m.mrid: order.append(mrid)) for m in meters[:10]]
        saved.append(writer.save(reading(meters[11]), "small").addCallback(
            lambda _: order.append("small")))
        yield gatherResults(saved)
    finally:
        runner.stop()
    # Round-robin alone would have put it beside the large request's second meter, a batch
    # that ends with both; it went alone, right after the batch that was being written.
    assert order[:2] == ["meter-0", "small"]
    assert sorted(order) == sorted([m.mrid for m in meters[:10]] + ["small"])
    assert len(store.stored_values("meter-11", PLUS_A)) == 1
    store.close()


# -- the jobs' outcomes ------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_a_small_requests_outcome_is_settled_on_its_own_ahead_of_a_large_batch(tmp_path):
    import threading

    from cimhes.engine.dispatch import RunResult

    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    runner = StoreRunner(reactor, store)
    meters = [DeviceAddress(mrid=f"meter-{i}", name=f"m{i}", device_type="idis-meter",
                            host="127.0.21.1") for i in range(11)]
    store.load_inventory(meters)
    dispatcher = Dispatcher(reactor, runner, EngineSettings(), max_sessions=20,
                            now=lambda: METER_CLOCK)
    order: list[str] = []
    gate = threading.Event()
    try:
        for key, some in (("large", meters[:10]), ("small", meters[10:])):
            dispatcher.jobs.create_request(key, "on-demand", [NewJob(m.mrid, (PLUS_A,))
                                                              for m in some],
                                           priority=Priority.ON_DEMAND, max_attempts=1,
                                           now=METER_CLOCK)
        claimed, _ = dispatcher.jobs.claim(dispatcher.engine_id, 20, METER_CLOCK)
        large = [job for job in claimed if job.request_key == "large"]
        small = [job for job in claimed if job.request_key == "small"]
        waiters = [dispatcher.wait(job.id).addCallback(
            lambda outcome: order.append(outcome.job.request_key)) for job in claimed]
        # The store's thread is busy, as under a large request's writes: the large request's
        # sessions end and their batch is queued; then the small request's session ends.
        busy = runner.call(gate.wait, 30)
        dispatcher._in_session = len(claimed)
        dispatcher._queue_settle([(job, RunResult(JobState.DONE), None) for job in large])
        dispatcher._queue_settle([(job, RunResult(JobState.DONE), None) for job in small])
        gate.set()
        yield busy
        yield gatherResults(waiters)
    finally:
        dispatcher.stop()
        runner.stop()
    # Without its own transaction it would have waited for the large batch written before it.
    assert order == ["small"] + ["large"] * 10
    states = dispatcher.jobs.states([job.id for job in claimed])
    assert {state for state, _, _ in states.values()} == {JobState.DONE.value}
    store.close()
