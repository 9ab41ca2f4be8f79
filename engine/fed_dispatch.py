"""A dispatcher fed by a work queue: an engine process among several, over one shared store.

With `cimhes serve --role engine`, the engine does not look for work in the store: each job is
handed to it by a message of the RabbitMQ work queue (cimhes.queue.job_queue), and the message is
its right to run that job. `FedDispatcher.offer(job_id, redelivered)` takes such a job; the
returned Deferred fires once the job leaves this engine, with a `Departure` that says what the
consumer does with the message:

- "finished": the job is done, failed or cancelled, its readings stored and its state settled
  in the store: reply to whoever waits, then acknowledge;
- "waiting": a retry or a re-read is due at `next_attempt_at` (the store says so): publish the
  job again, delayed, then acknowledge (a message is never held unacknowledged for hours);
- "gone": nothing to run (finished already, unknown, or running on another engine that holds
  its own message): acknowledge;
- "requeue": the store could not be told (settling failed): reject with requeue, so some engine
  runs it again.

A redelivered message (its first consumer's channel closed without an ack: the engine died)
may take over a job still marked running for the dead engine (`JobStore.claim(take_over=...)`).
A first delivery of a job running elsewhere is a duplicate (a publish repeated after a crash)
and is dropped. Running a job twice is harmless anyway: readings are idempotent and only the
engine the store names may settle it.

Per-route bounds across engines: each session on a route needs a slot of the route's lease
(`RouteLeases`, engine/route_leases.py), taken on the store thread before the session starts,
kept while used, renewed every ttl/4 seconds, given back after a renewal period unused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from cimhes.engine import redaction
from cimhes.engine.dispatch import Dispatcher, Job, JobOutcome
from cimhes.engine.jobs import FINISHED, JobState
from cimhes.engine.route_leases import DEFAULT_LEASE_SECONDS, RouteLeases

log = logging.getLogger(__name__)

# After a refused slot, ask again this many seconds later (while jobs wait for the route).
LEASE_RETRY_SECONDS = 1.0


@dataclass
class Departure:
    """Why a job left this engine, and what its message becomes (see the module docstring)."""

    kind: str  # "finished" | "waiting" | "gone" | "requeue"
    job_id: int
    outcome: JobOutcome | None = None
    next_attempt_at: datetime | None = None


@dataclass
class _Offer:
    departure: Deferred
    redelivered: bool
    claimed: bool = False


class FedDispatcher(Dispatcher):
    """Runs the jobs handed to it (`offer`), under route leases shared with other engines."""

    def __init__(self, reactor, runner, settings=None, *,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, **kwargs):
        super().__init__(reactor, runner, settings, **kwargs)
        self._offers: dict[int, _Offer] = {}
        self.leases = RouteLeases(runner.store, self.settings.max_sessions_per_route,
                                  lease_seconds)
        self._held: dict[str, int] = {}  # route -> slots held
        self._used_since_renewal: set[str] = set()
        self._asking: set[str] = set()
        self._renewal = LoopingCall(self._renew)
        self._lease_seconds = lease_seconds

    # -- the face ----------------------------------------------------------------------------

    def start(self, requeue: bool = False, poll: bool = False) -> Deferred:
        """Never requeues (other engines' running jobs are theirs) and never polls."""
        self._renewal.start(self._lease_seconds / 4, now=False)
        return super().start(requeue=False, poll=False)

    def stop(self) -> None:
        super().stop()
        if self._renewal.running:
            self._renewal.stop()

    def release_leases(self) -> Deferred:
        """Give back every slot (on a clean stop), so other engines need not wait out the ttl."""
        self._held.clear()
        return self._runner.call(self.leases.release_all, self.engine_id)

    def offer(self, job_id: int, redelivered: bool = False) -> Deferred:
        """Deferred[Departure]: take job `job_id` (from a work-queue message) and run it."""
        if job_id in self._offers:  # the same job twice in this engine: keep the first
            return succeed(Departure("gone", job_id))
        offer = _Offer(Deferred(), redelivered)
        self._offers[job_id] = offer
        self.wake()
        return offer.departure

    @property
    def offered(self) -> int:
        return len(self._offers)

    # -- the dispatcher's hooks --------------------------------------------------------------

    def _claim_call(self, room: int) -> Deferred:
        wanted = [i for i, o in self._offers.items() if not o.claimed]
        if not wanted:
            return succeed(([], None))
        take_over = [i for i in wanted if self._offers[i].redelivered]
        now = self._now()

        def claim():
            jobs, next_due = self.jobs.claim(self.engine_id, room, now, only=wanted,
                                             take_over=take_over)
            claimed = {job.id for job in jobs}
            rest = [i for i in wanted if i not in claimed]
            return jobs, next_due, self.jobs.states(rest) if rest else {}

        def sort(result):
            jobs, next_due, states = result
            for job in jobs:
                self._offers[job.id].claimed = True
            for job_id in list(states) + [i for i in wanted if i not in states
                                          and i not in {j.id for j in jobs}]:
                state = states.get(job_id, (None, None, None))[0]
                if state == JobState.QUEUED.value:
                    continue  # not due yet: the timer claims it when it is
                if state == JobState.RUNNING.value and self._offers[job_id].redelivered:
                    continue  # left by the claim's limit this time round
                self._depart(Departure("gone", job_id))
            return jobs, next_due
        return self._runner.call(claim).addCallback(sort)

    def _may_start(self, job: Job) -> float | None:
        wait = self.bounds.wait_for(job.device.mrid, job.route)
        if wait != 0 or job.route is None:
            return wait
        if self._held.get(job.route, 0) > self.bounds.on_route(job.route):
            self._used_since_renewal.add(job.route)
            return 0.0
        self._ask_for_slot(job.route)
        return None

    def _left(self, outcome: JobOutcome, applied: bool | None) -> None:
        job_id = outcome.job.id
        if applied is None:
            self._depart(Departure("requeue", job_id))
        elif not applied:
            self._depart(Departure("gone", job_id))
        elif outcome.state is JobState.QUEUED:
            self._depart(Departure("waiting", job_id, outcome,
                                   next_attempt_at=outcome.next_attempt_at))
        else:
            self._depart(Departure("finished", job_id, outcome))

    # -- route slots -------------------------------------------------------------------------

    def _ask_for_slot(self, route: str) -> None:
        if route in self._asking:
            return
        self._asking.add(route)
        asked = self._runner.call(self.leases.acquire, route, self.engine_id, 1, self._now(),
                                  self.bounds.route_limit(route))

        def got(granted):
            self._asking.discard(route)
            if isinstance(granted, Failure):
                log.error("taking a session slot on route %s failed: %s", route,
                          redaction.log_line(granted))
                granted = 0
            if granted:
                self._held[route] = self._held.get(route, 0) + granted
                self.wake()
            else:  # the route is full over all engines: ask again soon
                self._wake_at(LEASE_RETRY_SECONDS)
        asked.addBoth(got)

    def _renew(self) -> Deferred:
        idle = {route: held - self.bounds.on_route(route)
                for route, held in self._held.items() if route not in self._used_since_renewal}
        idle = {route: count for route, count in idle.items() if count > 0}
        for route, count in idle.items():
            self._held[route] -= count
            if not self._held[route]:
                del self._held[route]
        self._used_since_renewal.clear()
        now = self._now()

        def renew():
            if idle:
                self.leases.release(self.engine_id, idle)
            return self.leases.renew(self.engine_id, now)

        def renewed(count):
            if isinstance(count, Failure):
                log.error("renewing route slots failed: %s", redaction.log_line(count))
            elif count < sum(self._held.values()):
                log.warning("engine %s: %d route slots had expired; taking them again",
                            self.engine_id, sum(self._held.values()) - count)
                self._held.clear()
        return self._runner.call(renew).addBoth(renewed)

    # -- departures --------------------------------------------------------------------------

    def _depart(self, departure: Departure) -> None:
        offer = self._offers.pop(departure.job_id, None)
        if offer is not None:
            offer.departure.callback(departure)


__all__ = ["Departure", "FedDispatcher", "FINISHED"]
