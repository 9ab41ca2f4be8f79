"""Meter controls as durable jobs: `ControlService` (built by the HeadEnd as `head_end.controls`).

Every device's control is a job of kind "control" in the job table (engine/jobs.py), priority
`Priority.CONTROL` (before on-demand reads), run by the engine's Dispatcher under its session,
route and per-device bounds; its command, attempts and outcome are a `control_job` row
(Alembic branch "controls") written in the same transaction as the job. `execute` answers when
every device's job has finished; `schedule` stores the jobs due at `at` and answers with the
batch id (the job request key); `cancel` cancels what of a batch is still queued.

The rule that no control runs twice (docs/controls.md, "Restart and retries"):
- before the meter is contacted, the attempt is written (`attempts_started` + 1) on the store
  thread; the final outcome is written before the job is settled;
- a job whose outcome is already written (the process died between the two writes) is settled
  from it, the meter not contacted;
- every attempt after the first one that started (a restart while running, or a retry after a
  failure whose effect is unknown) is *resumed*: the driver reads the meter's state first and
  sends nothing if the control is already in effect;
- retried are only failures that leave the effect unknown or prove it absent (timeout,
  connection, association); a refusal or a read-back that disagrees is final;
- a control not started within `ControlSettings.max_delay` of its due time is failed, not sent
  (a disconnect hours late is not what was asked).
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks

from cimhes.drivers import driver_for
from cimhes.drivers.controls import (
    ControlCommand,
    ControlKind,
    ControlOutcome,
    ControlStatus,
    checked,
    command_from_json,
    command_to_json,
)
from cimhes.drivers.errors import (
    AssociationRefused,
    ConnectionFailed,
    ControlCancelled,
    ControlExpired,
    ControlNotConfirmed,
    DeviceError,
    HeadEndExhausted,
    ProtocolError,
    Timeout,
    UnknownDevice,
)
from cimhes.engine.dispatch import Dispatcher, JobOutcome, RunResult
from cimhes.engine.jobs import Job, JobRecord, JobRequestRecord, JobState, NewJob, Priority
from cimhes.engine.store import Base, EpochMillis, StoreRunner

log = logging.getLogger(__name__)

JOB_KIND = "control"
REQUEST_KIND = "control"
# Failures after which the control may be tried again (resumed: state read first).
RETRYABLE = (Timeout, ConnectionFailed, HeadEndExhausted, AssociationRefused)
# Error classes an outcome read from the store is rebuilt with (by their names).
_ERRORS = {cls.__name__: cls for cls in (
    Timeout, ConnectionFailed, HeadEndExhausted, AssociationRefused, ProtocolError,
    ControlNotConfirmed, ControlCancelled, ControlExpired, UnknownDevice, DeviceError)}


@dataclass(frozen=True)
class ControlSettings:
    """`attempts`: tries per device (the first, then retries after failures that leave the
    effect unknown); `max_delay`: seconds after its due time past which a control that has not
    started is failed instead of sent."""

    attempts: int = 3
    max_delay: float = 3600.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.max_delay <= 0:
            raise ValueError("control attempts must be >= 1 and max_delay > 0")


@dataclass(frozen=True)
class ControlBatch:
    batch_id: str
    outcomes: tuple[ControlOutcome, ...]     # one per asked device, in the asked order


class ControlJobRecord(Base):
    """One device's control: the command, who asked, its attempts and its final outcome."""

    __tablename__ = "control_job"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    command: Mapped[dict] = mapped_column(JSON)
    user: Mapped[str | None] = mapped_column(String(128))
    correlation_id: Mapped[str | None] = mapped_column(String(256))
    due_at: Mapped[datetime] = mapped_column(EpochMillis())
    attempts_started: Mapped[int] = mapped_column(Integer, default=0)
    last_started_at: Mapped[datetime | None] = mapped_column(EpochMillis())
    # The final outcome (None while it is not known).
    status: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(1024))
    read_back: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    error_kind: Mapped[str | None] = mapped_column(String(64))
    finished_at: Mapped[datetime | None] = mapped_column(EpochMillis())


@dataclass(frozen=True)
class Attempt:
    """What the runner needs to start an attempt (from `ControlStore.begin_attempt`)."""

    command: ControlCommand
    resumed: bool
    due_at: datetime
    stored: ControlOutcome | None  # the final outcome, if one was written already


