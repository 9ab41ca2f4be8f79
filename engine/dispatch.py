"""The dispatcher: claims due jobs from the store and runs them as device sessions under the limits.

Order. Claimed jobs wait in a `FairQueue`: strictly by priority (controls, on-demand, then
scheduled), and within a priority round-robin between the requests the jobs serve, one job per
request per turn (a request just arrived takes the next turn), so a one-meter call is never
stuck behind a 5,000-meter one. The store's `claim` hands jobs out in the same order, so the
fairness holds beyond the prefetched few. The share: while another request of the same
priority has a job that may start, no request starts a session beyond its share of the
session bound (`EngineSettings.request_session_share` of `max_sessions`, at least one; a
session counts against the request of the job it was started for); a lone request, or one
whose rivals all wait on something else (their device, route or gap), may use every session.
Running sessions are never cut short: a request holding more than its share when another
arrives gives the slots back as its sessions end, and each goes to the waiting request.

Sessions. A job starts only when `ConnectionBounds` allows its device (sessions open at once,
per route, the gap since the device's last connection); a refused job stays queued and the
dispatcher sleeps on one timer until the soonest moment something may start. New connections
are then paced by the drivers' `ConnectionPacer`, and each session is bounded by their
`SessionLimits`. When a job for a
device starts, every other claimed read job for that device over the same window joins it: one
association reads the union of their reading types, and each job gets its own share.

Other kinds. A job of a kind registered in `Dispatcher.runners` (controls: engine/controls.py)
is run by its runner, alone in its session, under the same bounds and order; the runner returns
a `RunResult` (its final state or a retry, and what waiters get) and the dispatcher settles it.
A kind in `Dispatcher.session_runners` (event-log fetches: engine/event_fetches.py) is batched
as reads are (the jobs of one device over one window share the session) and run by its runner;
a session that fails is retried or failed by the same rule as a read's.

Outcomes. After a session the readings are stored (`ReadingWriter`, idempotent), then each job
is settled in one batched transaction on the store thread: done; re-read later (intervals still
missing and the deadline not reached: the next read covers exactly the gaps); retried with
exponential backoff and jitter; or failed with the last error. Whoever waits for a job (an
on-demand request) gets a `JobOutcome` once the job is finished.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from operator import attrgetter

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from cimhes.cim.meter_readings import IntervalBlock, MeterReading
from cimhes.drivers import MeterReadResult, driver_for
from cimhes.drivers.errors import (
    AssociationRefused,
    DeviceError,
    ObjectUnavailable,
    UnsupportedReadingType,
)
from cimhes.drivers.limits import DEFAULT_CONNECTIONS_PER_SECOND, ConnectionPacer, SessionLimits
from cimhes.drivers.security import HeadEndSecurity
from cimhes.engine import redaction
from cimhes.engine.concentrators import apply_concentrator_bounds, concentrator_bounds
from cimhes.engine.jobs import Completion, Job, JobState, JobStore, missing_to_json
from cimhes.engine.limits import ConnectionBounds, EngineSettings
from cimhes.engine.reread import interval_length, missing_ranges, span
from cimhes.engine.store import ReadingWriter, StoreRunner

log = logging.getLogger(__name__)

URGENT_CLAIM = 50  # a new request of at most this many jobs is claimed at once (`wake`)
SETTLE_BATCH = 100  # job outcomes written per store transaction
CLAIM_BATCH = 250  # jobs claimed per store transaction
# Sessions started in one reactor turn; more go on in the next. A claim's 250 jobs started at
# once were one call of ~60 ms of the reactor at 2,000 sessions (bench/sessions.py --stalls).
STARTS_PER_TURN = 32

# AARE result 1: rejected-permanent (a wrong password stays wrong): not worth a retry.
_REJECTED_PERMANENT = 1


@dataclass
class JobOutcome:
    """A finished job: its final state, its share of what was read (None if nothing was), the
    error that failed it or that kept its readings out of the store, and what stays missing."""

    job: Job
    state: JobState
    result: MeterReadResult | None = None
    error: BaseException | None = None
    missing: dict[str, list[tuple[datetime, datetime]]] = field(default_factory=dict)
    next_attempt_at: datetime | None = None  # state QUEUED: when it is tried again


@dataclass(frozen=True)
class RunResult:
    """What a runner decided for its job: DONE, FAILED, or QUEUED again at `next_attempt_at`;
    `value` goes to the job's waiters, `error` is the device error (if any) that made it."""

    state: JobState
    value: object = None
    error: BaseException | None = None
    error_text: str | None = None
    next_attempt_at: datetime | None = None


