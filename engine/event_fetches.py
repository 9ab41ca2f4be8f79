"""Event-log fetches as durable jobs: `EventFetchService` (built by the HeadEnd as
`head_end.event_fetches`).

A fetch of one meter's event logs over a period is a job of kind "events" in the job table
(engine/jobs.py): its window is the period (an open end: up to the meter's clock) and its
`reading_types` column holds the names of the event logs to read (drivers/idis_events.py
`EVENT_LOGS`; empty: every log). The dispatcher runs it like a read: by priority (on-demand
before scheduled), under the session, per-route (route leases across engines), per-device-gap
and connection-rate bounds; the "events" jobs of one meter over the same period that wait
together share one association, which reads the union of their logs. With `--role api` and
`--role engine` the api writes the jobs and an engine runs them (cimhes.queue.job_queue).

A session's events are stored through `EventStore.save_events` (the one way events are stored,
with their outbox rows for the DMS and the MDMs) before its jobs settle, each event once, so a
job run again after a crash stores nothing twice. A session that fails (timeout, connection,
association, protocol) is retried with backoff or failed by the dispatcher's rule for reads
(`EngineSettings`: an on-demand fetch is tried `on_demand_attempts` times, a scheduled one
`max_attempts` times within its run's deadline). A log the meter does not have is not a
failure: the job is done, with that log's error kept (`last_error`) and given to its waiters.

The face: `read` (wait for the logs of some devices, as GetEndDeviceEvents DataSource=meter
does), `submit` (store the jobs and hand them to the engine without waiting: a request keyed
once, as a scheduled run or a fetch asked for after a restart is).
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks

from cimhes.cim.message import Error, ErrorCode
from cimhes.drivers import DeviceAddress
from cimhes.drivers.errors import DeviceError, ObjectUnavailable
from cimhes.drivers.idis_events import EVENT_LOGS, read_events
from cimhes.engine import redaction
from cimhes.engine.dispatch import Dispatcher, RunResult
from cimhes.engine.jobs import Job, JobState, NewJob, Priority
from cimhes.engine.reading import BULK_JOBS, DEVICE_ERROR_CODES
from cimhes.engine.store import StoreRunner

JOB_KIND = "events"
REQUEST_KIND = "events"


@dataclass(frozen=True)
class EventFetch:
    """A finished fetch of one device's logs: how many events its logs held in the period
    (stored, each once), and one DeviceError per log the meter could not give."""

    device_mrid: str
    events: int
    errors: tuple[DeviceError, ...] = ()


@dataclass
class EventReadOutcome:
    """What `EventFetchService.read` gives: events read per device, one Error per device
    (or log) that could not be read."""

    events: int = 0
    errors: list[Error] = field(default_factory=list)


def checked_logs(logs: Sequence[str] | None) -> tuple[str, ...]:
    """The event-log names, each a name of EVENT_LOGS (ValueError naming a bad one); () = all."""
    names = tuple(dict.fromkeys(logs or ()))
    unknown = [name for name in names if name not in EVENT_LOGS]
    if unknown:
        raise ValueError(f"unknown event logs {unknown}; known: {sorted(EVENT_LOGS)}")
    return names


class EventFetchService:
    """Event-log fetches as jobs of the engine (see the module docstring)."""

    def __init__(self, reactor, runner: StoreRunner, dispatcher: Dispatcher, event_store, *,
                 now: Callable[[], datetime] | None = None):
        self._reactor = reactor
        self._runner = runner
        self.dispatcher = dispatcher
        self._events = event_store  # engine/events.py EventStore
        self._now = now or (lambda: datetime.now(timezone.utc))
        dispatcher.session_runners[JOB_KIND] = self._run

    # -- the face ----------------------------------------------------------------------------

    def submit(self, mrids: Sequence[str], start: datetime, end: datetime | None = None, *,
               logs: Sequence[str] | None = None, key: str | None = None,
               priority: int = Priority.ON_DEMAND, deadline: datetime | None = None,
               attempts: int | None = None) -> Deferred:
        """Deferred[(request key, job ids)]: one "events" job per known mRID (unknown ones are
        skipped), stored and handed to the engine; nothing waits for them. A `key` names the
        request, so asking twice (after a restart) makes its jobs once. `attempts` defaults to
        the engine's `on_demand_attempts` for on-demand priority, else `max_attempts`."""
        return self._submit(mrids, start, end, logs, key, priority, deadline, attempts,
                            wait=False).addCallback(lambda made: (made[0], made[1]))

    @inlineCallbacks
    def read(self, devices: Sequence[DeviceAddress], start: datetime,
             end: datetime | None = None, logs: Sequence[str] | None = None):
        """Deferred[EventReadOutcome]: every device's logs read over [start, end] as on-demand
        jobs, their events stored; one Error per device (or log) that could not be read."""
        outcome = EventReadOutcome()
        _key, _ids, waiting = yield self._submit([d.mrid for d in devices], start, end, logs,
                                               None, Priority.ON_DEMAND, None, None, wait=True)
        finished = yield gatherResults(waiting)
        for job in finished:
            mrid = job.job.device.mrid
            fetch = job.result
            if isinstance(fetch, EventFetch):
                outcome.events += fetch.events
                outcome.errors.extend(_device_error(mrid, e) for e in fetch.errors)
            else:
                outcome.errors.append(_device_error(mrid, job.error))
        return outcome

    # -- inside ------------------------------------------------------------------------------

    @inlineCallbacks
    def _submit(self, mrids, start, end, logs, key, priority, deadline, attempts, *, wait):
        if start is None or start.tzinfo is None or (end is not None and end.tzinfo is None):
            raise ValueError("an event-log fetch needs a timezone-aware start (and end)")
        logs = checked_logs(logs)
        asked = list(dict.fromkeys(mrids))
        found = yield self._runner.call(self._runner.store.find_devices, asked, [])
        known = [mrid for mrid in asked if mrid in found]
        routes = (yield self._runner.call(self._runner.store.routes_of, known)) if known else {}
        settings = self.dispatcher.settings
        if attempts is None:
            attempts = (settings.on_demand_attempts if priority <= Priority.ON_DEMAND
                        else settings.max_attempts)
        key = key or f"events:{uuid.uuid4()}"
        # A large request's job rows go in the store's bulk lane, as a large read's do.
        submit = self._runner.call_bulk if len(known) > BULK_JOBS else self._runner.call
        ids, _ = yield submit(
            self.dispatcher.jobs.create_request, key, REQUEST_KIND,
            [NewJob(mrid, logs, start, end, route=routes.get(mrid), kind=JOB_KIND)
             for mrid in known],
            priority=priority, max_attempts=attempts, now=self._now(), deadline=deadline)
        # Waiters first: an api process publishes a waited job with its reply queue.
        waiting = [self.dispatcher.wait(job_id) for job_id in ids] if wait else []
        self.dispatcher.submitted(ids)
        return key, ids, waiting

    def _run(self, batch: list[Job]) -> Deferred:
        """One association for the batch (one device, one period): read the union of its
        logs, store the events, one RunResult per job."""
        return Deferred.fromCoroutine(self._session(batch))

    async def _session(self, batch: list[Job]) -> list[RunResult]:
        first = batch[0]
        start, end = first.read_window or first.window
        wanted = [set(job.reading_types) for job in batch]
        logs = None if any(not w for w in wanted) else sorted(set().union(*wanted))
        dispatcher = self.dispatcher
        result = await read_events(self._reactor, first.device, start, end,
                                   dispatcher.session_limits, dispatcher.pacer, logs,
                                   dispatcher.security)
        await self._runner.call(self._events.save_events, list(result.events), "log",
                                self._now())
        by_log = {log.obis: name for name, log in EVENT_LOGS.items()}
        results = []
        for job, wants in zip(batch, wanted):
            events = sum(1 for e in result.events
                         if not wants or by_log.get(e.device_code.split(":")[0]) in wants)
            errors = tuple(e for e in result.errors if not wants or _log_of(e) in wants)
            results.append(RunResult(
                JobState.DONE, EventFetch(job.device.mrid, events, errors),
                errors[0] if errors else None,
                "; ".join(str(e) for e in errors) or None))
        return results


def _log_of(error: DeviceError) -> str | None:
    """The log name an ObjectUnavailable of drivers/idis_events.py is about."""
    what = getattr(error, "reading_type", "") or ""
    return what.removeprefix("event log ") if isinstance(error, ObjectUnavailable) else None


def _device_error(mrid: str, error: BaseException | None) -> Error:
    if isinstance(error, DeviceError):
        code = DEVICE_ERROR_CODES.get(type(error), ErrorCode.DEVICE_PROTOCOL_ERROR)
        return Error(code=code, reason=str(error), id=mrid, id_kind="uuid",
                     object_type="EndDevice")
    reason = (f"internal error while reading the event logs ({redaction.summary(error)})"
              if error is not None else "the event-log fetch did not finish")
    return Error(code=ErrorCode.INTERNAL_ERROR, reason=f"EndDevice {mrid}: {reason}", id=mrid,
                 id_kind="uuid", object_type="EndDevice")


__all__ = ["EventFetchService", "EventFetch", "EventReadOutcome", "JOB_KIND", "checked_logs"]
