"""The job engine against real simulated meters over TCP and a real SQLite store: priorities and
fairness, the session limits, shared associations, retries with backoff, and re-reading."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from sqlalchemy import update
from twisted.internet import reactor, task

from cimhes.drivers import DeviceAddress
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.dispatch import Dispatcher, FairQueue
from cimhes.engine.jobs import Job, JobRecord, JobState, NewJob, Priority
from cimhes.engine.limits import ConnectionBounds, EngineSettings
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.transient import TransientFaults
from cimhes.fixtures.fleet import start_fleet

METER_CLOCK = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MINUS_A = "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MINUS_A_PROFILE = "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
DAY_END = datetime(2026, 11, 20, tzinfo=timezone.utc)
DAY = (DAY_END - timedelta(days=1), DAY_END)
FIRST_METER = 3001  # 127.0.12.208.. on ephemeral ports: clear of the other tests' meters


# -- pure parts ------------------------------------------------------------------------------

def _job(job_id: int, request: str, priority: int = Priority.SCHEDULED, device: str | None = None,
         route: str | None = None) -> Job:
    address = DeviceAddress(mrid=device or f"m{job_id}", name="n", device_type="idis-meter",
                            host="127.0.0.1")
    return Job(job_id, request, "read", priority, address, route, (PLUS_A,), None, None, 0, 1, 0,
               None)


def test_the_fair_queue_takes_one_job_per_request_in_turn_and_priorities_strictly():
    queue = FairQueue()
    for i in range(1, 6):
        queue.push(_job(i, "large"))
    queue.push(_job(10, "small"))
    queue.push(_job(20, "urgent", Priority.ON_DEMAND))

    order = [queue.take(lambda job: 0.0)[0].id for _ in range(4)]
    queue.push(_job(11, "later"))  # a request arriving now takes the next turn
    order += [queue.take(lambda job: 0.0)[0].id for _ in range(4)]

    assert order == [20, 10, 1, 2, 11, 3, 4, 5]
    assert len(queue) == 0


def test_the_fair_queue_skips_a_blocked_device_and_reports_the_soonest_wait():
    queue = FairQueue()
    queue.push(_job(1, "r", device="busy"))
    queue.push(_job(2, "r", device="gap"))
    waits = {"busy": None, "gap": 1.5}

    assert queue.take(lambda job: waits[job.device.mrid]) == (None, 1.5)
    waits["gap"] = 0.0
    job, _ = queue.take(lambda job: waits[job.device.mrid])
    assert job.id == 2


def test_connection_bounds_hold_sessions_routes_and_the_gap_per_device():
    clock = [100.0]
    bounds = ConnectionBounds(2, EngineSettings(max_sessions_per_route=1, min_device_gap=5.0),
                              lambda: clock[0])
    assert bounds.wait_for("a", "cell") == 0
    bounds.started("a", "cell")
    assert bounds.wait_for("b", "cell") is None        # the route is full
    assert bounds.wait_for("a", None) is None          # the device is in a session
    assert bounds.wait_for("c", None) == 0
    bounds.started("c", None)
    assert bounds.wait_for("d", None) is None          # two sessions: the global bound
    bounds.ended("a", "cell")
    assert bounds.wait_for("a", "cell") == pytest.approx(5.0)  # the device's gap
    assert bounds.wait_for("b", "cell") == 0
    clock[0] += 5.0
    assert bounds.wait_for("a", "cell") == 0


def test_backoff_doubles_up_to_the_maximum_with_jitter_on_top():
    settings = EngineSettings(retry_delay=10, retry_delay_max=50, retry_jitter=0.5)
    assert [settings.retry_wait(n, lambda: 0.0) for n in (1, 2, 3, 4)] == [10, 20, 40, 50]
    assert settings.retry_wait(1, lambda: 1.0) == 15


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="max_sessions_per_route"):
        EngineSettings(max_sessions_per_route=0)


# -- against meters --------------------------------------------------------------------------

@pytest.fixture
def engine(database_url):
    """(start fleet, make dispatcher, store, runner) on SQLite and on PostgreSQL: every fleet
    and dispatcher made is stopped after."""
    store = Store(database_url)
    runner = StoreRunner(reactor, store)
    made: list = []

    def fleet(count, **options):
        options.setdefault("response_delay", 0.01)
        running = start_fleet(reactor, count, clock=lambda: METER_CLOCK, base_index=FIRST_METER,
                              port=0, **options)
        made.append(running)
        devices = [DeviceAddress(**entry) for entry in running.inventory()["meters"]]
        store.load_inventory(devices)
        return running, devices

    def dispatcher(max_sessions=200, **settings):
        settings.setdefault("min_device_gap", 0)
        made_dispatcher = Dispatcher(reactor, runner, EngineSettings(**settings),
                                     max_sessions=max_sessions,
                                     session_limits=SessionLimits.of(3.0), jitter=lambda: 0.0)
        made_dispatcher.start()
        made.append(made_dispatcher)
        return made_dispatcher

    yield fleet, dispatcher, store, runner
    for thing in reversed(made):
        if isinstance(thing, Dispatcher):
            thing.stop()
        else:
            pytest_twisted.blockon(thing.stop_all())
    runner.stop()
    store.close()


def _submit(dispatcher, runner, key, jobs, *, priority=Priority.SCHEDULED, attempts=1,
            deadline=None):
    now = datetime.now(timezone.utc)
    created = runner.call(dispatcher.jobs.create_request, key, "schedule", jobs,
                          priority=priority, max_attempts=attempts, now=now, deadline=deadline)

    def wait(result):
        ids, _ = result
        waiting = [dispatcher.wait(i) for i in ids]
        dispatcher.wake()
        return waiting
    return created.addCallback(wait)


@pytest_twisted.inlineCallbacks
def test_on_demand_work_overtakes_queued_collection_and_a_small_request_a_large_one(engine):
    fleet, make_dispatcher, _, runner = engine
    _, devices = fleet(40)
    dispatcher = make_dispatcher(max_sessions=1)
    finished: list[str] = []

    def note(outcome):
        finished.append(outcome.job.request_key)
        return outcome
    # Sessions started when the small request's job entered the dispatcher's queue (observed,
    # not changed: the queue's own push runs as ever).
    queued_at: dict[str, int] = {}
    push = dispatcher._queue.push  # noqa: SLF001

    def observed_push(job):
        queued_at.setdefault(job.request_key, dispatcher.sessions_started)
        push(job)
    dispatcher._queue.push = observed_push  # noqa: SLF001

    collection = yield _submit(dispatcher, runner, "nightly",
                               [NewJob(d.mrid, (PLUS_A,)) for d in devices[:20]])
    for waiter in collection:
        waiter.addCallback(note)
    # The collection is under way (its first job done), however loaded the machine.
    yield _until(lambda: finished)
    large = yield _submit(dispatcher, runner, "large",
                          [NewJob(d.mrid, (PLUS_A,)) for d in devices[20:36]],
                          priority=Priority.ON_DEMAND)
    small = yield _submit(dispatcher, runner, "small", [NewJob(devices[38].mrid, (PLUS_A,))],
                          priority=Priority.ON_DEMAND)
    for waiter in large + small:
        waiter.addCallback(note)
    outcomes = yield _all(collection + large + small)

    assert all(o.state is JobState.DONE for o in outcomes)
    first = min(i for i, k in enumerate(finished) if k != "nightly")
    last = max(i for i, k in enumerate(finished) if k != "nightly")
    # Once on-demand work arrived, no collection job ran until all of it was done ...
    assert set(finished[first:last + 1]) == {"large", "small"}
    assert finished[last + 1:] == ["nightly"] * (len(finished) - last - 1)
    assert len(finished) - last - 1 >= 10
    # ... and the small request took its turn beside the large one, not behind its 16 jobs: one
    # session at a time, so its job was the very next session after the ones started before it
    # was queued, however long its claim took (a batch of outcomes is settled round-robin between
    # requests, which may report it earlier, never later).
    assert queued_at["large"] <= queued_at["small"] < queued_at["large"] + 16
    assert finished.index("small") <= queued_at["small"]
    assert "large" in finished[finished.index("small") + 1:]


def _until(condition, within: float = 30.0):
    """Deferred firing once `condition()` holds (polled every 10 ms); fails past `within` s."""
    from twisted.internet.defer import ensureDeferred

    async def wait():
        deadline = reactor.seconds() + within
        while not condition():
            assert reactor.seconds() < deadline, "the condition did not come within the bound"
            await task.deferLater(reactor, 0.01, lambda: None)
    return ensureDeferred(wait())


def _all(waiters):
    from twisted.internet.defer import gatherResults
    return gatherResults(waiters)


@pytest_twisted.inlineCallbacks
def test_no_route_holds_more_sessions_than_its_bound(engine):
    fleet, make_dispatcher, _, runner = engine
    running, devices = fleet(8, response_delay=0.03)
    dispatcher = make_dispatcher(max_sessions=10, max_sessions_per_route=2)
    most = [0]

    def sample():
        most[0] = max(most[0], running.open_associations())
    sampler = task.LoopingCall(sample)
    sampler.start(0.002)
    try:
        waiters = yield _submit(dispatcher, runner, "cell", [
            NewJob(d.mrid, (PLUS_A,), route="cell-7") for d in devices])
        outcomes = yield _all(waiters)
    finally:
        sampler.stop()
    assert [o.state for o in outcomes] == [JobState.DONE] * 8
    assert most[0] == 2


@pytest_twisted.inlineCallbacks
def test_requests_for_one_meter_over_one_window_share_one_association(engine):
    fleet, make_dispatcher, _, runner = engine
    running, devices = fleet(1)
    meter = devices[0].mrid
    dispatcher = make_dispatcher()
    dispatcher.stop()  # queue them all first, so they meet in one round
    billing = yield _submit(dispatcher, runner, "billing", [NewJob(meter, (PLUS_A,))])
    export = yield _submit(dispatcher, runner, "export", [NewJob(meter, (MINUS_A,))],
                           priority=Priority.ON_DEMAND)
    plus = yield _submit(dispatcher, runner, "plus", [NewJob(meter, (PLUS_A_PROFILE,), *DAY)])
    minus = yield _submit(dispatcher, runner, "minus", [NewJob(meter, (MINUS_A_PROFILE,), *DAY)])
    yield dispatcher.start(requeue=False)
    billing, export, plus, minus = yield _all(billing + export + plus + minus)

    # Two associations: the registers at the meter's clock, and the day's profile.
    assert running.transient(FIRST_METER).accepted == 2
    assert [r.reading_type for r in billing.result.meter_reading.readings] == [PLUS_A]
    assert [r.reading_type for r in export.result.meter_reading.readings] == [MINUS_A]
    for outcome, reading_type in ((plus, PLUS_A_PROFILE), (minus, MINUS_A_PROFILE)):
        (block,) = outcome.result.meter_reading.interval_blocks
        assert block.reading_type == reading_type and len(block.readings) == 96
        assert not outcome.result.meter_reading.readings


@pytest_twisted.inlineCallbacks
def test_a_meter_out_of_reach_is_retried_with_backoff_and_then_failed_with_its_error(engine):
    fleet, make_dispatcher, store, runner = engine
    running, devices = fleet(2, transient=lambda k: TransientFaults(
        drop_connections=1 if k == FIRST_METER else 99))
    dispatcher = make_dispatcher(max_attempts=3, retry_delay=0.2, retry_delay_max=0.3)
    started = reactor.seconds()
    waiters = yield _submit(dispatcher, runner, "retry", [NewJob(d.mrid, (PLUS_A,))
                                                        for d in devices], attempts=3)
    recovered, lost = yield _all(waiters)
    took = reactor.seconds() - started

    assert recovered.state is JobState.DONE and recovered.result.meter_reading.readings
    assert lost.state is JobState.FAILED
    reports = {r.device_mrid: r for r in dispatcher.jobs.reports("retry")}
    assert reports[devices[0].mrid].attempts == 2
    assert reports[devices[1].mrid].attempts == 3
    assert devices[1].mrid in reports[devices[1].mrid].last_error
    assert running.transient(FIRST_METER + 1).accepted == 3
    assert took >= 0.2 + 0.3  # waited the backoff (0.2, then 0.4 capped at 0.3) between tries


@pytest_twisted.inlineCallbacks
def test_missing_intervals_are_re_read_exactly_until_complete(engine):
    fleet, make_dispatcher, store, runner = engine
    running, devices = fleet(2, transient=lambda k: TransientFaults(
        profile_gap_reads=1 if k == FIRST_METER else 99, gap_hours=(3, 4)))
    dispatcher = make_dispatcher(reread_delay=0.1)
    # A deadline no loaded machine reaches first: the run ends when the test says its deadline
    # has come, once the meter that keeps its gap has been re-read (a bounded wait, no sleep).
    deadline = datetime.now(timezone.utc) + timedelta(seconds=120)
    waiters = yield _submit(dispatcher, runner, "nightly", [
        NewJob(d.mrid, (PLUS_A_PROFILE, MINUS_A_PROFILE), *DAY) for d in devices],
        deadline=deadline)
    rows = {}

    def re_read_once():
        rows.update({r.device_mrid: r for r in dispatcher.jobs.reports("nightly")})
        return rows[devices[1].mrid].rereads >= 1
    yield _until(re_read_once)
    with store.engine.begin() as connection:  # the run's deadline comes now
        connection.execute(update(JobRecord).where(JobRecord.device_mrid == devices[1].mrid)
                           .values(deadline=datetime.now(timezone.utc)))
    complete, gappy = yield _all(waiters)

    assert complete.state is gappy.state is JobState.DONE
    assert complete.missing == {}
    for reading_type in (PLUS_A_PROFILE, MINUS_A_PROFILE):
        assert len(store.stored_values(devices[0].mrid, reading_type)) == 96
        assert len(store.stored_values(devices[1].mrid, reading_type)) == 88
    # The re-read asked for the gap only: its share holds just 03:00-05:00's eight intervals.
    (block, _) = complete.result.meter_reading.interval_blocks
    assert [r.timestamp.strftime("%H:%M") for r in block.readings] == [
        "03:15", "03:30", "03:45", "04:00", "04:15", "04:30", "04:45", "05:00"]
    gap = (DAY[0] + timedelta(hours=3), DAY[0] + timedelta(hours=5))
    assert gappy.missing == {PLUS_A_PROFILE: [gap], MINUS_A_PROFILE: [gap]}
    reports = {r.device_mrid: r for r in dispatcher.jobs.reports("nightly")}
    assert reports[devices[0].mrid].rereads == 1 and not reports[devices[0].mrid].missing
    assert reports[devices[1].mrid].rereads >= 1
    assert reports[devices[1].mrid].missing == gappy.missing
    progress = dispatcher.jobs.progress("nightly")
    assert (progress.counts, progress.incomplete) == ({"done": 2}, 1)


@pytest_twisted.inlineCallbacks
def test_a_collection_reads_only_what_the_meters_did_not_push(engine):
    from decimal import Decimal

    from cimhes.cim.meter_readings import DeviceRef, IntervalBlock, IntervalReading, MeterReading
    from cimhes.engine.schedule import ScheduleConfig, Scheduler

    fleet, make_dispatcher, store, runner = engine
    running, devices = fleet(3)
    whole, gappy, silent = devices
    times = [DAY[0] + timedelta(minutes=15 * (i + 1)) for i in range(96)]
    gap = (DAY[0] + timedelta(hours=3), DAY[0] + timedelta(hours=5))
    pushed = {whole.mrid: times, gappy.mrid: [t for t in times if not gap[0] < t <= gap[1]]}
    store.save_meter_readings([MeterReading(DeviceRef(mrid), (), tuple(
        IntervalBlock(t, tuple(IntervalReading(at, Decimal(7)) for at in kept))
        for t in (PLUS_A_PROFILE, MINUS_A_PROFILE))) for mrid, kept in pushed.items()],
        METER_CLOCK, source="push")
    dispatcher = make_dispatcher()
    config = ScheduleConfig.from_dict({"schedules": [
        {"name": "nightly", "cron": "30 0 * * *", "group": "all", "window": "previous-day",
         "reading_types": [PLUS_A_PROFILE, MINUS_A_PROFILE], "deadline_hours": 6}]})
    scheduler = Scheduler(reactor, runner, dispatcher, config, now=lambda: METER_CLOCK)
    schedule = config.schedule("nightly")
    accepted = running.accepted()
    key, _ids, _ = yield scheduler.create_run(schedule, schedule.latest_fire(METER_CLOCK))

    def finished():
        return dispatcher.jobs.progress(key).counts == {"done": 3}
    yield _until(finished)
    reports = {r.device_mrid: r for r in dispatcher.jobs.reports(key)}
    # The meter that pushed its whole day was not called at all; the other two were, once.
    assert reports[whole.mrid].attempts == 0
    assert reports[gappy.mrid].attempts == reports[silent.mrid].attempts == 1
    assert running.accepted() - accepted == 2
    for reading_type in (PLUS_A_PROFILE, MINUS_A_PROFILE):
        stored = dict(store.stored_values(gappy.mrid, reading_type))
        assert len(stored) == 96
        # Outside the gap the pushed values stand: only 03:00-05:00 was read from the meter.
        assert {at for at, value in stored.items() if value == Decimal(7)} == set(
            pushed[gappy.mrid])
        assert len(store.stored_values(silent.mrid, reading_type)) == 96
        assert {v for _, v in store.stored_values(whole.mrid, reading_type)} == {Decimal(7)}


@pytest_twisted.inlineCallbacks
def test_a_claim_answered_after_the_stop_gives_its_jobs_back(engine):
    fleet, make_dispatcher, store, runner = engine
    _, devices = fleet(3)
    dispatcher = make_dispatcher()
    dispatcher.stop()  # not claiming on its own any more (its poll and timers are off)
    dispatcher._stopped = False  # noqa: SLF001  (as if the stop came while a claim was out)
    now = datetime.now(timezone.utc)
    ids, _ = yield runner.call(dispatcher.jobs.create_request, "late", "schedule",
                               [NewJob(d.mrid, (PLUS_A,)) for d in devices],
                               priority=Priority.SCHEDULED, max_attempts=1, now=now)
    dispatcher.wake()  # the claim goes to the store's queue ...
    dispatcher.stop()  # ... and the dispatcher stops before its answer comes

    def states():
        from sqlalchemy import select
        with store._session.begin() as session:  # noqa: SLF001
            return [(state, by, started is not None) for state, by, started in session.execute(
                select(JobRecord.state, JobRecord.claimed_by, JobRecord.started_at)
                .where(JobRecord.id.in_(ids))).all()]
    # Claimed (started_at set by the claim), then queued again with nobody holding them.
    queued = [(JobState.QUEUED.value, None, True)] * len(ids)
    for _ in range(300):
        found = yield runner.call(states)
        if sorted(found) == queued:
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    assert sorted(found) == queued  # not left running for an engine that has stopped
    assert dispatcher.sessions_started == 0