# A runner of one job kind: run(job) -> Deferred[RunResult]; it must not fail its Deferred for a
# device problem (that is a RunResult), and its own durable writes come before it returns.
JobRunner = Callable[[Job], Deferred]
# A runner of one session for jobs of one device over one window: run(batch) ->
# Deferred[list[RunResult]] (one per job, its durable writes done), or failed with the error
# that failed the whole session (settled as a failed read: retried with backoff, or failed).
SessionRunner = Callable[[list[Job]], Deferred]


class FairQueue:
    """Claimed jobs waiting for a session: by priority, then round-robin between requests."""

    def __init__(self) -> None:
        self._levels: dict[int, OrderedDict[str, deque[Job]]] = {}
        self._by_device: dict[str, list[Job]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, job: Job) -> None:
        level = self._levels.setdefault(job.priority, OrderedDict())
        if job.request_key not in level:
            # A request that has just arrived takes the next turn, ahead of those being served.
            level[job.request_key] = deque()
            level.move_to_end(job.request_key, last=False)
        level[job.request_key].append(job)
        self._by_device.setdefault(job.device.mrid, []).append(job)
        self._count += 1

    def take(self, wait_for: Callable[[Job], float | None],
             holds_share: Callable[[str], bool] = lambda key: False,
             ) -> tuple[Job | None, float | None]:
        """The first job `wait_for` lets start now (0), and its request's turn passes; else
        None and the soonest positive wait reported (None if every job waits on a session).
        A request that `holds_share` (it has its share of the sessions open) is passed over
        while a request of the same priority has a job that may start now; it gets the
        session only when none has."""
        soonest: float | None = None
        blocked: set[tuple[str, str | None]] = set()
        for priority in sorted(self._levels):
            requests = self._levels[priority]
            passed_over: tuple[Job, str] | None = None
            for key in list(requests):
                holding = holds_share(key)
                if holding and passed_over is not None:
                    continue  # one candidate over its share is enough to fall back on
                for job in requests[key]:
                    if (job.device.mrid, job.route) in blocked:
                        continue
                    wait = wait_for(job)
                    if wait == 0:
                        if holding:
                            passed_over = (job, key)
                            break
                        return self._taken(job, key), None
                    blocked.add((job.device.mrid, job.route))
                    if wait is not None and (soonest is None or wait < soonest):
                        soonest = wait
            if passed_over is not None:
                return self._taken(*passed_over), None
        return None, soonest

    def _taken(self, job: Job, key: str) -> Job:
        requests = self._levels[job.priority]
        self._remove(job)
        if key in requests:
            requests.move_to_end(key)
        return job

    def take_device(self, mrid: str, joins: Callable[[Job], bool]) -> list[Job]:
        """Every waiting job for device `mrid` that `joins` accepts (to share one session)."""
        jobs = [job for job in self._by_device.get(mrid, ()) if joins(job)]
        for job in jobs:
            self._remove(job)
        return jobs

    def drain(self) -> list[Job]:
        jobs = [job for level in self._levels.values() for q in level.values() for job in q]
        for job in jobs:
            self._remove(job)
        return jobs

    def _remove(self, job: Job) -> None:
        requests = self._levels[job.priority]
        queue = requests[job.request_key]
        queue.remove(job)
        if not queue:
            del requests[job.request_key]
            if not requests:
                del self._levels[job.priority]
        same_device = self._by_device[job.device.mrid]
        same_device.remove(job)
        if not same_device:
            del self._by_device[job.device.mrid]
        self._count -= 1