class ControlStore:
    """Blocking unit-of-work methods over the control tables (run them on the store's thread)."""

    def __init__(self, store):
        self._session = sessionmaker(store.engine, expire_on_commit=False)
        self.store = store

    def begin_attempt(self, job_id: int, now: datetime) -> Attempt:
        with self._session.begin() as session:
            row = session.scalar(select(ControlJobRecord).where(ControlJobRecord.job_id == job_id))
            if row is None:
                raise KeyError(f"control job {job_id} has no command")
            stored = _outcome(session, row) if row.status is not None else None
            resumed = row.attempts_started > 0
            if stored is None:
                row.attempts_started += 1
                row.last_started_at = now
            return Attempt(command_from_json(row.command), resumed, row.due_at, stored)

    def finish(self, job_id: int, outcome: ControlOutcome, now: datetime) -> None:
        with self._session.begin() as session:
            session.execute(update(ControlJobRecord).where(
                ControlJobRecord.job_id == job_id, ControlJobRecord.status.is_(None)).values(
                status=outcome.status.value, reason=outcome.reason[:1024],
                read_back=_json_safe(outcome.read_back) or None,
                error_kind=type(outcome.error).__name__ if outcome.error else None,
                finished_at=now))

    def cancel(self, key: str, user: str | None, now: datetime) -> list[tuple[int, str]]:
        """Cancel the still-queued jobs of batch `key`: (job id, mRID) of each cancelled."""
        with self._session.begin() as session:
            request_id = session.scalar(select(JobRequestRecord.id).where(
                JobRequestRecord.key == key, JobRequestRecord.kind == REQUEST_KIND))
            if request_id is None:
                raise KeyError(f"no control batch {key!r}")
            queued = session.execute(select(JobRecord.id, JobRecord.device_mrid).where(
                JobRecord.request_id == request_id,
                JobRecord.state == JobState.QUEUED.value).order_by(JobRecord.id)).all()
            cancelled = []
            for job_id, mrid in queued:
                changed = session.execute(update(JobRecord).where(
                    JobRecord.id == job_id, JobRecord.state == JobState.QUEUED.value).values(
                    state=JobState.CANCELLED.value, finished_at=now,
                    last_error=f"cancelled by {user or 'an unnamed user'}")).rowcount
                if changed:
                    session.execute(update(ControlJobRecord).where(
                        ControlJobRecord.job_id == job_id).values(
                        status=ControlStatus.FAILED.value, error_kind="ControlCancelled",
                        reason=f"cancelled by {user or 'an unnamed user'} before it ran",
                        finished_at=now))
                    cancelled.append((job_id, mrid))
            return cancelled

    def outcomes(self, key: str) -> list[tuple[str, ControlOutcome | None]]:
        """(mRID, final outcome or None while unfinished) of each job of batch `key`."""
        with self._session() as session:
            rows = session.execute(
                select(ControlJobRecord, JobRecord.device_mrid)
                .join(JobRecord, JobRecord.id == ControlJobRecord.job_id)
                .join(JobRequestRecord, JobRequestRecord.id == JobRecord.request_id)
                .where(JobRequestRecord.key == key).order_by(JobRecord.id)).all()
            if not rows and session.scalar(select(JobRequestRecord.id).where(
                    JobRequestRecord.key == key)) is None:
                raise KeyError(f"no control batch {key!r}")
            return [(mrid, _outcome(session, row) if row.status is not None else None)
                    for row, mrid in rows]


