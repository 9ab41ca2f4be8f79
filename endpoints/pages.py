"""The operator's pages, rendered server-side by the head-end's own Twisted site (jinja2 templates
in endpoints/templates): the SLA report (`/reports/sla`, HTML or CSV) and the devices
(`/devices` search, `/devices/<mRID>` with an on-demand read and the broken mark).

Pages ask for the same credentials as the services (HTTP Basic; a browser prompts for them), each
needs a role, and every login is audited like a SOAP one. A POST must come from a page of this
site (its Origin, else its Referer, names this site): a browser that remembers the Basic
credentials must not let another site trigger reads or marks (CSRF).
"""
from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta, timezone
from urllib.parse import quote, unquote, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cimhes.cim.message import ErrorCode, Header, Verb
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.endpoints.auth import Doorkeeper, MalformedCredentials, Refused, basic_login, peer_of
from cimhes.endpoints.charts import share_bars
from cimhes.engine import redaction
from cimhes.engine.device_status import MAX_EVENTS_SHOWN, MAX_SEARCH_RESULTS, DeviceStatusStore
from cimhes.engine.sla import SlaCalculator, SlaSettings, day_period, month_period
from cimhes.engine.store import StoreRunner
from cimhes.engine.users import Role

log = logging.getLogger(__name__)

REALM = "cimhes"
ON_DEMAND_WINDOW = timedelta(hours=24)  # an on-demand read from the page: registers + last day


@dataclass
class Response:
    body: bytes | str
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    headers: Mapping[str, str] | None = None


class PageError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PagesContext:
    doorkeeper: Doorkeeper
    runner: StoreRunner
    statuses: DeviceStatusStore
    sla: SlaCalculator
    sla_settings: SlaSettings
    readings: object  # engine.reading.MeterReadingService
    groups: Callable[[], Mapping[str, tuple[str, ...]]]  # mRID -> device groups (store thread)
    now: Callable[[], datetime]

    def __post_init__(self):
        self.templates = Environment(loader=PackageLoader("cimhes.endpoints", "templates"),
                                     autoescape=select_autoescape(["html"]))

    def render(self, name: str, principal, **values) -> Response:
        return Response(self.templates.get_template(name).render(
            user=principal.name, when=_when, pct=_pct, ms=_ms, **values))


class Page(Resource):
    """A page behind authentication; `get`/`post` return a Response (or a Deferred of one)."""

    isLeaf = True
    role = Role.READINGS_READER

    def __init__(self, context: PagesContext):
        super().__init__()
        self.context = context

    def render_GET(self, request):
        return self._serve(request, self.get)

    def render_POST(self, request):
        if not _same_origin(request):
            return self._write(request, Response(
                "refused: a POST must come from this site's own pages", "text/plain; "
                "charset=utf-8", 403))
        return self._serve(request, self.post)

    def get(self, request, principal):
        raise PageError(405, "GET is not served here")

    def post(self, request, principal):
        raise PageError(405, "POST is not served here")

    def _serve(self, request, handler):
        path = request.path.decode("utf-8", "replace")
        request.notifyFinish().addErrback(lambda _: setattr(request, "page_gone", True))
        d = self._admit(request, path)
        d.addCallback(lambda principal: maybeDeferred(handler, request, principal))
        d.addErrback(self._error)
        d.addCallback(lambda response: self._write(request, response))
        d.addErrback(lambda f: log.error("page %s failed: %s", path, redaction.log_line(f)))
        return NOT_DONE_YET

    @inlineCallbacks
    def _admit(self, request, path: str):
        try:
            login = basic_login(request)
        except MalformedCredentials:
            login = None
        principal = yield self.context.doorkeeper.authenticate(
            request, login, channel=f"page {path[:100]}")
        self.context.doorkeeper.authorise(request, principal, self.role,
                                          action=f"view {path[:100]}")
        return principal

    @staticmethod
    def _error(failure):
        if failure.check(Refused):
            error = failure.value.error
            if error.code == ErrorCode.NOT_AUTHENTICATED.value:
                return Response(f"{error.code}: {error.reason}\n", "text/plain; charset=utf-8",
                                401, {"WWW-Authenticate": f'Basic realm="{REALM}", '
                                                          'charset="UTF-8"'})
            return Response(f"{error.code}: {error.reason}\n", "text/plain; charset=utf-8", 403)
        if failure.check(PageError):
            return Response(f"{failure.value.message}\n", "text/plain; charset=utf-8",
                            failure.value.status)
        log.error("page failed: %s", redaction.log_line(failure))
        return Response("internal error; see the head-end's log\n", "text/plain; charset=utf-8",
                        500)

    @staticmethod
    def _write(request, response: Response):
        if request.finished or getattr(request, "page_gone", False):
            return NOT_DONE_YET
        body = response.body.encode() if isinstance(response.body, str) else response.body
        request.setResponseCode(response.status)
        request.setHeader("content-type", response.content_type)
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-content-type-options", "nosniff")
        for name, value in (response.headers or {}).items():
            request.setHeader(name, value)
        request.write(body)
        request.finish()
        return NOT_DONE_YET


