"""What an operator runs the head-end with, assembled for one HeadEnd: metrics, the request log,
the device-status recorder, reactor lag, and the pages (`/reports/sla`, `/devices`, `/health`,
`/metrics`) mounted on the site's root."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone

from cimhes.endpoints.health import HealthResource, MetricsResource, ReactorLag
from cimhes.endpoints.pages import DevicesPage, PagesContext, SlaReportPage
from cimhes.endpoints.request_log import RequestObserver
from cimhes.engine.device_status import DeviceOutcomeRecorder, DeviceStatusStore
from cimhes.engine.metrics import Metrics
from cimhes.engine.sla import SlaCalculator, SlaSettings
from twisted.web.resource import Resource


class Operations:
    def __init__(self, reactor, store, runner, now: Callable[[], datetime] | None = None):
        self._reactor = reactor
        self._store = store
        self._runner = runner
        self.now = now or (lambda: datetime.now(timezone.utc))
        self.metrics = Metrics()
        self.requests = RequestObserver(self.metrics)
        self.statuses = DeviceStatusStore(store)
        self.device_outcomes = DeviceOutcomeRecorder(runner, self.statuses, self.metrics,
                                                     self.now)
        self.lag = ReactorLag(reactor, self.metrics)

    def mount(self, root: Resource, *, doorkeeper, readings, sla_settings: SlaSettings,
              groups: Callable[[], Mapping[str, str]], broker=None) -> None:
        self.metrics.watch_sessions(lambda: readings.sessions_open)
        context = PagesContext(doorkeeper=doorkeeper, runner=self._runner,
                               statuses=self.statuses, sla=SlaCalculator(self._store),
                               sla_settings=sla_settings, readings=readings, groups=groups,
                               now=self.now)
        reports = Resource()
        reports.putChild(b"sla", SlaReportPage(context))
        root.putChild(b"reports", reports)
        root.putChild(b"devices", DevicesPage(context))
        root.putChild(b"health", HealthResource(self._reactor, self._runner, self._store,
                                                self.lag, broker))
        root.putChild(b"metrics", MetricsResource(self.metrics, self.lag, self._reactor,
                                                  self._runner, self._store))
