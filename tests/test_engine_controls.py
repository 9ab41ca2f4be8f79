"""Controls as durable jobs: the ControlService over a real store and dispatcher, against
simulated meters over TCP: outcomes in the asked order, priority above reads, scheduled
execution and cancel, retries, and a restart that resumes without running a control twice."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from twisted.internet import reactor, task

from cimhes.drivers import DeviceAddress
from cimhes.drivers.controls import ControlCommand, ControlKind, ControlStatus
from cimhes.drivers.errors import ConnectionFailed, ControlCancelled, UnknownDevice
from cimhes.drivers.idis import IdisMeterDriver
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.controls import ControlJobRecord, ControlService, ControlSettings
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.jobs import JobRecord, JobState, NewJob, Priority
from cimhes.engine.limits import EngineSettings
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet

UTC = timezone.utc
FIRST = 4847  # 127.0.20.21..: this file's part of the controls' loopback range
DISCONNECT = ControlCommand(ControlKind.DISCONNECT)
SETTINGS = EngineSettings(min_device_gap=0.0, retry_delay=0.2, retry_jitter=0.0, poll_interval=0.2)


def now():
    return datetime.now(UTC)


@pytest.fixture
def fleet():
    running = start_fleet(reactor, 3, clock=now, port=0, base_index=FIRST)
    yield running
    pytest_twisted.blockon(running.stop_all())


@pytest.fixture
def store(tmp_path, fleet):
    store = Store(f"sqlite:///{tmp_path / 'controls.sqlite'}")
    store.load_inventory([DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    runner = StoreRunner(reactor, store)
    yield store, runner
    runner.stop()


def engine(runner, settings=ControlSettings(), poll=False):
    dispatcher = Dispatcher(reactor, runner, SETTINGS, session_limits=SessionLimits.of(5.0),
                            connections_per_second=0)
    service = ControlService(reactor, runner, dispatcher, settings=settings)
    dispatcher.start(poll=poll)
    return dispatcher, service


def mrid(k: int) -> str:
    return meter_model.meter_identity(k).mrid


def codes(fleet, k: int) -> list[int]:
    return [code for _, code in fleet.state(k).recorded.get(meter_model.DISCONNECTOR_LOG, [])]


@pytest_twisted.ensureDeferred
async def test_execute_gives_one_outcome_per_asked_device_in_order(fleet, store):
    dispatcher, service = engine(store[1])
    try:
        asked = [mrid(FIRST + 1), "no-such-meter", mrid(FIRST)]
        batch = await service.execute(asked, DISCONNECT, user="op", correlation_id="c-1")
        assert [o.device_mrid for o in batch.outcomes] == asked
        assert [o.status for o in batch.outcomes] == [
            ControlStatus.DONE, ControlStatus.FAILED, ControlStatus.DONE]
        assert isinstance(batch.outcomes[1].error, UnknownDevice)
        assert batch.outcomes[0].read_back["control_state"] == "disconnected"
        assert codes(fleet, FIRST) == codes(fleet, FIRST + 1) == [62]
        with Session(store[0].engine) as session:
            jobs = session.scalars(select(JobRecord)).all()
            assert {(j.kind, j.priority, j.state) for j in jobs} == {
                ("control", Priority.CONTROL, "done")}
            rows = session.scalars(select(ControlJobRecord)).all()
            assert {(r.user, r.correlation_id, r.status, r.attempts_started) for r in rows} == {
                ("op", "c-1", "done", 1)}
        # The stored outcomes say the same.
        stored = await service.batch(batch.batch_id)
        assert [(m, o.status) for m, o in stored] == [(mrid(FIRST + 1), ControlStatus.DONE),
                                                     (mrid(FIRST), ControlStatus.DONE)]
    finally:
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_control_jobs_are_claimed_before_on_demand_and_scheduled_reads(store):
    runner = store[1]
    dispatcher = Dispatcher(reactor, runner, SETTINGS)
    ControlService(reactor, runner, dispatcher)
    at = now()
    for key, priority, kind in (("read", Priority.ON_DEMAND, "read"),
                                ("scheduled", Priority.SCHEDULED, "read"),
                                ("control", Priority.CONTROL, "control")):
        await runner.call(dispatcher.jobs.create_request, key, key, [NewJob(mrid(FIRST), kind=kind)],
                          priority=priority, max_attempts=1, now=at)
    claimed, _ = await runner.call(dispatcher.jobs.claim, "e", 3, at)
    assert [job.request_key for job in claimed] == ["control", "read", "scheduled"]
    # A dispatcher without a control service never claims control jobs.
    await runner.call(dispatcher.jobs.requeue_unfinished)
    reads_only, _ = await runner.call(dispatcher.jobs.claim, "e", 3, at, kinds=("read",))
    assert {job.kind for job in reads_only} == {"read"}


@pytest_twisted.ensureDeferred
async def test_a_scheduled_control_runs_at_its_time_and_a_cancelled_one_never(fleet, store):
    dispatcher, service = engine(store[1])
    try:
        later = await service.schedule([mrid(FIRST)], DISCONNECT, user="op", correlation_id=None,
                                       at=now() + timedelta(seconds=30))
        at = now() + timedelta(seconds=1)
        soon = service.execute([mrid(FIRST + 1)], DISCONNECT, user="op", correlation_id=None,
                               at=at)
        assert await service.cancel(later, user="op2") == [mrid(FIRST)]
        assert await service.cancel(later, user="op2") == []  # nothing left to cancel
        outcome = (await service.batch(later))[0][1]
        assert outcome.status is ControlStatus.FAILED and isinstance(outcome.error, ControlCancelled)
        assert "op2" in outcome.reason
        ran = (await soon).outcomes[0]
        assert ran.status is ControlStatus.DONE
        happened = fleet.state(FIRST + 1).recorded[meter_model.DISCONNECTOR_LOG][0][0]
        assert happened >= at
        await task.deferLater(reactor, 0.3, lambda: None)
        assert codes(fleet, FIRST) == []
        with pytest.raises(KeyError):
            await service.cancel("control:nope", user="op")
    finally:
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_execute_waits_for_a_cancelled_scheduled_batch(fleet, store):
    dispatcher, service = engine(store[1])
    try:
        at = now() + timedelta(seconds=60)
        waiting = service.execute([mrid(FIRST)], DISCONNECT, user="op", correlation_id=None, at=at)
        batch_id = None
        for _ in range(100):  # the batch's job is written on the store thread: wait for it
            keys = await store[1].call(dispatcher.jobs.requests)
            batch_id = next((key for key, kind, _ in keys if kind == "control"), None)
            if batch_id is not None:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert batch_id is not None, "the scheduled control's job was never written"
        assert await service.cancel(batch_id, user="op") == [mrid(FIRST)]
        batch = await waiting
        assert batch.batch_id == batch_id
        assert isinstance(batch.outcomes[0].error, ControlCancelled)
    finally:
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_a_failure_with_unknown_effect_is_retried_then_failed(fleet, store):
    dispatcher, service = engine(store[1], ControlSettings(attempts=2))
    try:
        await fleet.stop(FIRST + 2)
        batch = await service.execute([mrid(FIRST + 2)], DISCONNECT, user=None,
                                      correlation_id=None)
        outcome = batch.outcomes[0]
        assert outcome.status is ControlStatus.FAILED and isinstance(outcome.error, ConnectionFailed)
        with Session(store[0].engine) as session:
            row = session.scalars(select(ControlJobRecord)).one()
            job = session.get(JobRecord, row.job_id)
            assert (row.attempts_started, job.attempts, job.state) == (2, 2, "failed")
    finally:
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_a_restart_resumes_a_queued_control_job(fleet, store):
    dispatcher, service = engine(store[1])
    batch_id = await service.schedule([mrid(FIRST)], DISCONNECT, user="op", correlation_id=None,
                                      at=now() + timedelta(seconds=0.5))
    dispatcher.stop()  # the process ends before the job is due
    await task.deferLater(reactor, 0.8, lambda: None)
    assert codes(fleet, FIRST) == []
    dispatcher, service = engine(store[1], poll=True)  # the next process
    try:
        for _ in range(100):
            outcomes = await service.batch(batch_id)
            if outcomes[0][1] is not None:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert outcomes[0][1].status is ControlStatus.DONE
        assert codes(fleet, FIRST) == [62]
    finally:
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_a_control_interrupted_while_running_is_read_back_not_sent_again(fleet, store):
    dispatcher, service = engine(store[1])
    batch_id = await service.schedule([mrid(FIRST + 1)], DISCONNECT, user="op",
                                      correlation_id=None, at=now() + timedelta(seconds=60))
    dispatcher.stop()
    # As if the first process had claimed the job, started the attempt, disconnected the meter
    # and died before writing the outcome.
    device = DeviceAddress.from_inventory(next(
        m for m in fleet.inventory()["meters"] if m["mrid"] == mrid(FIRST + 1)))
    sent = await IdisMeterDriver().control(reactor, device, DISCONNECT, 5.0)
    assert sent.status is ControlStatus.DONE and codes(fleet, FIRST + 1) == [62]
    with Session(store[0].engine) as session, session.begin():
        row = session.scalars(select(ControlJobRecord)).one()
        row.attempts_started = 1
        session.execute(update(JobRecord).where(JobRecord.id == row.job_id).values(
            state=JobState.RUNNING.value, claimed_by="dead-engine", next_attempt_at=now()))
    dispatcher, service = engine(store[1], poll=True)  # requeues what the dead one ran
    try:
        for _ in range(100):
            outcomes = await service.batch(batch_id)
            if outcomes[0][1] is not None:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        outcome = outcomes[0][1]
        assert outcome.status is ControlStatus.DONE and outcome.read_back["already"] is True
        assert codes(fleet, FIRST + 1) == [62]  # not disconnected a second time
    finally:
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_bad_parameters_are_refused_before_anything_is_stored(fleet, store):
    dispatcher, service = engine(store[1])
    try:
        with pytest.raises(ValueError, match="threshold_w"):
            await service.execute([mrid(FIRST)], ControlCommand(ControlKind.LOAD_LIMIT_SET, {}),
                                  user=None, correlation_id=None)
        assert await store[1].call(dispatcher.jobs.requests) == []
    finally:
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_the_head_end_builds_the_service_and_audits_each_outcome(fleet, tmp_path):
    from cimhes.endpoints.site import HeadEnd, HeadEndSettings

    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}",
        secret_key_file=str(tmp_path / "secret.key"), engine=SETTINGS),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    try:
        fleet.state(FIRST + 2).disconnector.control_mode = 0  # refuses
        batch = await head_end.controls.execute([mrid(FIRST), mrid(FIRST + 2)], DISCONNECT,
                                                user="op", correlation_id="c-7")
        assert [o.status for o in batch.outcomes] == [ControlStatus.DONE, ControlStatus.REFUSED]
        await head_end.store_runner.call(lambda: None)
        trail = [(e.actor, e.action, e.outcome, e.subject, e.correlation_id)
                 for e in head_end.users.audit_entries() if e.action.startswith("control.")]
        assert sorted(trail) == [("op", "control.disconnect", "failure", mrid(FIRST + 2), "c-7"),
                                 ("op", "control.disconnect", "success", mrid(FIRST), "c-7")]
    finally:
        head_end.dispatcher.stop()
        head_end.store_runner.stop()
        head_end.store.close()


@pytest_twisted.ensureDeferred
async def test_controls_reach_meters_behind_a_concentrator(tmp_path):
    from cimhes.drivers.security import HeadEndSecurity
    from cimhes.engine.inventory import Inventory
    from cimhes.engine.security import CounterStore, StoredCounters
    from cimhes.fixtures.concentrator import start_concentrators

    behind = FIRST + 100  # identities only: meters behind a concentrator listen nowhere
    concentrators = start_concentrators(reactor, 1, 2, first_meter=behind,
                                        hosts=["127.0.20.200"], port=0, latency=0.01,
                                        security="mixed", clock=now)
    store = Store(f"sqlite:///{tmp_path / 'concentrator.sqlite'}")
    runner = StoreRunner(reactor, store)
    try:
        store.load_inventory(Inventory.from_json(concentrators.inventory()))
        dispatcher = Dispatcher(reactor, runner, SETTINGS, session_limits=SessionLimits.of(5.0),
                                connections_per_second=0,
                                security=HeadEndSecurity(b"CIMHES01", StoredCounters(
                                    runner, CounterStore(store))))
        service = ControlService(reactor, runner, dispatcher)
        dispatcher.start()
        batch = await service.execute([mrid(behind), mrid(behind + 1)], DISCONNECT, user="op",
                                      correlation_id=None)
        assert [o.status for o in batch.outcomes] == [ControlStatus.DONE] * 2, batch
        for k in (behind, behind + 1):
            state = concentrators[0].meter(k).state
            assert [c for _, c in state.recorded[meter_model.DISCONNECTOR_LOG]] == [62]
        dispatcher.stop()
    finally:
        await concentrators.stop_all()
        runner.stop()
        store.close()
