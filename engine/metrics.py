"""The head-end's Prometheus metrics, one registry per head-end (no process-wide state): what the
doors answered, what the meters did, and gauges read at scrape time (sessions open, reactor lag,
and from the store: the job backlog by kind and state, the outbox messages not yet delivered by
destination).

prometheus_client's collectors are thread-safe, so the store's thread may count too.
"""
from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

# Seconds, from a quick register read to a 1,000-meter request.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cimhes_requests", "CIM requests answered, by noun, verb and "
                                "Reply.Result (FAULT for a SOAP Fault)",
                                ["noun", "verb", "result"], registry=r)
        self.request_seconds = Histogram("cimhes_request_seconds",
                                         "time from request received to answer written",
                                         ["noun"], buckets=LATENCY_BUCKETS, registry=r)
        self.authentications = Counter("cimhes_authentications",
                                       "authentications at the doors, by outcome",
                                       ["outcome"], registry=r)
        self.device_reads = Counter("cimhes_device_reads", "device reads, by result",
                                    ["result"], registry=r)
        self.device_failures = Counter("cimhes_device_failures",
                                       "failed device reads, by error kind", ["kind"], registry=r)
        self.sessions_open = Gauge("cimhes_meter_sessions_open", "meter sessions open now",
                                   registry=r)
        self.reactor_lag = Gauge("cimhes_reactor_lag_seconds",
                                 "how long a call queued on the reactor waited, at the last probe", registry=r)

        self.job_backlog = Gauge("cimhes_job_backlog", "jobs not finished, by kind and state "
                                 "(queued, running), at the last scrape", ["kind", "state"],
                                 registry=r)
        self.outbox_pending = Gauge("cimhes_outbox_pending", "outbox messages not yet delivered, "
                                    "by destination, at the last scrape", ["destination"],
                                    registry=r)

    def set_backlog(self, backlog: "Backlog") -> None:
        """Replace the store gauges by one scrape's counts (a kind or destination that has
        emptied since reads 0, not its last value)."""
        self.job_backlog.clear()
        for state in ("queued", "running"):
            self.job_backlog.labels("read", state).set(0)
        for (kind, state), count in backlog.jobs.items():
            self.job_backlog.labels(kind, state).set(count)
        self.outbox_pending.clear()
        for destination, count in backlog.outbox.items():
            self.outbox_pending.labels(destination).set(count)

    def device_read(self, error_kind: str | None) -> None:
        self.device_reads.labels("ok" if error_kind is None else "failed").inc()
        if error_kind is not None:
            self.device_failures.labels(error_kind).inc()

    def watch_sessions(self, sessions_open: Callable[[], int]) -> None:
        self.sessions_open.set_function(sessions_open)


@dataclass(frozen=True)
class Backlog:
    jobs: dict[tuple[str, str], int]  # (kind, state) -> unfinished jobs
    outbox: dict[str, int]            # destination -> messages not yet delivered


def backlog(store) -> Backlog:
    """The store's unfinished work, counted on the store's thread: two GROUP BYs over the rows
    the claim and the relays already find by index (job state; outbox published_at)."""
    from cimhes.engine.jobs import JobRecord, JobState
    from cimhes.engine.store import OutboxMessage

    unfinished = (JobState.QUEUED.value, JobState.RUNNING.value)
    with sessionmaker(store.engine)() as session:
        jobs = session.execute(
            select(JobRecord.kind, JobRecord.state, func.count())
            .where(JobRecord.state.in_(unfinished))
            .group_by(JobRecord.kind, JobRecord.state)).all()
        outbox = session.execute(
            select(OutboxMessage.destination, func.count())
            .where(OutboxMessage.published_at.is_(None))
            .group_by(OutboxMessage.destination)).all()
    return Backlog(jobs={(kind, state): count for kind, state, count in jobs},
                   outbox={destination: count for destination, count in outbox})