def _route_bounds(store) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """The routes' own session bounds by name, and the concentrators' by (host, port)."""
    return store.route_session_limits(), concentrator_bounds(store)


class Dispatcher:
    """Runs the store's jobs in this process (see the module docstring)."""

    def __init__(self, reactor, runner: StoreRunner, settings: EngineSettings | None = None, *,
                 max_sessions: int = 200, session_limits: SessionLimits | None = None,
                 connections_per_second: float = DEFAULT_CONNECTIONS_PER_SECOND,
                 security: HeadEndSecurity | None = None, engine_id: str | None = None,
                 now: Callable[[], datetime] | None = None,
                 jitter: Callable[[], float] = random.random, observer=None):
        self._reactor = reactor
        self._runner = runner
        self.jobs = JobStore(runner.store)
        self.settings = settings or EngineSettings()
        self.engine_id = engine_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._jitter = jitter
        self.bounds = ConnectionBounds(max_sessions, self.settings, reactor.seconds)
        self.session_limits = session_limits or SessionLimits()
        self._pacer = ConnectionPacer(reactor, connections_per_second)
        self._security = security  # for HLS-GMAC meters: system title, counter book
        self._queue = FairQueue()
        self._in_session = 0  # jobs (not sessions) being worked on
        # Sessions open per request (the request of the job a session was started for), and
        # how many one request may hold while another waits.
        self._open_by_request: Counter[str] = Counter()
        self.session_share = self.settings.session_share(max_sessions)
        self._waiters: dict[int, list[Deferred]] = {}
        self._writer = ReadingWriter(runner, self._now)
        self._settling: list[tuple[Completion, JobOutcome]] = []
        self._settle_running = False
        self._few_settle_running = False  # a small request's own settle (`_settle_few`)
        self._settling_keys: set[str] = set()  # the requests of the batch being settled
        self._claiming = False
        self._wanted_claim = False
        self._timer = None
        self._next_turn = None  # `_dispatch_next_turn`'s call
        self._poll = LoopingCall(self.wake)
        self._stopped = True
        self.sessions_started = 0
        # Called after each batch of jobs is settled (a progress display's cue).
        self.on_settled: Callable[[], object] | None = None
        # Called with the job a session was just started for (its sessions_of counted).
        self.on_session_started: Callable[[Job], object] | None = None
        # observer.device_read(device, error or None) after each session: the device status,
        # metrics and failure log (engine/device_status.py).
        self._observer = observer
        # Job kind -> its runner, for every kind but "read" (engine/controls.py registers
        # "control").
        self.runners: dict[str, JobRunner] = {}
        # Job kind -> the runner of its sessions (engine/event_fetches.py registers "events").
        self.session_runners: dict[str, SessionRunner] = {}

    # -- the face ----------------------------------------------------------------------------

    def start(self, requeue: bool = True, poll: bool = False) -> Deferred:
        """Start dispatching. With `requeue` (one engine owns the store), jobs left running by
        an earlier process go back to the queue first: a restart resumes every unfinished job.
        Jobs made in this process wake the dispatcher themselves, and retries and re-reads set
        its timer; `poll` also asks the store every `poll_interval` seconds, for jobs that
        other processes write."""
        self._stopped = False
        started = (self._runner.call(self.jobs.requeue_unfinished) if requeue
                   else succeed(0))
        # The routes' own session bounds (concentrators), as the inventory stored them.
        started.addCallback(lambda requeued: self._runner.call(
            _route_bounds, self._runner.store).addCallback(self._route_limits, requeued))

        def go(requeued):
            if requeued:
                log.info("engine %s: %d unfinished jobs requeued", self.engine_id, requeued)
            if self._stopped:
                return requeued
            if poll:
                self._poll.start(self.settings.poll_interval, now=True)
            else:
                self.wake()
            return requeued
        return started.addCallback(go)

    def _route_limits(self, limits, requeued):
        route_limits, concentrators = limits
        self.bounds.route_limits = dict(route_limits)
        # Each concentrator's link bounds every session on it too (engine/concentrators.py).
        apply_concentrator_bounds(self._reactor, concentrators)
        return requeued

    def stop(self) -> None:
        self._stopped = True
        if self._poll.running:
            self._poll.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._next_turn is not None and self._next_turn.active():
            self._next_turn.cancel()

    def wait(self, job_id: int) -> Deferred:
        """Deferred[JobOutcome] firing when job `job_id` is finished by this dispatcher."""
        waiter = Deferred()
        self._waiters.setdefault(job_id, []).append(waiter)
        return waiter

    def forget(self, job_id: int) -> None:
        """Nobody waits for job `job_id` any more (it was cancelled before it ran)."""
        self._waiters.pop(job_id, None)

    @property
    def pacer(self) -> ConnectionPacer:
        return self._pacer

    @property
    def security(self) -> HeadEndSecurity | None:
        return self._security

    def submitted(self, job_ids) -> None:
        """Jobs `job_ids` were just written to the store (a request, a schedule run): here,
        wake up for them; a process whose jobs run elsewhere hands them to the engines instead
        (cimhes.queue.job_queue.JobFeed)."""
        self.wake(job_ids)

    def wake(self, job_ids=None) -> None:
        """New or due jobs may be in the store: claim and dispatch what the limits allow.
        `job_ids` of a small new request (at most URGENT_CLAIM) are claimed at once, even
        when the prefetched queue is full of a large request's jobs, so they wait in the
        FairQueue for their turn rather than for room in it."""
        if self._stopped:
            return
        if job_ids is not None and 0 < len(job_ids) <= URGENT_CLAIM:
            claimed = self._runner.call(self.jobs.claim, self.engine_id, len(job_ids),
                                        self._now(), only=list(job_ids))

            def got(result):
                jobs, next_due = result
                if self._stopped:
                    self._give_back(jobs)
                    return
                for job in jobs:
                    self._queue.push(job)
                if next_due is not None and next_due > self._now():  # one of them is due later
                    self._wake_at((next_due - self._now()).total_seconds())
                self._dispatch()
                self._claim()

            def failed(failure):
                log.error("claiming jobs failed: %s", redaction.log_line(failure))
                self._claim(force=True)
            claimed.addCallbacks(got, failed)
            # Its jobs are claimed by id: a claim of everything due now (a large request's
            # jobs, 250 at a time) would only stand in the store's way of its next steps.
            self._dispatch()
            return
        self._dispatch()
        self._claim(force=True)

    # -- claiming ----------------------------------------------------------------------------

    def _claim(self, force: bool = False) -> None:
        """Claim jobs up to the target (the prefetch, at least every session's worth). Each
        claim is a unit of work of at most CLAIM_BATCH jobs, and an ended session or a settled
        batch asks for one only once half the target is free (`force`: new jobs were written,
        claim now): a claim per ended session cost the store's thread as much as the writes,
        and every small request's store work waited behind them."""
        target = max(self.settings.prefetch, self.bounds.max_sessions)
        room = target - len(self._queue) - self._in_session
        if room <= 0 or (not force and room < target // 2):
            return
        if self._claiming:
            self._wanted_claim = self._wanted_claim or force  # new jobs: claim again after
            return
        self._claiming = True
        self._wanted_claim = False
        size = min(room, CLAIM_BATCH)
        claimed = self._claim_call(size)

        def got(result):
            jobs, next_due = result
            if self._stopped:
                self._give_back(jobs)
                return False
            for job in jobs:
                self._queue.push(job)
            # A job due later sets the timer; one due now that did not fit is claimed once
            # sessions free room (a timer at once would claim again at every turn).
            if next_due is not None and next_due > self._now():
                self._wake_at((next_due - self._now()).total_seconds())
            return len(jobs) == size

        def done(full):
            self._claiming = False
            if isinstance(full, Failure):
                log.error("claiming jobs failed: %s", redaction.log_line(full))
                return None
            self._dispatch()
            if full or self._wanted_claim:
                self._claim(force=self._wanted_claim)
            return None
        claimed.addCallback(got).addBoth(done)

    def _give_back(self, jobs) -> None:
        """Jobs a claim brought after `stop`: queued again for whichever engine runs next
        (the claim was in the store's queue when the dispatcher stopped)."""
        if not jobs:
            return
        released = self._runner.call(self.jobs.release, self.engine_id, [j.id for j in jobs])
        released.addErrback(lambda f: log.error("giving back %d jobs claimed after the stop "
                                                "failed: %s", len(jobs), redaction.log_line(f)))

    def _claim_call(self, room: int) -> Deferred:
        """Deferred[(jobs, next due)]: the store's claim (a fed engine claims what it was handed).
        Only the kinds this process can run: a dispatcher without a control service (a
        `collect` process) must leave controls to one that has it."""
        # In the bulk lane: a claim of up to CLAIM_BATCH jobs takes tens of ms, and the
        # prefetch (claims start once half of it is free) leaves seconds of work meanwhile.
        return self._runner.call_bulk(self.jobs.claim, self.engine_id, room, self._now(),
                                      kinds=("read", *self.runners, *self.session_runners))

    def sessions_of(self, request_key: str) -> int:
        """Sessions open now for request `request_key`."""
        return self._open_by_request[request_key]

    def _holds_share(self, request_key: str) -> bool:
        return self._open_by_request[request_key] >= self.session_share

    def _opened(self, job: Job) -> None:
        self._open_by_request[job.request_key] += 1
        if self.on_session_started is not None:
            self.on_session_started(job)

    def _closed(self, request_key: str) -> None:
        left = self._open_by_request[request_key] - 1
        if left > 0:
            self._open_by_request[request_key] = left
        else:
            del self._open_by_request[request_key]

    def _may_start(self, job: Job) -> float | None:
        """0 if `job`'s session may start now (see ConnectionBounds.wait_for)."""
        return self.bounds.wait_for(job.device.mrid, job.route)

    def _session_ended(self, route: str | None) -> None:
        """A session on `route` ended (a hook for limits held outside this process)."""

    def _left(self, outcome: JobOutcome, applied: bool | None) -> None:
        """`outcome` was settled (also a retry or a re-read, state QUEUED); `applied`: the
        store took it (the job was still ours); None: the settling itself failed."""

    def _wake_at(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._reactor.seconds() + seconds:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(seconds, self.wake)

    # -- sessions ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        started = 0
        while not self._stopped:
            if self.bounds.open >= self.bounds.max_sessions:
                return  # no job may start (take would ask each queued one, to hear the same)
            if started >= STARTS_PER_TURN:
                self._dispatch_next_turn()
                return
            started += 1
            job, wait = self._queue.take(self._may_start, self._holds_share)
            if job is None:
                if wait is not None:
                    self._wake_at(wait)
                return
            if job.kind in self.runners:
                self._start_run(job)
                continue
            # Jobs over the same window share the association; a different window would change
            # what the others get (a register asked with a window is read from its history).
            batch = [job] + self._queue.take_device(
                job.device.mrid,
                lambda other: other.kind == job.kind and other.read_window == job.read_window)
            self._start_session(batch)

    def _dispatch_next_turn(self) -> None:
        """Go on starting sessions in the reactor's next turn (one call pending at most)."""
        if self._next_turn is None or not self._next_turn.active():
            self._next_turn = self._reactor.callLater(0, self._dispatch)

    def _start_session(self, batch: list[Job]) -> None:
        device = batch[0].device
        route = batch[0].route
        key = batch[0].request_key
        self.bounds.started(device.mrid, route)
        self._opened(batch[0])
        self.sessions_started += 1
        self._in_session += len(batch)
        reading_types, start, end = _merged(batch)
        runner = self.session_runners.get(batch[0].kind)
        try:
            reading = runner(batch) if runner is not None else driver_for(
                device.device_type).read(self._reactor, device, reading_types, start, end,
                                         self.session_limits, self._pacer, self._security)
        except Exception:  # a driver that raises instead of failing its Deferred
            reading = Deferred()
            reading.errback(Failure())

        def ended(result):
            self.bounds.ended(device.mrid, route)
            self._closed(key)
            self._session_ended(route)
            if self._observer is not None:
                self._observer.device_read(
                    device, result.value if isinstance(result, Failure) else None)
            self._dispatch()
            self._claim()
            if isinstance(result, Failure):
                self._failed(batch, result.value)
                return None
            if runner is not None:  # one RunResult per job, stored by the runner
                self._queue_settle(list(zip(batch, result, [None] * len(batch))))
                return None
            stored = self._writer.save(result.meter_reading, batch[0].request_key)
            stored.addBoth(lambda saved: self._read(batch, result, saved))
            return None
        reading.addBoth(ended)

    def _start_run(self, job: Job) -> None:
        device, route = job.device, job.route
        self.bounds.started(device.mrid, route)
        self._opened(job)
        self.sessions_started += 1
        self._in_session += 1
        try:
            running = self.runners[job.kind](job)
        except Exception:  # a runner that raises instead of failing its Deferred
            running = Deferred()
            running.errback(Failure())

        def ended(result):
            self.bounds.ended(device.mrid, route)
            self._closed(job.request_key)
            if isinstance(result, Failure):
                log.error("%s job %d for %s failed: %s", job.kind, job.id, device.mrid,
                          redaction.log_line(result))
                result = RunResult(JobState.FAILED, error=result.value,
                                   error_text=f"internal error: {redaction.summary(result.value)}")
            if self._observer is not None:
                error = result.error if isinstance(result.error, DeviceError) else None
                self._observer.device_read(device, error)
            self._dispatch()
            self._claim()
            self._queue_settle([(job, result, None)])
            return None
        running.addBoth(ended)

    # -- outcomes ----------------------------------------------------------------------------

    def _read(self, batch: list[Job], result: MeterReadResult, saved) -> None:
        if isinstance(saved, Failure):
            log.error("storing the readings of %s failed: %s", batch[0].device.mrid,
                      redaction.log_line(saved))
            self._failed(batch, saved.value, shares=[_share(result, job) for job in batch])
            return
        self._queue_settle([(job, _share(result, job), None) for job in batch])

    def _failed(self, batch: list[Job], error: BaseException, shares=None) -> None:
        shares = shares or [None] * len(batch)
        self._queue_settle([(job, share, error) for job, share in zip(batch, shares)])

    def _queue_settle(self, items) -> None:
        self._in_session -= len(items)
        self._settling.extend(items)
        if not self._few_settle_running:
            self._settle_few()
        if not self._settle_running:
            self._settle_next()

    def _settle_few(self) -> None:
        # A request with at most ReadingWriter.FEW jobs waiting to be settled, beside one with
        # more (waiting or being settled), is settled in a transaction of its own in the store's first lane: its caller
        # waits for its own rows, not for a large request's batch of SETTLE_BATCH behind the
        # bulk lane's readings.
        waiting = Counter(item[0].request_key for item in self._settling)
        few = {key for key, count in waiting.items()
               if count <= ReadingWriter.FEW and key not in self._settling_keys}
        if not few or not (set(waiting) - few or self._settling_keys):
            return  # no larger request's batch waiting or being written: the usual way
        batch = [item for item in self._settling if item[0].request_key in few]
        self._settling = [item for item in self._settling if item[0].request_key not in few]
        self._few_settle_running = True

        def next_few():
            self._few_settle_running = False
            self._settle_few()
        self._settle(batch, self._runner.call, next_few)

    def _settle_next(self) -> None:
        # At most SETTLE_BATCH jobs a transaction, taken round-robin between requests: a small
        # request's job is in the next batch, not behind a large one's backlog.
        by_request: dict[str, deque] = {}
        for item in self._settling:
            by_request.setdefault(item[0].request_key, deque()).append(item)
        batch = []
        while by_request and len(batch) < SETTLE_BATCH:
            for key in list(by_request):
                batch.append(by_request[key].popleft())
                if not by_request[key]:
                    del by_request[key]
                if len(batch) >= SETTLE_BATCH:
                    break
        taken = {id(item) for item in batch}
        self._settling = [item for item in self._settling if id(item) not in taken]
        self._settle_running = bool(batch)
        self._settling_keys = {item[0].request_key for item in batch}
        if not batch:
            return
        self._settle(batch, self._runner.call_bulk, self._settle_next)

    def _settle(self, batch, lane, then: Callable[[], None]) -> None:
        """Settle `batch` in one transaction on the store's `lane`, tell the waiters, `then`."""
        settled = lane(self._decide_and_settle, batch, self._now())

        def apply(result):
            if isinstance(result, Failure):
                log.error("settling %d jobs failed: %s", len(batch), redaction.log_line(result))
                outcomes = [JobOutcome(job, JobState.FAILED, share, result.value)
                            for job, share, _ in batch]
                applied = set()
            else:
                outcomes, applied = result
            for outcome in outcomes:
                self._left(outcome, None if isinstance(result, Failure)
                           else outcome.job.id in applied)
                if outcome.state is JobState.QUEUED:
                    continue
                if outcome.job.id not in applied and not isinstance(result, Failure):
                    continue  # cancelled or taken over meanwhile: not ours to report
                for waiter in self._waiters.pop(outcome.job.id, []):
                    waiter.callback(outcome)
            self._claim()
            then()
            if self.on_settled is not None:
                self.on_settled()
        settled.addBoth(apply)

    def _decide_and_settle(self, batch, now: datetime):
        """On the store thread: decide each job's next state (finding the intervals still
        missing from what the store now holds) and apply all decisions in one transaction."""
        completions = []
        outcomes = []
        for job, share, error in batch:
            if isinstance(share, RunResult):
                completion = Completion(
                    job.id, share.state, job.attempts + 1, now, error=share.error_text,
                    next_attempt_at=share.next_attempt_at)
                outcomes.append(JobOutcome(job, share.state, share.value, share.error))
            elif error is not None:
                completion = self._after_failure(job, error, now)
                outcomes.append(JobOutcome(job, completion.state, share, error))
            else:
                completion, missing = self._after_read(job, share, now)
                outcomes.append(JobOutcome(job, completion.state, share, None, missing))
            outcomes[-1].next_attempt_at = completion.next_attempt_at
            completions.append(completion)
        applied = set(self.jobs.settle(completions, self.engine_id))
        return outcomes, applied

    def _after_failure(self, job: Job, error: BaseException, now: datetime) -> Completion:
        attempts = job.attempts + 1
        text = str(error) if isinstance(error, DeviceError) else \
            f"internal error: {redaction.summary(error)}"
        retry_at = now + timedelta(seconds=self.settings.retry_wait(attempts, self._jitter))
        permanent = (isinstance(error, AssociationRefused)
                     and error.result == _REJECTED_PERMANENT)
        if (not permanent and attempts < job.max_attempts
                and (job.deadline is None or retry_at < job.deadline)):
            return Completion(job.id, JobState.QUEUED, attempts, now, error=text,
                              next_attempt_at=retry_at)
        return Completion(job.id, JobState.FAILED, attempts, now, error=text)

    def _after_read(self, job: Job, share: MeterReadResult, now: datetime):
        attempts = job.attempts + 1
        error = "; ".join(str(e) for e in share.errors) or None
        missing = self._missing(job, share)
        reread_at = now + timedelta(seconds=self.settings.reread_delay)
        if missing and job.deadline is not None and reread_at < job.deadline:
            return Completion(job.id, JobState.QUEUED, attempts, now, error=error,
                              next_attempt_at=reread_at, read_window=span(missing),
                              missing=missing_to_json(missing), reread=True), missing
        return Completion(job.id, JobState.DONE, attempts, now, error=error,
                          missing=missing_to_json(missing)), missing

    def _missing(self, job: Job, share: MeterReadResult) -> dict:
        if job.window is None:
            return {}
        start, end = job.window
        if end is None:
            end = share.meter_reading.values_interval[1] if share.meter_reading.values_interval \
                else None
        unserved = {e.reading_type for e in share.errors
                    if isinstance(e, (UnsupportedReadingType, ObjectUnavailable))}
        steps = {t: interval_length(t) for t in job.reading_types if t not in unserved}
        steps = {t: step for t, step in steps.items() if step is not None}
        if not steps or end is None:
            return {}
        # What this read brought is stored already (the writer ran first): a type it brought
        # in full has no gap, whatever else the store holds, and costs no query.
        read = {block.reading_type: set(map(_timestamp, block.readings))
                for block in share.meter_reading.interval_blocks}
        gaps = {t: missing_ranges(start, end, step, read.get(t, ())) for t, step in steps.items()}
        short = [t for t, ranges in gaps.items() if ranges]
        if short:
            stored = self.jobs.stored_times(job.device.mrid, short, start, end)
            for t in short:
                gaps[t] = missing_ranges(start, end, steps[t], stored[t])
        return {t: ranges for t, ranges in gaps.items() if ranges}


_timestamp = attrgetter("timestamp")


def _merged(batch: list[Job]) -> tuple[list[str], datetime | None, datetime | None]:
    """One session's reading types and window for several jobs on one device."""
    if any(not job.reading_types for job in batch):
        reading_types: list[str] = []  # one job wants every type: so does the session
    else:
        reading_types = list(dict.fromkeys(t for job in batch for t in job.reading_types))
    windows = [job.read_window for job in batch if job.read_window is not None]
    if not windows:
        return reading_types, None, None
    start = min(w[0] for w in windows)
    ends = [w[1] for w in windows]
    return reading_types, start, None if any(e is None for e in ends) else max(ends)


def _share(result: MeterReadResult, job: Job) -> MeterReadResult:
    """The part of a merged session's result that `job` asked for."""
    reading = result.meter_reading
    wanted = set(job.reading_types)
    if not wanted and job.window is None:
        return result
    if (job.window == job.read_window and reading.interval_blocks and not result.errors
            and (not wanted or all(b.reading_type in wanted for b in reading.interval_blocks)
                 and all(r.reading_type in wanted for r in reading.readings))):
        return result  # the session read this job's window and types only: nothing to cut

    def asked(reading_type: str) -> bool:
        return not wanted or reading_type in wanted

    blocks = []
    window = job.window
    if window is not None:
        start, end = window
        for block in reading.interval_blocks:
            if asked(block.reading_type):
                blocks.append(IntervalBlock(block.reading_type, tuple(
                    r for r in block.readings
                    if start < r.timestamp and (end is None or r.timestamp <= end))))
    values_interval = reading.values_interval
    if window is not None and values_interval is not None:
        values_interval = (window[0], window[1] or values_interval[1])
    share = MeterReading(reading.meter, tuple(r for r in reading.readings if asked(r.reading_type)),
                         tuple(blocks), values_interval if blocks else None)
    errors = tuple(e for e in result.errors if asked(getattr(e, "reading_type", "")) or not wanted)
    return MeterReadResult(share, errors)