def _outcome(session: Session, row: ControlJobRecord) -> ControlOutcome:
    mrid = session.scalar(select(JobRecord.device_mrid).where(JobRecord.id == row.job_id))
    error = None
    if row.error_kind is not None:
        error = _ERRORS.get(row.error_kind, DeviceError)(mrid, row.reason or "")
    return ControlOutcome(mrid, ControlKind(row.kind), ControlStatus(row.status),
                          row.reason or "", row.read_back or {}, error)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class ControlService:
    """Controls of meters as durable jobs (see the module docstring); `execute`, `schedule`,
    `cancel` are the face the CIM door (EndDeviceControls) and the CLI use."""

    def __init__(self, reactor, runner: StoreRunner, dispatcher: Dispatcher, *,
                 settings: ControlSettings | None = None, gate=None,
                 now: Callable[[], datetime] | None = None,
                 jitter: Callable[[], float] | None = None):
        self._reactor = reactor
        self._runner = runner
        self.dispatcher = dispatcher
        self.settings = settings or ControlSettings()
        self.store = ControlStore(runner.store)
        self._gate = gate  # engine/rate_limits.py ControlGate: each outcome audited
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._jitter = jitter or (lambda: 0.5)
        self._waiters: dict[int, list[Deferred]] = {}
        self._kinds: dict[int, ControlKind] = {}  # jobs stored here, not finished yet
        dispatcher.runners[JOB_KIND] = self._run

    # -- the face ----------------------------------------------------------------------------

    @inlineCallbacks
    def execute(self, mrids: Sequence[str], command: ControlCommand, *, user: str | None,
                correlation_id: str | None, at: datetime | None = None,
                on_stored: Callable[[Session, str], None] | None = None):
        """Deferred[ControlBatch]: one outcome per asked mRID, in order, once every device's
        job has finished (ran, or was cancelled). Unknown mRIDs are FAILED with
        `UnknownDevice`. Bad parameters: ValueError before anything is stored.
        ``on_stored(session, batch_id)`` runs in the transaction that stores the jobs (what
        must be known of the batch if the process dies while it runs: engine/pending_replies.py)."""
        batch_id, jobs, unknown = yield self._store_batch(mrids, command, user, correlation_id,
                                                          at, on_stored)
        waiting = [self._wait(job_id) for job_id in jobs.values()]
        self.dispatcher.submitted(list(jobs.values()))  # an api process hands them out
        finished = yield gatherResults(waiting)
        by_mrid = {**dict(zip(jobs, finished)), **unknown}
        return ControlBatch(batch_id, tuple(by_mrid[mrid] for mrid in mrids))

    @inlineCallbacks
    def schedule(self, mrids: Sequence[str], command: ControlCommand, *, user: str | None,
                 correlation_id: str | None, at: datetime):
        """Deferred[str]: the batch id, as soon as the jobs due at `at` are stored. Outcomes:
        `batch(batch_id)`; unknown mRIDs are not stored (`execute` reports them)."""
        if at is None:
            raise ValueError("schedule needs the time the controls are due (at)")
        batch_id, jobs, _ = yield self._store_batch(mrids, command, user, correlation_id, at)
        self.dispatcher.submitted(list(jobs.values()))  # an api process hands them out
        return batch_id

    @inlineCallbacks
    def cancel(self, batch_id: str, *, user: str | None):
        """Deferred[list[str]]: the mRIDs whose still-queued control was cancelled (running or
        finished ones are not; KeyError for an unknown batch)."""
        cancelled = yield self._runner.call(self.store.cancel, batch_id, user, self._now())
        for job_id, mrid in cancelled:
            self.dispatcher.forget(job_id)
            kind = self._kinds.pop(job_id, None)
            error = ControlCancelled(mrid, f"cancelled by {user or 'an unnamed user'} before "
                                     "it ran")
            if kind is not None:
                self._fire(job_id, ControlOutcome(mrid, kind, ControlStatus.FAILED,
                                                  str(error), {}, error))
        return [mrid for _, mrid in cancelled]

    @inlineCallbacks
    def batch(self, batch_id: str):
        """Deferred[list[(mRID, ControlOutcome | None)]]: the stored outcomes of a batch so far
        (None: not finished yet), in the order its jobs were made."""
        return (yield self._runner.call(self.store.outcomes, batch_id))

    # -- inside ------------------------------------------------------------------------------

    @inlineCallbacks
    def _store_batch(self, mrids, command, user, correlation_id, at, on_stored=None):
        command = checked(command)
        if at is not None and at.tzinfo is None:
            raise ValueError("at must be a timezone-aware datetime")
        now = self._now()
        due = max(at, now) if at is not None else now
        asked = list(dict.fromkeys(mrids))
        found = yield self._runner.call(self._runner.store.find_devices, asked, [])
        known = [mrid for mrid in asked if mrid in found]
        routes = (yield self._runner.call(self._runner.store.routes_of, known)) if known else {}
        unknown = {}
        for mrid in asked:
            if mrid not in found:
                error = UnknownDevice(mrid, "not in the head-end's inventory")
                unknown[mrid] = ControlOutcome(mrid, command.kind, ControlStatus.FAILED,
                                               str(error), {}, error)
        batch_id = f"control:{uuid.uuid4()}"
        jobs: dict[str, int] = {}
        if known:
            stored = command_to_json(command)

            def attach(session: Session, rows: list[JobRecord]) -> None:
                session.add_all([ControlJobRecord(
                    job_id=row.id, kind=command.kind.value, command=stored, user=user,
                    correlation_id=correlation_id, due_at=due, attempts_started=0)
                    for row in rows])
                if on_stored is not None:
                    on_stored(session, batch_id)

            ids, _ = yield self._runner.call(
                self.dispatcher.jobs.create_request, batch_id, REQUEST_KIND,
                [NewJob(mrid, kind=JOB_KIND, route=routes.get(mrid)) for mrid in known],
                priority=Priority.CONTROL, max_attempts=self.settings.attempts, now=now,
                deadline=due + timedelta(seconds=self.settings.max_delay), not_before=due,
                attach=attach)
            jobs = dict(zip(known, ids))
        for job_id in jobs.values():
            self._kinds[job_id] = command.kind
            self.dispatcher.wait(job_id).addCallback(self._finished, job_id)
        return batch_id, jobs, unknown

    def _wait(self, job_id: int) -> Deferred:
        """Deferred[ControlOutcome] of job `job_id`, a job this service stored."""
        waiter = Deferred()
        self._waiters.setdefault(job_id, []).append(waiter)
        return waiter

    def _fire(self, job_id: int, outcome: ControlOutcome) -> None:
        for waiter in self._waiters.pop(job_id, []):
            waiter.callback(outcome)

    def _finished(self, job: JobOutcome, job_id: int) -> None:
        kind = self._kinds.pop(job_id, ControlKind.DISCONNECT)
        outcome = job.result
        if not isinstance(outcome, ControlOutcome):
            error = job.error if isinstance(job.error, DeviceError) else DeviceError(
                job.job.device.mrid, "internal error while running the control")
            outcome = ControlOutcome(job.job.device.mrid, kind, ControlStatus.FAILED,
                                     str(error), {}, error)
        self._fire(job_id, outcome)

    def _run(self, job: Job) -> Deferred:
        return Deferred.fromCoroutine(self._attempt(job))

    async def _attempt(self, job: Job) -> RunResult:
        now = self._now()
        attempt: Attempt = await self._runner.call(self.store.begin_attempt, job.id, now)
        if attempt.stored is not None:  # the outcome was written before a crash: settle it
            return self._result(job, attempt.stored, final=True)
        command = attempt.command
        if job.deadline is not None and now > job.deadline:
            error = ControlExpired(job.device.mrid, f"not started within "
                                   f"{self.settings.max_delay:g} s of its due time "
                                   f"{attempt.due_at.isoformat()}; not sent")
            outcome = ControlOutcome(job.device.mrid, command.kind, ControlStatus.FAILED,
                                     str(error), {}, error)
        else:
            outcome = await driver_for(job.device.device_type).control(
                self._reactor, job.device, command, self.dispatcher.session_limits,
                self.dispatcher.security, pacer=self.dispatcher.pacer, now=self._now,
                resumed=attempt.resumed)
        retry_at = self._retry_at(job, outcome)
        if retry_at is None:
            await self._runner.call(self.store.finish, job.id, outcome, self._now())
            await self._audit(job, command, outcome)
        return self._result(job, outcome, final=retry_at is None, retry_at=retry_at)

    def _retry_at(self, job: Job, outcome: ControlOutcome) -> datetime | None:
        if outcome.status is not ControlStatus.FAILED or not isinstance(outcome.error, RETRYABLE):
            return None
        if isinstance(outcome.error, AssociationRefused) and outcome.error.result == 1:
            return None  # rejected-permanent: a wrong password stays wrong
        attempts = job.attempts + 1
        at = self._now() + timedelta(seconds=self.dispatcher.settings.retry_wait(
            attempts, self._jitter))
        if attempts >= job.max_attempts or (job.deadline is not None and at >= job.deadline):
            return None
        return at

    def _result(self, job: Job, outcome: ControlOutcome, final: bool,
                retry_at: datetime | None = None) -> RunResult:
        if not final:
            return RunResult(JobState.QUEUED, outcome, outcome.error, outcome.reason, retry_at)
        state = JobState.DONE if outcome.status is ControlStatus.DONE else JobState.FAILED
        return RunResult(state, outcome, outcome.error,
                         None if state is JobState.DONE else outcome.reason)

    async def _audit(self, job: Job, command: ControlCommand, outcome: ControlOutcome) -> None:
        if self._gate is None:
            return
        row = await self._runner.call(self._user_of, job.id)
        try:
            await self._gate.record_outcome(
                command.kind.value, row[0] or "", job.device.mrid,
                "success" if outcome.status is ControlStatus.DONE else "failure",
                detail=f"{outcome.status.value}: {outcome.reason}"[:500] if outcome.reason
                else outcome.status.value, source="engine", correlation_id=row[1])
        except Exception as problem:  # the audit trail must not undo a control that ran
            log.error("auditing the %s of %s failed: %s", command.kind.value, job.device.mrid,
                      type(problem).__name__)

    def _user_of(self, job_id: int) -> tuple[str | None, str | None]:
        with sessionmaker(self._runner.store.engine)() as session:
            row = session.execute(select(ControlJobRecord.user, ControlJobRecord.correlation_id)
                                  .where(ControlJobRecord.job_id == job_id)).one()
            return row[0], row[1]


__all__ = ["ControlService", "ControlBatch", "ControlSettings", "ControlJobRecord",
           "ControlStore", "JOB_KIND"]
