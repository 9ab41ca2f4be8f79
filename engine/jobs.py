"""Durable jobs: every piece of work the engine does for a request is a row that outlives the process.

A `JobRequestRecord` is what the work is for (an on-demand GetMeterReadings, one run of a read
schedule); a `JobRecord` is one device's part of it: its kind ("read"; "control", engine/controls.py;
"events", an event-log fetch, engine/event_fetches.py, whose `reading_types` are the log names),
state, priority, attempts, next-attempt time, deadline, the reading types and window it must bring, the intervals still missing and
the last error. States: queued -> running -> done | failed | cancelled; a retry or a re-read
puts a job back to queued with a later next-attempt time.

Durability rules (what a crash can and cannot do):
- A job is created in the same transaction as its request, once: (request, device, kind) is
  unique, so a schedule run created twice (two engines, a restart) has one job per meter.
- `claim` moves due queued jobs to running for one engine; `requeue_unfinished` moves running
  ones back to queued when an engine starts (or another engine takes over its work), so none is
  lost.
- Every state change out of running is conditional on the job still being running, so a job
  completes once: readings are stored idempotently (one row per device, type and time) before
  the job is marked done, and a job re-run after a crash between the two stores nothing twice.

`JobStore` holds the blocking unit-of-work methods; the reactor reaches them through the
store's thread (`StoreRunner.call`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import Enum, IntEnum

from sqlalchemy import (
    JSON,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from cimhes.drivers import DeviceAddress
from cimhes.engine.reread import expected_times, interval_length, missing_ranges, span
from cimhes.engine.store import Base, Device, EpochMillis, ReadingRecord, Store


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Ids bound in one IN (...) list, well below every database's parameter limit.
_IDS_PER_QUERY = 500

FINISHED = (JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value)


class Priority(IntEnum):
    """Lower runs first: controls, then on-demand reads, then scheduled collection."""

    CONTROL = 0
    ON_DEMAND = 10
    SCHEDULED = 50


class JobRequestRecord(Base):
    """What a set of jobs is for: an on-demand request or one run of a schedule."""

    __tablename__ = "job_request"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))  # "on-demand" | "schedule"
    schedule: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(EpochMillis())
    deadline: Mapped[datetime | None] = mapped_column(EpochMillis())


class JobRecord(Base):
    """One device's part of a request (see the module's docstring for the states)."""

    __tablename__ = "job"
    __table_args__ = (UniqueConstraint("request_id", "device_mrid", "kind"),
                      Index("ix_job_due", "state", "priority", "next_attempt_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("job_request.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    device_mrid: Mapped[str] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(128))
    reading_types: Mapped[list] = mapped_column(JSON)
    # The window the job must bring (None: registers only), and the part still to read.
    window_start: Mapped[datetime | None] = mapped_column(EpochMillis())
    window_end: Mapped[datetime | None] = mapped_column(EpochMillis())
    read_start: Mapped[datetime | None] = mapped_column(EpochMillis())
    read_end: Mapped[datetime | None] = mapped_column(EpochMillis())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    rereads: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(EpochMillis())
    deadline: Mapped[datetime | None] = mapped_column(EpochMillis())
    last_error: Mapped[str | None] = mapped_column(String(1024))
    # {reading type: [[start, end] epoch ms, ...]}: intervals still missing after the last read.
    missing: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(EpochMillis())
    started_at: Mapped[datetime | None] = mapped_column(EpochMillis())
    finished_at: Mapped[datetime | None] = mapped_column(EpochMillis())


@dataclass(frozen=True)
class NewJob:
    """A job to create: which device, what to read, and over which window."""

    device_mrid: str
    reading_types: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    route: str | None = None
    kind: str = "read"
    # What the store already holds decides these (`JobStore.narrowed_to_missing`): the part of
    # the window still to read, or that nothing is (the job is created done, no session).
    read_window: tuple[datetime, datetime] | None = None
    already_stored: bool = False


@dataclass
class Job:
    """A claimed job as the dispatcher works on it (the row's fields, and the device)."""

    id: int
    request_key: str
    kind: str
    priority: int
    device: DeviceAddress
    route: str | None
    reading_types: tuple[str, ...]
    window: tuple[datetime, datetime] | None
    read_window: tuple[datetime, datetime] | None
    attempts: int
    max_attempts: int
    rereads: int
    deadline: datetime | None


@dataclass(frozen=True)
class Progress:
    """How far a request is: jobs per state, and how many are done with intervals missing."""

    request_key: str
    counts: dict[str, int] = field(default_factory=dict)
    incomplete: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def pending(self) -> int:
        return self.counts.get("queued", 0) + self.counts.get("running", 0)

    @property
    def finished(self) -> bool:
        return self.pending == 0

    def line(self) -> str:
        return (f"{self.request_key}: {self.counts.get('done', 0)} done "
                f"({self.incomplete} with intervals missing), {self.counts.get('failed', 0)} "
                f"failed, {self.pending} pending ({self.counts.get('running', 0)} running), "
                f"{self.counts.get('cancelled', 0)} cancelled, of {self.total}")


@dataclass(frozen=True)
class JobReport:
    """One job's outcome for a report: per meter, what failed and what stays missing."""

    device_mrid: str
    state: str
    attempts: int
    rereads: int
    last_error: str | None
    missing: dict[str, list[tuple[datetime, datetime]]]


@dataclass(frozen=True)
class Completion:
    """What the dispatcher decided for a job after a session (see `JobStore.settle`)."""

    job_id: int
    state: JobState  # DONE, FAILED, or QUEUED (retry or re-read)
    attempts: int
    finished_at: datetime
    error: str | None = None
    next_attempt_at: datetime | None = None
    read_window: tuple[datetime, datetime] | None = None
    missing: dict | None = None
    reread: bool = False


class JobStore:
    """Blocking unit-of-work methods over the job tables (run them on the store's thread)."""

    def __init__(self, store: Store):
        self._session = sessionmaker(store.engine, expire_on_commit=False)

    def create_request(self, key: str, kind: str, jobs: Sequence[NewJob], *, priority: int,
                       max_attempts: int, now: datetime, deadline: datetime | None = None,
                       schedule: str | None = None, not_before: datetime | None = None,
                       attach: Callable[[Session, list[JobRecord]], None] | None = None,
                       ) -> tuple[list[int], bool]:
        """Create the request `key` and its jobs, once; returns (job ids, created now). A key
        that exists already gives its jobs' ids and False (a schedule run created twice).
        `not_before` makes the jobs due then (a scheduled control), not now; `attach(session,
        rows)` adds what belongs with the new jobs in the same transaction (a control's
        command)."""
        with self._session.begin() as session:
            existing = session.scalar(select(JobRequestRecord).where(JobRequestRecord.key == key))
            if existing is not None:
                ids = session.scalars(select(JobRecord.id).where(
                    JobRecord.request_id == existing.id).order_by(JobRecord.id)).all()
                return list(ids), False
            request = JobRequestRecord(key=key, kind=kind, schedule=schedule, created_at=now,
                                       deadline=deadline)
            session.add(request)
            session.flush()
            rows = [JobRecord(
                request_id=request.id, kind=job.kind,
                state=(JobState.DONE if job.already_stored else JobState.QUEUED).value,
                priority=priority, device_mrid=job.device_mrid, route=job.route,
                reading_types=list(job.reading_types), window_start=job.start,
                window_end=job.end, read_start=(job.read_window or (job.start, job.end))[0],
                read_end=(job.read_window or (job.start, job.end))[1], attempts=0,
                max_attempts=max_attempts, rereads=0, next_attempt_at=not_before or now,
                deadline=deadline, created_at=now,
                finished_at=now if job.already_stored else None) for job in jobs]
            session.add_all(rows)
            session.flush()
            if attach is not None:
                attach(session, rows)
            return [row.id for row in rows], True

    def requeue_unfinished(self, engine_id: str | None = None) -> int:
        """Running jobs (of `engine_id`, or of every engine) back to queued; how many."""
        with self._session.begin() as session:
            query = update(JobRecord).where(JobRecord.state == JobState.RUNNING.value)
            if engine_id is not None:
                query = query.where(JobRecord.claimed_by == engine_id)
            result = session.execute(query.values(state=JobState.QUEUED.value, claimed_by=None))
            return result.rowcount

    def release(self, engine_id: str, job_ids: Iterable[int]) -> int:
        """Jobs `job_ids`, claimed by `engine_id` and not begun, back to queued; how many (a
        claim whose answer reached a dispatcher that had stopped meanwhile)."""
        with self._session.begin() as session:
            result = session.execute(update(JobRecord).where(
                JobRecord.id.in_(list(job_ids)), JobRecord.claimed_by == engine_id,
                JobRecord.state == JobState.RUNNING.value).values(
                state=JobState.QUEUED.value, claimed_by=None))
            return result.rowcount

    def claim(self, engine_id: str, limit: int, now: datetime,
              only: Iterable[int] | None = None,
              kinds: Iterable[str] | None = None,
              take_over: Iterable[int] = ()) -> tuple[list[Job], datetime | None]:
        """Up to `limit` due queued jobs, now running for `engine_id`, and when the next queued
        job falls due (None: none queued; with `only`, among those). Order: priority, then
        round-robin between the requests of one priority (each request's first job, then each
        one's second, ...), so a large request never holds a small one back. `only` restricts
        the claim to those ids, `kinds` to the job kinds the claiming engine can run;
        `take_over` ids may also be claimed while running for another engine (a work-queue
        message redelivered after its engine died: the message is the right to run the job,
        see cimhes.queue.job_queue)."""
        take_over = list(take_over)
        runnable = JobRecord.state == JobState.QUEUED.value
        if take_over:
            runnable = runnable | ((JobRecord.state == JobState.RUNNING.value)
                                   & JobRecord.id.in_(take_over))
        with self._session.begin() as session:
            turn = func.row_number().over(partition_by=JobRecord.request_id,
                                          order_by=JobRecord.id).label("turn")
            due = (select(JobRecord.id, JobRecord.priority, turn)
                   .where(runnable, JobRecord.next_attempt_at <= now))
            if only is not None:
                only = list(only)
                due = due.where(JobRecord.id.in_(only))
            if kinds is not None:
                due = due.where(JobRecord.kind.in_(list(kinds)))
            due = due.subquery()
            ids = session.scalars(select(due.c.id).order_by(due.c.priority, due.c.turn, due.c.id)
                                  .limit(limit)).all()
            jobs: list[Job] = []
            if ids:
                session.execute(update(JobRecord).where(
                    JobRecord.id.in_(ids), runnable).values(
                    state=JobState.RUNNING.value, claimed_by=engine_id, started_at=now))
                rows = session.execute(
                    select(JobRecord, JobRequestRecord.key, Device)
                    .join(JobRequestRecord, JobRequestRecord.id == JobRecord.request_id)
                    .outerjoin(Device, Device.mrid == JobRecord.device_mrid)
                    .where(JobRecord.id.in_(ids))).all()
                by_id = {}
                unknown = []
                for job, key, device in rows:
                    if device is None:
                        unknown.append(job.id)
                        continue
                    by_id[job.id] = _job(job, key, device.address())
                if unknown:  # a device removed from the inventory since: nothing to run
                    session.execute(update(JobRecord).where(JobRecord.id.in_(unknown)).values(
                        state=JobState.FAILED.value, finished_at=now,
                        last_error="device no longer in the inventory"))
                jobs = [by_id[i] for i in ids if i in by_id]
            pending = select(func.min(JobRecord.next_attempt_at)).where(
                JobRecord.state == JobState.QUEUED.value)
            if kinds is not None:
                pending = pending.where(JobRecord.kind.in_(list(kinds)))
            if only is not None:
                pending = pending.where(JobRecord.id.in_(only))
            next_due = session.scalar(pending)
            return jobs, next_due

    def states(self, ids: Iterable[int]) -> dict[int, tuple[str, datetime, str | None]]:
        """(state, next attempt time, claimed_by) of each job id that exists."""
        with self._session() as session:
            return {row.id: (row.state, row.next_attempt_at, row.claimed_by)
                    for row in session.execute(
                        select(JobRecord.id, JobRecord.state, JobRecord.next_attempt_at,
                               JobRecord.claimed_by).where(JobRecord.id.in_(list(ids))))}

    def device_of(self, job_id: int) -> str | None:
        with self._session() as session:
            return session.scalar(select(JobRecord.device_mrid).where(JobRecord.id == job_id))

    def cancel_jobs(self, ids: Iterable[int], now: datetime, why: str) -> int:
        """Cancel these jobs if unfinished (an on-demand caller stopped waiting); how many."""
        with self._session.begin() as session:
            return session.execute(update(JobRecord).where(
                JobRecord.id.in_(list(ids)),
                JobRecord.state.in_([JobState.QUEUED.value, JobState.RUNNING.value])).values(
                state=JobState.CANCELLED.value, finished_at=now, last_error=why[:1024])).rowcount

    def settle(self, completions: Sequence[Completion], engine_id: str) -> list[int]:
        """Apply the dispatcher's decisions in one transaction; each only if its job is still
        running for `engine_id` (a job cancelled or handed to another engine meanwhile is left
        alone). Returns the ids whose change was applied."""
        applied = []
        with self._session.begin() as session:
            # Which of them are still ours, locked (FOR UPDATE; SQLite's one writer holds the
            # whole database already); the finished ones are then written by one statement
            # executed for many rows, retries and re-reads (rare) one by one below.
            # The two statements are built once (`_SETTLE_OURS`, `_SETTLE_FINISHED`): a batch
            # costs their execution, not their construction and cache keys.
            ours: set[int] = set()
            ids = [c.job_id for c in completions]
            for at in range(0, len(ids), _IDS_PER_QUERY):
                ours.update(session.scalars(_SETTLE_OURS, {
                    "b_ids": ids[at:at + _IDS_PER_QUERY], "b_engine": engine_id}))
            finished = [c for c in completions
                        if c.job_id in ours and c.state is not JobState.QUEUED]
            if finished:
                session.connection().execute(
                    _SETTLE_FINISHED,
                    [{"b_id": c.job_id, "b_engine": engine_id, "b_state": c.state.value,
                      "b_attempts": c.attempts, "b_error": c.error[:1024] if c.error else None,
                      "b_missing": c.missing, "b_finished": c.finished_at} for c in finished])
                applied.extend(c.job_id for c in finished)
            for c in completions:
                if c.job_id not in ours or c.state is not JobState.QUEUED:
                    continue
                values: dict = {"state": c.state.value, "attempts": c.attempts,
                                "last_error": c.error[:1024] if c.error else None,
                                "missing": c.missing, "next_attempt_at": c.next_attempt_at,
                                "claimed_by": None}
                if c.read_window is not None:
                    values.update(read_start=c.read_window[0], read_end=c.read_window[1])
                if c.reread:
                    values["rereads"] = JobRecord.rereads + 1
                result = session.execute(update(JobRecord).where(
                    JobRecord.id == c.job_id, JobRecord.state == JobState.RUNNING.value,
                    JobRecord.claimed_by == engine_id).values(**values))
                if result.rowcount:
                    applied.append(c.job_id)
        return applied

    def narrowed_to_missing(self, jobs: Sequence[NewJob]) -> list[NewJob]:
        """The read jobs of a collection, each narrowed to what the store does not hold yet
        over its window: a meter that pushed its whole profile (or was read already) gets a job
        created done, one that pushed part of it a read window spanning its gaps only, one
        with nothing stored its job as given. Only jobs whose reading types are all interval
        types over a closed window are narrowed (a register has no grid to be complete on).
        One grouped count over the window finds the complete and the untouched meters; only
        the partly stored ones are looked at interval by interval."""
        def steps_of(job: NewJob) -> dict[str, timedelta] | None:
            if job.kind != "read" or not job.reading_types or job.start is None \
                    or job.end is None:
                return None
            steps = {t: interval_length(t) for t in job.reading_types}
            return None if any(step is None for step in steps.values()) else steps

        narrowable = [(job, steps) for job in jobs if (steps := steps_of(job)) is not None]
        if not narrowable:
            return list(jobs)
        start = min(job.start for job, _ in narrowable)
        end = max(job.end for job, _ in narrowable)
        types = sorted({t for job, _ in narrowable for t in job.reading_types})
        wanted = {job.device_mrid for job, _ in narrowable}
        with self._session() as session:
            counts = {(mrid, t): n for mrid, t, n in session.execute(
                select(Device.mrid, ReadingRecord.reading_type, func.count())
                .join(Device, Device.id == ReadingRecord.device_id)
                .where(ReadingRecord.reading_type.in_(types), ReadingRecord.timestamp > start,
                       ReadingRecord.timestamp <= end)
                .group_by(Device.mrid, ReadingRecord.reading_type)) if mrid in wanted}
        narrowed: dict[int, NewJob] = {}
        for job, steps in narrowable:
            if not any((job.device_mrid, t) in counts for t in steps):
                continue  # nothing stored: read it all
            if job.start != start or job.end != end or any(
                    counts.get((job.device_mrid, t), 0)
                    < len(expected_times(start, end, step)) for t, step in steps.items()):
                stored = self.stored_times(job.device_mrid, list(steps), job.start, job.end)
                gaps = {t: missing_ranges(job.start, job.end, step, stored[t])
                        for t, step in steps.items()}
                window = span(gaps)
            else:
                window = None
            narrowed[id(job)] = (replace(job, already_stored=True) if window is None
                                 else replace(job, read_window=window))
        return [narrowed.get(id(job), job) for job in jobs]

    def stored_times(self, device_mrid: str, reading_types: Sequence[str], start: datetime,
                     end: datetime) -> dict[str, set[datetime]]:
        """The interval timestamps stored for a device in start < t <= end, per reading type."""
        found: dict[str, set[datetime]] = {t: set() for t in reading_types}
        with self._session() as session:
            rows = session.execute(
                select(ReadingRecord.reading_type, ReadingRecord.timestamp)
                .join(Device, Device.id == ReadingRecord.device_id)
                .where(Device.mrid == device_mrid, ReadingRecord.reading_type.in_(reading_types),
                       ReadingRecord.timestamp > start, ReadingRecord.timestamp <= end))
            for reading_type, timestamp in rows:
                found[reading_type].add(timestamp)
        return found

    def cancel(self, key: str, now: datetime) -> int:
        """Cancel a request's unfinished jobs; how many."""
        with self._session.begin() as session:
            request_id = session.scalar(select(JobRequestRecord.id).where(
                JobRequestRecord.key == key))
            if request_id is None:
                raise KeyError(f"no job request {key!r}")
            result = session.execute(update(JobRecord).where(
                JobRecord.request_id == request_id,
                JobRecord.state.in_([JobState.QUEUED.value, JobState.RUNNING.value])).values(
                state=JobState.CANCELLED.value, finished_at=now))
            return result.rowcount

    def progress(self, key: str) -> Progress:
        with self._session() as session:
            request_id = session.scalar(select(JobRequestRecord.id).where(
                JobRequestRecord.key == key))
            if request_id is None:
                raise KeyError(f"no job request {key!r}")
            counts = dict(session.execute(
                select(JobRecord.state, func.count()).where(JobRecord.request_id == request_id)
                .group_by(JobRecord.state)).all())
            incomplete = session.scalar(select(func.count()).where(
                JobRecord.request_id == request_id, JobRecord.state == JobState.DONE.value,
                JobRecord.missing.is_not(None)))
            return Progress(key, counts, incomplete or 0)

    def requests(self, limit: int = 20) -> list[tuple[str, str, datetime]]:
        """The latest job requests: (key, kind, created_at), newest first."""
        with self._session() as session:
            return [tuple(row) for row in session.execute(
                select(JobRequestRecord.key, JobRequestRecord.kind, JobRequestRecord.created_at)
                .order_by(JobRequestRecord.id.desc()).limit(limit))]

    def reports(self, key: str) -> list[JobReport]:
        """Per job of request `key`: its state, attempts, last error and what stays missing."""
        with self._session() as session:
            rows = session.scalars(
                select(JobRecord).join(JobRequestRecord,
                                       JobRequestRecord.id == JobRecord.request_id)
                .where(JobRequestRecord.key == key).order_by(JobRecord.id)).all()
            return [JobReport(r.device_mrid, r.state, r.attempts, r.rereads, r.last_error,
                              missing_from_json(r.missing)) for r in rows]


# `JobStore.settle`'s statements: which of the jobs given still run for this engine (locked), and
# each finished one's final state, written only if it still does.
_SETTLE_OURS = select(JobRecord.id).where(
    JobRecord.id.in_(bindparam("b_ids", expanding=True)),
    JobRecord.state == JobState.RUNNING.value,
    JobRecord.claimed_by == bindparam("b_engine")).with_for_update()
_SETTLE_FINISHED = (
    update(JobRecord.__table__)
    .where(JobRecord.__table__.c.id == bindparam("b_id"),
           JobRecord.__table__.c.state == JobState.RUNNING.value,
           JobRecord.__table__.c.claimed_by == bindparam("b_engine"))
    .values(state=bindparam("b_state"), attempts=bindparam("b_attempts"),
            last_error=bindparam("b_error"), missing=bindparam("b_missing"),
            finished_at=bindparam("b_finished")))


def missing_to_json(missing: dict[str, list[tuple[datetime, datetime]]]) -> dict | None:
    """The `missing` column's form: epoch-millisecond pairs per reading type (None: nothing)."""
    if not any(missing.values()):
        return None
    to_ms = EpochMillis().process_bind_param
    return {t: [[to_ms(s, None), to_ms(e, None)] for s, e in ranges]
            for t, ranges in missing.items() if ranges}


def missing_from_json(value: dict | None) -> dict[str, list[tuple[datetime, datetime]]]:
    from_ms = EpochMillis().process_result_value
    return {t: [(from_ms(s, None), from_ms(e, None)) for s, e in ranges]
            for t, ranges in (value or {}).items()}


def _job(row: JobRecord, key: str, device: DeviceAddress) -> Job:
    window = ((row.window_start, row.window_end) if row.window_start is not None else None)
    read_window = ((row.read_start, row.read_end) if row.read_start is not None else None)
    return Job(id=row.id, request_key=key, kind=row.kind, priority=row.priority, device=device,
               route=row.route, reading_types=tuple(row.reading_types), window=window,
               read_window=read_window, attempts=row.attempts, max_attempts=row.max_attempts,
               rereads=row.rereads, deadline=row.deadline)


__all__ = ["JobState", "Priority", "JobRequestRecord", "JobRecord", "NewJob", "Job", "Progress",
           "JobReport", "Completion", "JobStore", "missing_to_json", "missing_from_json"]
