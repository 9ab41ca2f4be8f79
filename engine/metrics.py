"""The head-end's Prometheus metrics, one registry per head-end (no process-wide state): what the
doors answered, what the meters did, and gauges read at scrape time (sessions open, reactor lag).

prometheus_client's collectors are thread-safe, so the store's thread may count too.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def device_read(self, error_kind: str | None) -> None:
        self.device_reads.labels("ok" if error_kind is None else "failed").inc()
        if error_kind is not None:
            self.device_failures.labels(error_kind).inc()

    def watch_sessions(self, sessions_open: Callable[[], int]) -> None:
        self.sessions_open.set_function(sessions_open)