class SlaReportPage(Page):
    """/reports/sla?day=YYYY-MM-DD | ?month=YYYY-MM [&exclude_broken=1] [&format=csv
    [&table=groups|requests]]; no period: yesterday."""

    @inlineCallbacks
    def get(self, request, principal):
        c = self.context
        day, month = _arg(request, "day"), _arg(request, "month")
        exclude_broken = _arg(request, "exclude_broken") in ("1", "on", "true")
        try:
            if month:
                year, mon = (int(part) for part in month.split("-"))
                label, start, days = month_period(year, mon)
            else:
                when = date.fromisoformat(day) if day else c.now().date() - timedelta(days=1)
                label, start, days = day_period(when)
        except ValueError:
            raise PageError(400, "day is YYYY-MM-DD, month is YYYY-MM") from None
        now = c.now()

        def compute():
            exclude = c.statuses.broken_mrids() if exclude_broken else set()
            return c.sla.report(label, start, days, c.sla_settings, c.groups(), exclude, now)

        report = yield c.runner.call(compute)
        query = {"day": day} if day else {"month": month} if month else {"day": label}
        if exclude_broken:
            query["exclude_broken"] = "1"
        if _arg(request, "format") == "csv":
            table = _arg(request, "table") or "groups"
            if table not in ("groups", "requests"):
                raise PageError(400, "table is groups or requests")
            return Response(_report_csv(report, table), "text/csv; charset=utf-8", 200,
                            {"Content-Disposition":
                             f'attachment; filename="sla-{label}-{table}.csv"'})
        if days == 1:
            chart = share_bars([(g.group, g.share_complete) for g in report.groups],
                               f"{label}: share of meters complete by the deadline, per group")
        else:
            chart = share_bars([(f"{d.day.day:02d}", d.share_complete) for d in report.daily],
                               f"{label}: share of meters complete by the deadline, per day")
        return c.render("sla.html", principal, report=report, chart=chart, day=day,
                        month=month, exclude_broken=exclude_broken,
                        csv_groups="/reports/sla?" + urlencode({**query, "format": "csv"}),
                        csv_requests="/reports/sla?" + urlencode(
                            {**query, "format": "csv", "table": "requests"}))


