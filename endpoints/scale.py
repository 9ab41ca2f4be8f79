"""One process's part in a scaled-out head-end: `cimhes serve --role all|api|engine`.

- "all" (the default): today's single process: doors, schedules and the engine over one store;
  the `Dispatcher` finds its work in the store.
- "api": the SOAP and AMQP doors and the schedules write jobs to the shared store and hand
  them to the engines through RabbitMQ (`cimhes.queue.job_queue.JobFeed`, which stands in for
  the dispatcher); a synchronous GetMeterReadings waits for the engines' outcomes on its reply
  queue (at most `remote_wait` seconds per job).
- "engine": no CIM doors; takes jobs from the work queue (`JobConsumer`) and runs them in a
  `FedDispatcher` (engine/fed_dispatch.py) under route leases shared with the other engines
  (engine/route_leases.py). /health and /metrics are still served.

Several processes share one PostgreSQL database (SQLite is one process's) and one broker; a
role other than "all" without both is refused at start with one line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.route_leases import DEFAULT_LEASE_SECONDS

log = logging.getLogger(__name__)

ROLES = ("all", "api", "engine")
DEFAULT_JOB_PREFETCH = 400  # work-queue messages one engine holds unacknowledged
DEFAULT_REMOTE_WAIT = 300.0  # s an api process waits for an engine to finish a waited job


@dataclass(frozen=True)
class ScaleSettings:
    role: str = "all"
    job_prefetch: int = DEFAULT_JOB_PREFETCH
    remote_wait: float = DEFAULT_REMOTE_WAIT
    route_lease_seconds: float = DEFAULT_LEASE_SECONDS

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"--role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.job_prefetch < 1:
            raise ValueError("--job-prefetch must be at least 1")
        if self.remote_wait <= 0 or self.route_lease_seconds <= 0:
            raise ValueError("--remote-wait and --route-lease must be positive")

    def check(self, database_url: str, amqp_url: str | None) -> None:
        """ValueError unless this role can run with this database and broker."""
        if self.role == "all":
            return
        if not amqp_url:
            raise ValueError(f"--role {self.role} needs --amqp-url (jobs go through RabbitMQ)")
        if database_url.startswith("sqlite"):
            raise ValueError(f"--role {self.role} needs a database server shared by every "
                             "process (--db postgresql+psycopg://...), not SQLite")


def engine_dispatcher(reactor, runner, scale: ScaleSettings, engine_settings, **kwargs):
    """The dispatcher of this role: the store-polling one, a fed one, or the api's feed."""
    if scale.role == "engine":
        from cimhes.engine.fed_dispatch import FedDispatcher

        return FedDispatcher(reactor, runner, engine_settings,
                             lease_seconds=scale.route_lease_seconds, **kwargs)
    if scale.role == "api":
        from cimhes.queue.job_queue import JobFeed

        return JobFeed(reactor, None, runner, engine_settings, remote_wait=scale.remote_wait)
    return Dispatcher(reactor, runner, engine_settings, **kwargs)


def start_role(reactor, head_end, settings):
    """Connect an api's feed or an engine's consumer to the broker; returns what was started
    (None for "all")."""
    scale = settings.scale
    if scale.role == "all":
        return None
    from cimhes.queue.connection import BrokerConnection

    if scale.role == "api":
        # The doors' AMQP connection (requests, events) also carries the jobs.
        connection = head_end.amqp.connection
        head_end.dispatcher.attach(connection)
        reactor.addSystemEventTrigger("before", "shutdown", head_end.dispatcher.stop)
        return head_end.dispatcher
    from cimhes.queue.job_queue import JobConsumer

    connection = BrokerConnection(reactor, settings.amqp_url)
    consumer = JobConsumer(reactor, connection, head_end.dispatcher,
                           prefetch=scale.job_prefetch)
    head_end.job_connection = connection
    reactor.callWhenRunning(connection.start)
    reactor.addSystemEventTrigger("before", "shutdown", head_end.dispatcher.release_leases)
    reactor.addSystemEventTrigger("before", "shutdown", connection.stop)
    log.info("engine %s: taking jobs from RabbitMQ (prefetch %d), route leases %g s",
             head_end.dispatcher.engine_id, scale.job_prefetch, scale.route_lease_seconds)
    return consumer
