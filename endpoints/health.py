"""`/health` (readiness: database, broker when one is configured, reactor lag, what is known of
the meters; `/health/live` is liveness) and `/metrics` (Prometheus text format).

Both are open (no credentials), as probes and scrapers expect: they hold counts and states, no
device identity, user name or secret.
"""
from __future__ import annotations

import json
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import sessionmaker
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cimhes.engine import redaction
from cimhes.engine.device_status import DeviceStatusRecord
from cimhes.engine.metrics import backlog
from cimhes.engine.store import Device

log = logging.getLogger("cimhes.metrics")

HEALTH_TIMEOUT = 5.0  # seconds the database may take to answer the health probe
LAG_LIMIT = 1.0  # seconds of reactor lag past which the head-end is not ready


class ReactorLag:
    """How long a call queued on the reactor now waits before it runs: the time every other
    request and meter session also waits. Measured when asked (by /health and /metrics), so no
    timer runs between probes."""

    def __init__(self, reactor, metrics=None):
        self._reactor = reactor
        self._metrics = metrics
        self.seconds = 0.0

    def measure(self) -> Deferred:
        """Deferred[seconds] firing once the reactor has run a call queued now."""
        queued = time.monotonic()
        done = Deferred()

        def ran():
            self.seconds = time.monotonic() - queued
            if self._metrics is not None:
                self._metrics.reactor_lag.set(self.seconds)
            done.callback(self.seconds)

        self._reactor.callLater(0, ran)
        return done


def meter_states(store) -> dict:
    """Devices by what their last read said: reachable, unreachable, never read."""
    session_factory = sessionmaker(store.engine)
    with session_factory() as session:
        reachable = case((DeviceStatusRecord.last_success_at.is_(None), 0),
                         (DeviceStatusRecord.last_error_at.is_(None), 1),
                         (DeviceStatusRecord.last_success_at >= DeviceStatusRecord.last_error_at,
                          1), else_=0)
        total, read, ok = session.execute(
            select(func.count(Device.id), func.count(DeviceStatusRecord.device_id),
                   func.coalesce(func.sum(reachable), 0))
            .outerjoin(DeviceStatusRecord, DeviceStatusRecord.device_id == Device.id)).one()
        session.execute(text("SELECT 1"))
    return {"devices": total, "reachable": int(ok), "unreachable": read - int(ok),
            "never_read": total - read}


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, reactor, runner, store, lag: ReactorLag, broker=None):
        super().__init__()
        self._reactor = reactor
        self._runner = runner
        self._store = store
        self._lag = lag
        self._broker = broker  # cimhes.queue.service.AmqpService, when a broker is configured

    def render_GET(self, request):
        if request.postpath and request.postpath[0] == b"live":
            return self._json(request, 200, {"status": "ok", "live": True})
        self._ready(request)
        return NOT_DONE_YET

    @inlineCallbacks
    def _ready(self, request):
        started = time.monotonic()
        checks: dict = {}
        ready = True
        try:
            d = self._runner.call(meter_states, self._store)
            d.addTimeout(HEALTH_TIMEOUT, self._reactor)
            meters = yield d
            checks["database"] = {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}
            checks["meters"] = meters
        except Exception as exc:  # a database that fails or hangs is the answer, not a crash
            ready = False
            checks["database"] = {"ok": False, "error": redaction.summary(exc)[:300]}
        if self._broker is None:
            checks["broker"] = {"configured": False}
        else:
            state = self._broker.health()  # the connection's state, the URL without password
            connected = state.get("state") == "connected"
            checks["broker"] = {"configured": True, "ok": connected, **state}
            ready = ready and connected
        lag = yield self._lag.measure()
        checks["reactor_lag_ms"] = round(lag * 1000, 1)
        if lag > LAG_LIMIT:
            ready = False
        body = {"status": "ok" if ready else "failing", "checks": checks}
        if not request.finished:
            request.write(self._json(request, 200 if ready else 503, body))
            request.finish()

    @staticmethod
    def _json(request, status: int, body: dict) -> bytes:
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        request.setHeader("cache-control", "no-store")
        return json.dumps(body).encode()


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics, lag: ReactorLag, reactor=None, runner=None, store=None):
        super().__init__()
        self._metrics = metrics
        self._lag = lag
        self._reactor = reactor
        self._runner = runner
        self._store = store

    def render_GET(self, request):
        self._scrape(request)
        return NOT_DONE_YET

    @inlineCallbacks
    def _scrape(self, request):
        yield self._lag.measure()
        if self._runner is not None:
            try:
                d = self._runner.call(backlog, self._store)
                d.addTimeout(HEALTH_TIMEOUT, self._reactor)
                self._metrics.set_backlog((yield d))
            except Exception as exc:  # a slow or failing store: the gauges keep their last values
                log.warning("metrics: the store's backlog was not counted: %s",
                            redaction.summary(exc)[:300])
        if not request.finished:
            request.setHeader("content-type", CONTENT_TYPE_LATEST)
            request.write(generate_latest(self._metrics.registry))
            request.finish()