def _report_csv(report, table: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    if table == "groups":
        writer.writerow(["period", "group", "meters", "excluded", "meter_days",
                         "complete_by_deadline", "share_complete", "intervals_expected",
                         "intervals_missing"])
        for g in report.groups:
            writer.writerow([report.label, g.group, g.meters, g.excluded, g.meter_days,
                             g.complete_by_deadline,
                             "" if g.share_complete is None else f"{g.share_complete:.4f}",
                             g.intervals_expected, g.intervals_missing])
    else:
        writer.writerow(["period", "noun", "verb", "received", "in_time", "late", "failed",
                         "p50_ms", "p90_ms", "p99_ms"])
        for r in report.requests:
            writer.writerow([report.label, r.noun, r.verb, r.received, r.in_time, r.late,
                             r.failed, *("" if v is None else f"{v:.1f}"
                                         for v in (r.p50_ms, r.p90_ms, r.p99_ms))])
    return out.getvalue()


class DevicesPage(Page):
    """/devices?q=..., /devices/<mRID>, POST /devices/<mRID>/read and /devices/<mRID>/broken."""

    @inlineCallbacks
    def get(self, request, principal):
        c = self.context
        parts = [unquote(p.decode("utf-8", "replace")) for p in request.postpath if p]
        if not parts:
            q = (_arg(request, "q") or "")[:128]
            devices = yield c.runner.call(c.statuses.search, q)
            return c.render("devices.html", principal, devices=devices, q=q,
                            limit=MAX_SEARCH_RESULTS)
        if len(parts) != 1:
            raise PageError(404, "no such page")
        status = yield c.runner.call(c.statuses.status, parts[0])
        if status is None:
            raise PageError(404, f"no device with mRID {parts[0]!r}")
        events = yield c.runner.call(c.statuses.events, parts[0])
        notice, notice_class = None, None
        read = _arg(request, "read")
        if read:
            notice = f"on-demand read: {read}"
            notice_class = "ok" if read == "OK" else "bad"
        return c.render("device.html", principal, d=status, notice=notice,
                        notice_class=notice_class, security=_security(status.address),
                        events=events, events_limit=MAX_EVENTS_SHOWN)

    @inlineCallbacks
    def post(self, request, principal):
        c = self.context
        parts = [unquote(p.decode("utf-8", "replace")) for p in request.postpath if p]
        if len(parts) != 2 or parts[1] not in ("read", "broken"):
            raise PageError(404, "no such action")
        mrid, action = parts
        status = yield c.runner.call(c.statuses.status, mrid)
        if status is None:
            raise PageError(404, f"no device with mRID {mrid!r}")
        source = peer_of(request)
        if action == "read":
            now = c.now()
            outcome = yield c.readings.read(GetMeterReadings(
                header=Header(verb=Verb.GET, noun="MeterReadings", source="device page"),
                end_devices=(DeviceRef(mrid=mrid),), start=now - ON_DEMAND_WINDOW, end=now))
            result = outcome.result.value
            c.doorkeeper.audit.record(
                "device.read", "success" if result == "OK" else "failure",
                actor=principal.name, source=source, subject=mrid,
                detail="; ".join(e.reason or e.code for e in outcome.errors)[:1000] or result)
            query = urlencode({"read": result})
        else:
            c.doorkeeper.authorise(request, principal, Role.ADMINISTRATOR,
                                   action="mark a device broken or in service")
            broken = _form(request, "broken") == "1"
            note = (_form(request, "note") or "")[:255]
            yield c.runner.call(c.statuses.set_broken, mrid, broken, note)
            c.doorkeeper.audit.record("device.broken" if broken else "device.in-service",
                                      "success", actor=principal.name, source=source,
                                      subject=mrid, detail=note or None)
            query = ""
        location = f"/devices/{quote(mrid, safe='')}" + (f"?{query}" if query else "")
        return Response(f'<a href="{location}">back</a>', status=303,
                        headers={"Location": location})


def _security(address) -> list[tuple[str, str]]:
    """What the page shows of a device's security: its mechanism and titles, and for each secret
    (password, keys) only whether it is set, never the secret itself."""
    rows = []
    for item in fields(address):
        name = item.name
        if not any(w in name for w in ("security", "authentication", "password", "key",
                                        "title", "cipher")):
            continue
        value = getattr(address, name)
        if name == "password" or "key" in name:
            shown = "set" if value else "not set"
        else:
            shown = "—" if value is None else str(value)
        rows.append((name.replace("_", " "), shown))
    return rows


def _same_origin(request) -> bool:
    own = request.getHeader("host")
    for header in ("origin", "referer"):
        value = request.getHeader(header)
        if value:
            return urlsplit(value).netloc == own
    return False


def _arg(request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace").strip() if values else None


_form = _arg  # twisted.web parses form bodies into request.args too


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(share: float | None) -> str:
    return "—" if share is None else f"{share * 100:.1f} %"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"
