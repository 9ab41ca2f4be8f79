"""The engine's work queue on RabbitMQ: api processes hand jobs out, engine processes run them.

Jobs live in the shared store (engine/jobs.py); a message carries only a job's id. Topology
(declared by both sides, idempotently):

- ``cimhes.jobs``: durable queue, competing consumers. Every engine consumes it with manual
  acknowledgements and a prefetch (``--job-prefetch``): RabbitMQ hands each message to one
  engine, and an engine's unacknowledged messages go back to the others when its connection
  closes (it died, or its broker link did).
- ``cimhes.jobs.delay.<seconds>``: durable queues with that message TTL that dead-letter into
  ``cimhes.jobs``: a retry or re-read waits in the longest one not longer than its wait, and the
  engine that receives it holds the rest of the wait (a queue-wide TTL keeps expiry in order).

Messages: body ``{"job": <id>}`` (JSON), persistent, published with confirms; ``reply_to`` and
``correlation_id`` (the job id) when an api process waits for the job (a synchronous
GetMeterReadings, a control, a DataSource=meter event-log fetch). A message is acknowledged only after its job's outcome is stored: finished
(done / failed / cancelled, readings stored first), or put back to queued with its next attempt
and a delayed message confirmed; a message that could not be settled is rejected and requeued.
`cimhes.engine.fed_dispatch` says which job a message may run.

Waiting (the api side, `JobFeed`): each api process declares an exclusive reply queue; the engine
that finishes a waited job publishes its outcome there (``JobOutcome`` as JSON: the readings it
brought and the device errors, by class). The api waits at most ``--remote-wait`` seconds
(default 300) per job; past that the job is cancelled in the store and its device gets Error 5.0
("no engine finished the read"), so a request never hangs on a lost reply or no engine at all.
On start, an api process publishes every queued job again: a job whose message was never
confirmed (the api died between writing and publishing it) is not lost; copies are harmless.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from decimal import Decimal

import pika
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks

from cimhes.cim.meter_readings import (
    DeviceRef,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    Name,
    Reading,
)
from cimhes.drivers import MeterReadResult
from cimhes.drivers.controls import ControlKind, ControlOutcome, ControlStatus
from cimhes.drivers import errors as device_errors
from cimhes.engine import redaction
from cimhes.engine.dispatch import JobOutcome
from cimhes.engine.event_fetches import EventFetch
from cimhes.engine.jobs import JobRecord, JobState, JobStore

log = logging.getLogger("cimhes.queue.jobs")

JOBS_QUEUE = "cimhes.jobs"
DELAYS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800)  # seconds
DEFAULT_REMOTE_WAIT = 300.0  # the api's wait per job: endpoints/scale.py, --remote-wait


def delay_queue(seconds: int) -> str:
    return f"{JOBS_QUEUE}.delay.{seconds}"


def delay_for(wait: float) -> int | None:
    """The delay queue for a wait of `wait` seconds: the longest not longer (None: publish now)."""
    fitting = [d for d in DELAYS if d <= wait]
    return fitting[-1] if fitting else None


@inlineCallbacks
def declare_jobs(channel):
    yield channel.queue_declare(JOBS_QUEUE, durable=True)
    for seconds in DELAYS:
        yield channel.queue_declare(delay_queue(seconds), durable=True, arguments={
            "x-message-ttl": seconds * 1000, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": JOBS_QUEUE})


def _properties(job_id: int, reply_to: str | None) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                correlation_id=str(job_id), reply_to=reply_to)


# -- outcomes as JSON (engine -> api) ---------------------------------------------------------

def _t(value: datetime | None):
    return None if value is None else value.isoformat()


def _dt(text: str | None):
    return None if text is None else datetime.fromisoformat(text)


def _value(value):
    return str(value)


def _encode_error(error: BaseException | None):
    if error is None:
        return None
    if isinstance(error, device_errors.DeviceError):
        return {"kind": type(error).__name__,
                "args": [a.isoformat() if isinstance(a, datetime) else a for a in error.args],
                "name": error.device_name, "address": error.address}
    return {"kind": "internal", "text": redaction.summary(error)}


def _decode_error(data) -> BaseException | None:
    if data is None:
        return None
    kind = getattr(device_errors, data["kind"], None)
    if not (isinstance(kind, type) and issubclass(kind, device_errors.DeviceError)):
        return RuntimeError(data.get("text", "engine error"))
    args = list(data["args"])
    if kind is device_errors.HistoryShortfall and isinstance(args[-1], str):
        args[-1] = _dt(args[-1])
    try:
        error = kind(*args)
    except TypeError:
        error = device_errors.DeviceError(args[0], str(args[1:]))
    return error.located(data.get("name"), data.get("address"))


class JobRef:
    """The job an outcome from another process is for (its id and device)."""

    def __init__(self, job_id: int, mrid: str):
        self.id = job_id
        self.device = DeviceRef(mrid)


def encode_outcome(outcome: JobOutcome) -> bytes:
    result = None
    control = None
    events = None
    if isinstance(outcome.result, EventFetch):  # an event-log fetch (engine/event_fetches.py)
        f = outcome.result
        events = [f.device_mrid, f.events, [_encode_error(e) for e in f.errors]]
    elif isinstance(outcome.result, ControlOutcome):  # a control job (engine/controls.py)
        c = outcome.result
        control = [c.device_mrid, c.kind.value, c.status.value, c.reason,
                   json.loads(json.dumps(dict(c.read_back), default=str)),
                   _encode_error(c.error)]
    elif isinstance(outcome.result, MeterReadResult):
        reading = outcome.result.meter_reading
        result = {
            "meter": {"mrid": reading.meter.mrid,
                      "names": [[n.name, n.name_type] for n in reading.meter.names]},
            "readings": [[r.reading_type, _value(r.value), _t(r.timestamp), list(r.qualities)]
                         for r in reading.readings],
            "blocks": [[b.reading_type, [[_t(r.timestamp), _value(r.value), list(r.qualities)]
                                         for r in b.readings]] for b in reading.interval_blocks],
            "interval": (None if reading.values_interval is None
                         else [_t(t) for t in reading.values_interval]),
            "errors": [_encode_error(e) for e in outcome.result.errors]}
    return json.dumps({"job": outcome.job.id, "device": outcome.job.device.mrid,
                       "state": outcome.state.value, "result": result, "control": control,
                       "events": events, "error": _encode_error(outcome.error)}).encode()


def _number(text: str):
    try:
        return Decimal(text)
    except ArithmeticError:
        return text


def decode_outcome(body: bytes) -> tuple[int, JobOutcome]:
    data = json.loads(body)
    result = None
    if data["result"] is not None:
        r = data["result"]
        meter = DeviceRef(r["meter"]["mrid"], tuple(Name(n, t) for n, t in r["meter"]["names"]))
        reading = MeterReading(
            meter,
            tuple(Reading(t, _number(v), _dt(ts), tuple(q)) for t, v, ts, q in r["readings"]),
            tuple(IntervalBlock(t, tuple(IntervalReading(_dt(ts), _number(v), tuple(q))
                                         for ts, v, q in rows)) for t, rows in r["blocks"]),
            None if r["interval"] is None else tuple(_dt(t) for t in r["interval"]))
        result = MeterReadResult(reading, tuple(_decode_error(e) for e in r["errors"]))
    elif data.get("control") is not None:
        mrid, kind, status, reason, read_back, error = data["control"]
        result = ControlOutcome(mrid, ControlKind(kind), ControlStatus(status), reason,
                                read_back, _decode_error(error))
    elif data.get("events") is not None:
        mrid, count, errors = data["events"]
        result = EventFetch(mrid, int(count), tuple(_decode_error(e) for e in errors))
    return data["job"], JobOutcome(JobRef(data["job"], data.get("device") or "?"),
                                   JobState(data["state"]), result,
                                   _decode_error(data["error"]))


# -- the api side -----------------------------------------------------------------------------

class _NoSessions:
    open = 0  # an api process opens no meter sessions (its metrics say so)


class JobFeed:
    """Stands in for the dispatcher in an api process: jobs written to the store are published
    to ``cimhes.jobs``, and `wait` fires with the outcome an engine sends back."""

    def __init__(self, reactor, connection, runner, settings, *,
                 remote_wait: float = DEFAULT_REMOTE_WAIT):
        if remote_wait <= 0:
            raise ValueError("--remote-wait must be positive")
        self._reactor = reactor
        self._runner = runner
        self.jobs = JobStore(runner.store)
        self.settings = settings
        self.bounds = _NoSessions()
        # What a control service asks of its dispatcher (engine/controls.py): here it only
        # writes and waits; the engines run the controls with their own.
        self.runners: dict = {}
        self.session_runners: dict = {}  # (engine/event_fetches.py) likewise
        self.pacer = self.security = None
        self.session_limits = None
        self.remote_wait = remote_wait
        self._channel = None
        self._reply_queue: str | None = None
        self._pending: list[int] = []  # ids to publish once connected
        self._waiters: dict[int, list[tuple[Deferred, object]]] = {}
        self._swept = False
        self.published = 0
        if connection is not None:
            self.attach(connection)

    def attach(self, connection) -> None:
        """Publish and wait over `connection` (its every opening declares and consumes)."""
        connection.on_open(self._start)

    # the dispatcher's face, as MeterReadingService and Scheduler use it
    def start(self, *args, **kwargs):
        return None

    def stop(self) -> None:
        for job_id in list(self._waiters):
            self._give_up(job_id, "the api process stopped")

    def wake(self, job_ids=None) -> None:
        """Nothing runs here."""

    def wait(self, job_id: int) -> Deferred:
        waiting = Deferred()
        timer = self._reactor.callLater(self.remote_wait, self._give_up, job_id,
                                        f"no engine finished the read within "
                                        f"{self.remote_wait:g} s (--remote-wait)")
        self._waiters.setdefault(job_id, []).append((waiting, timer))
        return waiting

    def forget(self, job_id: int) -> None:
        for _, timer in self._waiters.pop(job_id, []):
            if timer.active():
                timer.cancel()

    def submitted(self, job_ids) -> None:
        self._pending.extend(job_ids)
        self._flush()

    # the broker side
    @inlineCallbacks
    def _start(self, protocol):
        channel = yield protocol.channel()
        yield channel.confirm_delivery()
        yield declare_jobs(channel)
        declared = yield channel.queue_declare("", exclusive=True, auto_delete=True)
        self._reply_queue = declared.method.queue
        replies, _tag = yield channel.basic_consume(self._reply_queue, auto_ack=True)
        self._channel = channel
        self._consume(replies)
        if not self._swept:  # once per process: queued jobs whose message may be missing
            self._swept = True
            queued = yield self._runner.call(self._queued_ids)
            if queued:
                log.info("republishing %d queued jobs to %s", len(queued), JOBS_QUEUE)
                self._pending = list(dict.fromkeys(queued + self._pending))
        self._flush()

    def _queued_ids(self) -> list[int]:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        with Session(self._runner.store.engine) as session:
            return list(session.scalars(select(JobRecord.id).where(
                JobRecord.state == JobState.QUEUED.value).order_by(JobRecord.id)))

    @inlineCallbacks
    def _consume(self, replies):
        while True:
            try:
                _channel, _method, _props, body = yield replies.get()
            except Exception:  # noqa: BLE001 (the channel closed: the next one takes over)
                return
            try:
                job_id, outcome = decode_outcome(body)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("a job outcome could not be read: %s", exc)
                continue
            for waiting, timer in self._waiters.pop(job_id, []):
                if timer.active():
                    timer.cancel()
                waiting.callback(outcome)

    def _flush(self) -> None:
        channel = self._channel
        if channel is None or not channel.is_open or not self._pending:
            return
        ids, self._pending = self._pending, []
        confirms = [channel.basic_publish(
            "", JOBS_QUEUE, json.dumps({"job": job_id}).encode(),
            _properties(job_id, self._reply_queue if job_id in self._waiters else None))
            for job_id in ids]

        def confirmed(results):
            lost = [job_id for job_id, (ok, _) in zip(ids, results) if not ok]
            self.published += len(ids) - len(lost)
            if lost:  # kept, published again on the next connection
                log.warning("%d job messages were not confirmed; publishing them again",
                            len(lost))
                self._pending.extend(lost)
        DeferredList(confirms, consumeErrors=True).addCallback(confirmed)

    def _give_up(self, job_id: int, why: str) -> None:
        waiters = self._waiters.pop(job_id, [])
        if not waiters:
            return
        log.warning("job %d: %s; cancelled", job_id, why)
        for _, timer in waiters:
            if timer.active():
                timer.cancel()

        def cancel():
            self.jobs.cancel_jobs([job_id], datetime.now(timezone.utc), why)
            return self.jobs.device_of(job_id)

        def answer(mrid):
            if not isinstance(mrid, str):
                mrid = "?"
            for waiting, _ in waiters:
                # The device is not at fault: the head-end could not serve it in time (5.0).
                waiting.callback(JobOutcome(JobRef(job_id, mrid), JobState.CANCELLED, None,
                                            device_errors.HeadEndExhausted(mrid, why)))
        self._runner.call(cancel).addBoth(answer)


# -- the engine side --------------------------------------------------------------------------

class JobConsumer:
    """Consumes ``cimhes.jobs`` into a `FedDispatcher` (see the module docstring)."""

    def __init__(self, reactor, connection, dispatcher, *,
                 prefetch: int = 400):
        if prefetch < 1:
            raise ValueError("--job-prefetch must be at least 1")
        self._reactor = reactor
        self._dispatcher = dispatcher
        self._prefetch = prefetch
        self._channel = None
        self._deliveries: dict[int, tuple[object, int]] = {}  # job id -> (channel, tag)
        self.counts = {"received": 0, "finished": 0, "waiting": 0, "gone": 0, "requeued": 0}
        connection.on_open(self._start)

    @inlineCallbacks
    def _start(self, protocol):
        channel = yield protocol.channel()
        yield channel.confirm_delivery()
        yield declare_jobs(channel)
        yield channel.basic_qos(prefetch_count=self._prefetch)
        queue, _tag = yield channel.basic_consume(JOBS_QUEUE, auto_ack=False)
        self._channel = channel
        self._consume(queue)

    @inlineCallbacks
    def _consume(self, queue):
        while True:
            try:
                channel, method, props, body = yield queue.get()
            except Exception as exc:  # noqa: BLE001 (the channel closed: the next one takes over)
                log.info("job consumer stopped: %s", exc)
                return
            self._received(channel, method, props, body)

    def _received(self, channel, method, props, body) -> None:
        self.counts["received"] += 1
        try:
            job_id = int(json.loads(body)["job"])
        except (ValueError, KeyError, TypeError):
            log.error("a message on %s is not a job (%d bytes); dropped", JOBS_QUEUE, len(body))
            channel.basic_ack(method.delivery_tag)
            return
        earlier = self._deliveries.get(job_id)
        if earlier is not None:
            if earlier[0].is_open:  # a copy while the first is in work here: drop the copy
                channel.basic_ack(method.delivery_tag)
                return
            # The first came on a channel that has closed (a reconnect): ack this one instead.
            self._deliveries[job_id] = (channel, method.delivery_tag)
            return
        self._deliveries[job_id] = (channel, method.delivery_tag)
        self._dispatcher.offer(job_id, bool(method.redelivered)).addCallback(
            self._departed, props).addErrback(
            lambda f: log.error("job %d: %s", job_id, redaction.log_line(f)))

    @inlineCallbacks
    def _departed(self, departure, props):
        channel, tag = self._deliveries.pop(departure.job_id, (None, None))
        self.counts["requeued" if departure.kind == "requeue" else departure.kind] += 1
        if channel is None or not channel.is_open:
            return  # the message went back to the queue with its channel
        if departure.kind == "requeue":
            channel.basic_nack(tag, requeue=True)
            return
        if departure.kind == "finished" and props.reply_to:
            channel.basic_publish("", props.reply_to, encode_outcome(departure.outcome),
                                  pika.BasicProperties(correlation_id=props.correlation_id,
                                                       content_type="application/json"))
        elif departure.kind == "waiting":
            wait = (departure.next_attempt_at - datetime.now(timezone.utc)).total_seconds()
            seconds = delay_for(wait)
            try:
                yield channel.basic_publish(
                    "", JOBS_QUEUE if seconds is None else delay_queue(seconds),
                    json.dumps({"job": departure.job_id}).encode(),
                    _properties(departure.job_id, props.reply_to))
            except Exception as exc:  # noqa: BLE001 (not confirmed: the message stays ours)
                log.error("job %d: its delayed message was not confirmed (%s); requeued",
                          departure.job_id, exc)
                if channel.is_open:
                    channel.basic_nack(tag, requeue=True)
                return
        channel.basic_ack(tag)


__all__ = ["JOBS_QUEUE", "JobFeed", "JobConsumer", "declare_jobs", "delay_for",
           "encode_outcome", "decode_outcome", "DEFAULT_REMOTE_WAIT"]
