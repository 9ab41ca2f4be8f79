"""Event-log fetches as the engine's jobs (engine/event_fetches.py), against simulated meters over
TCP and a real store: job rows and their states, the session and per-route bounds, one
association for fetches of one meter over one period, on-demand before scheduled, retries with
backoff then failure with the error kept, a fetch left running by a dead process resumed, and an
hourly "events" schedule."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from sqlalchemy import select
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults

from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_events import EVENT_LOGS
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.event_fetches import JOB_KIND, EventFetch, EventFetchService
from cimhes.engine.events import EventStore
from cimhes.engine.inventory import Inventory
from cimhes.engine.jobs import JobRecord, JobRequestRecord, JobState, Priority
from cimhes.engine.limits import EngineSettings
from cimhes.engine.schedule import ScheduleConfig, Scheduler
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import start_fleet
from cimhes.fixtures.transient import TransientFaults

UTC = timezone.utc
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=UTC)
START = NOW - timedelta(days=3)
FIRST_METER = 5843  # 127.0.24.1 ..: this file's own loopback range
STANDARD = EVENT_LOGS["standard"].obis
FRAUD = EVENT_LOGS["fraud"].obis
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


@pytest.fixture
def engine(database_url):
    """(start fleet, make dispatcher + fetch service, store, runner, event store)."""
    store = Store(database_url)
    runner = StoreRunner(reactor, store)
    events = EventStore(store)
    made: list = []

    def fleet(count, route=None, **options):
        options.setdefault("response_delay", 0.01)
        running = start_fleet(reactor, count, clock=lambda: NOW, base_index=FIRST_METER,
                              port=0, **options)
        made.append(running)
        meters = running.inventory()["meters"]
        devices = [DeviceAddress(**entry) for entry in meters]
        store.load_inventory(Inventory.from_json({"meters": [
            {**entry, "route": route} if route else entry for entry in meters]}))
        return running, devices

    def service(max_sessions=200, start=True, **settings):
        settings.setdefault("min_device_gap", 0)
        dispatcher = Dispatcher(reactor, runner, EngineSettings(**settings),
                                max_sessions=max_sessions, session_limits=SessionLimits.of(3.0),
                                jitter=lambda: 0.0)
        fetches = EventFetchService(reactor, runner, dispatcher, events, now=lambda: NOW)
        made.append(dispatcher)
        if start:
            dispatcher.start()
        return fetches

    yield fleet, service, store, runner, events
    for thing in reversed(made):
        if isinstance(thing, Dispatcher):
            thing.stop()
        else:
            pytest_twisted.blockon(thing.stop_all())
    runner.stop()
    store.close()


def _jobs(store, key=None) -> list[JobRecord]:
    with store._session() as session:  # noqa: SLF001 (the test reads the job table as it is)
        query = select(JobRecord).order_by(JobRecord.id)
        if key is not None:
            query = query.join(JobRequestRecord).where(JobRequestRecord.key == key)
        return list(session.scalars(query))


def _waiting(fetches, ids):
    waiting = [fetches.dispatcher.wait(i) for i in ids]
    fetches.dispatcher.wake()
    return gatherResults(waiting)


@pytest_twisted.inlineCallbacks
def test_a_fetch_is_one_job_per_meter_stored_once_and_done(engine):
    fleet, service, store, runner, events = engine
    running, devices = fleet(3)
    running.state(FIRST_METER).record(STANDARD, NOW - timedelta(hours=2), 1)
    fetches = service()

    outcome = yield fetches.read(devices, START, NOW)
    assert outcome.errors == [] and outcome.events > 0
    jobs = _jobs(store)
    assert [(j.kind, j.state, j.priority, j.attempts) for j in jobs] == [
        (JOB_KIND, "done", Priority.ON_DEMAND, 1)] * 3
    assert sorted(j.device_mrid for j in jobs) == sorted(d.mrid for d in devices)
    assert all((j.window_start, j.window_end) == (START, NOW) for j in jobs)
    stored = sum(len(events.events(d.mrid, START, NOW)) for d in devices)
    assert stored == outcome.events
    assert any(e.created == NOW - timedelta(hours=2) and e.device_code == f"{STANDARD}:1"
               for e, _ in events.events(devices[0].mrid))

    again = yield fetches.read(devices, START, NOW)  # a second request: new jobs, no new rows
    assert again.events == outcome.events and len(_jobs(store)) == 6
    assert sum(len(events.events(d.mrid, START, NOW)) for d in devices) == stored


@pytest.mark.parametrize("bound", ["sessions", "route"])
@pytest_twisted.inlineCallbacks
def test_no_more_sessions_than_the_bound_are_open(engine, bound):
    fleet, service, store, runner, _ = engine
    running, devices = fleet(6, route="cell-7" if bound == "route" else None,
                             response_delay=0.03)
    if bound == "sessions":
        fetches = service(max_sessions=2)
    else:
        fetches = service(max_sessions=10, max_sessions_per_route=2)
    most = [0]

    def sample():
        most[0] = max(most[0], running.open_associations())
    sampler = task.LoopingCall(sample)
    sampler.start(0.002)
    try:
        outcome = yield fetches.read(devices, START, NOW)
    finally:
        sampler.stop()
    assert outcome.errors == []
    jobs = _jobs(store)
    assert [j.state for j in jobs] == ["done"] * 6
    assert {j.route for j in jobs} == ({"cell-7"} if bound == "route" else {None})
    assert most[0] == 2


@pytest_twisted.inlineCallbacks
def test_fetches_of_one_meter_over_one_period_share_one_association(engine):
    fleet, service, store, runner, events = engine
    running, devices = fleet(1)
    meter = devices[0].mrid
    running.state(FIRST_METER).record(FRAUD, NOW - timedelta(hours=1), 40)
    fetches = service(start=False)  # both requests are queued before the engine runs
    fraud_key, fraud_ids = yield fetches.submit([meter], START, NOW, logs=["fraud"])
    standard_key, standard_ids = yield fetches.submit([meter], START, NOW, logs=["standard"])
    waiting = _waiting(fetches, fraud_ids + standard_ids)
    yield fetches.dispatcher.start()
    fraud, standard = yield waiting

    assert running.transient(FIRST_METER).accepted == 1
    assert fraud.state is standard.state is JobState.DONE
    stored = [e for e, _ in events.events(meter, START, NOW)]
    logs = {e.device_code.split(":")[0] for e in stored}
    assert logs == {FRAUD, STANDARD}
    # Each request gets its own logs' share of the one session.
    assert isinstance(fraud.result, EventFetch) and isinstance(standard.result, EventFetch)
    assert fraud.result.events == sum(1 for e in stored if e.device_code.startswith(FRAUD))
    assert standard.result.events == sum(1 for e in stored if e.device_code.startswith(STANDARD))
    assert fraud.result.events and standard.result.events


@pytest_twisted.inlineCallbacks
def test_an_on_demand_fetch_runs_before_scheduled_ones(engine):
    fleet, service, store, runner, _ = engine
    running, devices = fleet(8)
    fetches = service(max_sessions=1, start=False)
    scheduled_key, scheduled = yield fetches.submit(
        [d.mrid for d in devices[:7]], START, NOW, priority=Priority.SCHEDULED,
        key="schedule:hourly-events:test")
    on_demand_key, on_demand = yield fetches.submit([devices[7].mrid], START, NOW)
    finished: list[str] = []
    waiters = []
    for job_id in scheduled + on_demand:
        waiter = fetches.dispatcher.wait(job_id)
        waiter.addCallback(lambda o: finished.append(o.job.request_key) or o)
        waiters.append(waiter)
    yield fetches.dispatcher.start()
    outcomes = yield gatherResults(waiters)
    assert [o.state for o in outcomes] == [JobState.DONE] * 8
    assert finished[0] == on_demand_key and finished[1:] == [scheduled_key] * 7
    assert {j.priority for j in _jobs(store, scheduled_key)} == {Priority.SCHEDULED}
    assert {j.max_attempts for j in _jobs(store, scheduled_key)} == {
        fetches.dispatcher.settings.max_attempts}


@pytest_twisted.inlineCallbacks
def test_a_meter_out_of_reach_is_retried_with_backoff_then_failed_with_its_error(engine):
    fleet, service, store, runner, _ = engine
    running, devices = fleet(2, transient=lambda k: TransientFaults(
        drop_connections=1 if k == FIRST_METER else 99))
    fetches = service(retry_delay=0.2, retry_delay_max=0.3)
    started = reactor.seconds()
    key, ids = yield fetches.submit([d.mrid for d in devices], START, NOW,
                                    priority=Priority.SCHEDULED, attempts=3)
    recovered, lost = yield _waiting(fetches, ids)
    took = reactor.seconds() - started

    assert recovered.state is JobState.DONE and recovered.result.events > 0
    assert lost.state is JobState.FAILED and lost.result is None
    jobs = {j.device_mrid: j for j in _jobs(store, key)}
    assert jobs[devices[0].mrid].attempts == 2
    assert jobs[devices[1].mrid].attempts == 3
    assert devices[1].mrid in jobs[devices[1].mrid].last_error
    assert "ConnectionFailed" in jobs[devices[1].mrid].last_error
    assert running.transient(FIRST_METER + 1).accepted == 3
    assert took >= 0.2 + 0.3  # the backoff (0.2, then 0.4 capped at 0.3) between tries


@pytest_twisted.inlineCallbacks
def test_a_fetch_left_running_by_a_dead_engine_is_resumed_on_start(engine):
    fleet, service, store, runner, events = engine
    running, devices = fleet(2)
    first = service(start=False)
    key, ids = yield first.submit([d.mrid for d in devices], START, NOW)
    # A process claims them and dies before any is settled: the rows stay "running".
    claimed, _ = first.dispatcher.jobs.claim("dead-engine", 10, NOW + timedelta(minutes=1))
    assert sorted(j.id for j in claimed) == sorted(ids)
    assert {j.state for j in _jobs(store, key)} == {"running"}
    assert not any(events.events(d.mrid) for d in devices)

    restarted = service(start=False)
    waiting = [restarted.dispatcher.wait(i) for i in ids]
    requeued = yield restarted.dispatcher.start(requeue=True)
    outcomes = yield gatherResults(waiting)
    assert requeued == 2
    assert [o.state for o in outcomes] == [JobState.DONE] * 2
    jobs = _jobs(store, key)
    assert {(j.state, j.claimed_by) for j in jobs} == {("done", restarted.dispatcher.engine_id)}
    assert all(events.events(d.mrid, START, NOW) for d in devices)


@pytest_twisted.inlineCallbacks
def test_an_hourly_events_schedule_fetches_the_previous_hour(engine):
    fleet, service, store, runner, events = engine
    running, devices = fleet(2)
    in_hour = NOW.replace(minute=0, second=0) - timedelta(minutes=20)
    before = in_hour - timedelta(hours=2)
    for k in (FIRST_METER, FIRST_METER + 1):
        running.state(k).record(STANDARD, in_hour, 1)
        running.state(k).record(STANDARD, before, 2)
    config = ScheduleConfig.from_dict({"schedules": [
        {"name": "hourly-events", "cron": "5 * * * *", "group": "all", "event_logs": "all",
         "window": "previous-hour", "deadline_hours": 1}]})
    fetches = service()
    scheduler = Scheduler(reactor, runner, fetches.dispatcher, config, now=lambda: NOW)
    schedule = config.schedule("hourly-events")
    key, ids, new = yield scheduler.create_run(schedule, schedule.latest_fire(NOW))
    assert new and key == "schedule:hourly-events:2026-11-20T12:05Z"
    outcomes = yield _waiting(fetches, ids)

    assert [o.state for o in outcomes] == [JobState.DONE] * 2
    jobs = _jobs(store, key)
    assert {(j.kind, j.priority) for j in jobs} == {(JOB_KIND, Priority.SCHEDULED)}
    hour = (datetime(2026, 11, 20, 11, tzinfo=UTC), datetime(2026, 11, 20, 12, tzinfo=UTC))
    assert {(j.window_start, j.window_end) for j in jobs} == {hour}
    for device in devices:
        got = [e for e, _ in events.events(device.mrid)]
        assert all(hour[0] <= e.created <= hour[1] for e in got)
        assert any(e.created == in_hour and e.device_code == f"{STANDARD}:1" for e in got)
        assert not any(e.created == before for e in got)


@pytest.mark.parametrize("entry, words", [
    ({"event_logs": "all", "window": "none"}, "fetched over a window"),
    ({"event_logs": ["standard", "nonsense"], "window": "previous-hour"}, "unknown event logs"),
    ({"event_logs": "fraud", "window": "previous-hour"}, "list of event log names"),
    ({"window": "previous-hour"}, "no reading_types and no event_logs"),
])
def test_a_bad_events_schedule_is_refused_naming_the_problem(entry, words):
    with pytest.raises(ValueError, match=words):
        ScheduleConfig.from_dict({"schedules": [
            {"name": "e", "cron": "5 * * * *", "group": "all", **entry}]})


@pytest_twisted.inlineCallbacks
def test_a_schedule_with_reading_types_and_event_logs_makes_both_jobs_per_meter(engine):
    fleet, service, store, runner, _ = engine
    _, devices = fleet(3)
    config = ScheduleConfig.from_dict({"schedules": [
        {"name": "hourly", "cron": "5 * * * *", "group": "all", "window": "previous-hour",
         "reading_types": [PLUS_A_PROFILE], "event_logs": ["standard", "fraud"]}]})
    fetches = service(start=False)
    scheduler = Scheduler(reactor, runner, fetches.dispatcher, config, now=lambda: NOW)
    schedule = config.schedule("hourly")
    key, ids, _ = yield scheduler.create_run(schedule, schedule.latest_fire(NOW))
    jobs = _jobs(store, key)
    assert sorted(j.id for j in jobs) == sorted(ids)
    assert sorted((j.device_mrid, j.kind, tuple(j.reading_types)) for j in jobs) == sorted(
        [(d.mrid, "read", (PLUS_A_PROFILE,)) for d in devices]
        + [(d.mrid, JOB_KIND, ("standard", "fraud")) for d in devices])


def test_a_fetch_outcome_crosses_the_work_queue_with_its_errors_by_class():
    from cimhes.drivers.errors import ObjectUnavailable
    from cimhes.engine.dispatch import JobOutcome
    from cimhes.queue.job_queue import JobRef, decode_outcome, encode_outcome

    missing = ObjectUnavailable("m1", "event log 0.0.99.98.4.255 (power quality): object-undefined",
                                "event log power quality", 4).located("meter 1", "127.0.24.9:4059")
    sent = JobOutcome(JobRef(7, "m1"), JobState.DONE, EventFetch("m1", 12, (missing,)))
    job_id, got = decode_outcome(encode_outcome(sent))
    assert job_id == 7 and got.state is JobState.DONE and got.job.device.mrid == "m1"
    assert got.result == EventFetch("m1", 12, (missing,))
    assert str(got.result.errors[0]) == str(missing)
