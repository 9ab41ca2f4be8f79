"""The operator's side of a running head-end: the device pages (search, status after real reads,
on-demand read, broken mark), /health and /metrics (parsed with Prometheus' own text parser), the
request log, and the pages opened in a real headless Chromium."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy
import pytest_twisted
import requests
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.jobs import JobStore, NewJob
from cimhes.engine.store import Device, EndDeviceEventRecord, OutboxEntry
from cimhes.engine.users import Role
from cimhes.fixtures.fleet import start_fleet

from .credentials import TEST_PASSWORD, TEST_USER, add_test_user, zeep_client

PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "screenshots"
DEAD = DeviceAddress(mrid="dead-meter-1", name="DEAD0001", device_type="idis-meter",
                     host="127.17.0.1", port=1)


@pytest.fixture
def site(tmp_path):
    fleet = start_fleet(reactor, 1, base_index=251, port=0)
    live = DeviceAddress.from_inventory(fleet.inventory()["meters"][0])
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key")), [live, DEAD])
    add_test_user(head_end, roles=[Role.READINGS_READER])
    add_test_user(head_end, "admin", "admin-password", [Role.READINGS_READER, Role.ADMINISTRATOR])
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.base_url = f"http://127.0.0.1:{port.getHost().port}"
    head_end.live = live
    yield head_end
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(fleet.stop_all())
    head_end.store_runner.stop()
    head_end.store.close()


def _read_both(site):
    client = zeep_client(f"{site.base_url}/cim/GetMeterReadings?wsdl")
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings", "CorrelationID": "pages-1"},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": site.live.mrid},
                                                    {"mRID": DEAD.mrid}],
                                      "ReadingType": [{"mRID": PLUS_A}]}})


def _get(site, path, auth=(TEST_USER, TEST_PASSWORD), **kwargs):
    return requests.get(f"{site.base_url}{path}", auth=auth, **kwargs)


def _post(site, path, auth=(TEST_USER, TEST_PASSWORD), origin=True, **kwargs):
    headers = {"Origin": site.base_url} if origin else {}
    return requests.post(f"{site.base_url}{path}", auth=auth, headers=headers,
                         allow_redirects=False, **kwargs)


@pytest_twisted.inlineCallbacks
def test_device_pages_show_what_the_reads_did_and_read_on_demand(site, caplog):
    caplog.set_level(logging.INFO)
    reply = yield deferToThread(_read_both, site)
    assert reply.Reply.Result == "PARTIAL"

    with site.store.engine.begin() as connection:
        (dead_id,) = connection.execute(sqlalchemy.select(Device.id).where(
            Device.mrid == DEAD.mrid)).one()
        connection.execute(EndDeviceEventRecord.__table__.insert(), [{
            "device_id": dead_id, "created_at": datetime(2026, 11, 20, 3, 4, tzinfo=timezone.utc),
            "event_type": "3.26.38.185", "dlms_code": 1, "log": "0.0.99.98.0.255",
            "details": None, "read_at": datetime(2026, 11, 20, 4, 0, tzinfo=timezone.utc)}])

    found = yield deferToThread(_get, site, "/devices?q=DEAD")
    assert found.status_code == 200
    assert DEAD.mrid in found.text and site.live.mrid not in found.text
    dead = yield deferToThread(_get, site, f"/devices/{quote(DEAD.mrid)}")
    assert "ConnectionFailed" in dead.text and "127.17.0.1:1" in dead.text
    assert "never" in dead.text  # no successful read
    assert "3.26.38.185" in dead.text and "2026-11-20 03:04:00 UTC" in dead.text
    live = yield deferToThread(_get, site, f"/devices/{quote(site.live.mrid)}")
    assert "ConnectionFailed" not in live.text and "values stored" in live.text
    assert site.live.password not in live.text  # the security table says "set", not what
    assert "<td>set</td>" in live.text

    forged = yield deferToThread(_post, site, f"/devices/{quote(site.live.mrid)}/read",
                                 origin=False)
    assert forged.status_code == 403
    read = yield deferToThread(_post, site, f"/devices/{quote(site.live.mrid)}/read")
    assert read.status_code == 303
    assert read.headers["Location"] == f"/devices/{quote(site.live.mrid, safe='')}?read=OK"
    after = yield deferToThread(_get, site, read.headers["Location"])
    assert "on-demand read: OK" in after.text

    not_admin = yield deferToThread(_post, site, f"/devices/{quote(DEAD.mrid)}/broken",
                                    data={"broken": "1", "note": "site flooded"})
    assert not_admin.status_code == 403
    marked = yield deferToThread(_post, site, f"/devices/{quote(DEAD.mrid)}/broken",
                                 auth=("admin", "admin-password"),
                                 data={"broken": "1", "note": "site flooded"})
    assert marked.status_code == 303
    page = yield deferToThread(_get, site, f"/devices/{quote(DEAD.mrid)}")
    assert "marked broken" in page.text and "site flooded" in page.text
    missing = yield deferToThread(_get, site, "/devices/no-such-meter")
    assert missing.status_code == 404

    yield site.store_runner.call(lambda: None)
    trail = [(e.actor, e.action, e.outcome, e.subject) for e in site.users.audit_entries()]
    assert (TEST_USER, "device.read", "success", site.live.mrid) in trail
    assert ("admin", "device.broken", "success", DEAD.mrid) in trail

    # One log line per SOAP request, with who, what, result and CorrelationID; one per
    # failed device with its mRID and error kind.
    (logged,) = [r for r in caplog.records if r.name == "cimhes.requests"]
    assert (logged.user, logged.noun, logged.verb, logged.result, logged.correlation_id) == \
        (TEST_USER, "MeterReadings", "get", "PARTIAL", "pages-1")
    assert any(getattr(r, "mrid", None) == DEAD.mrid and r.error_kind == "ConnectionFailed"
               for r in caplog.records)
    assert not any(TEST_PASSWORD in r.getMessage() for r in caplog.records)


@pytest_twisted.inlineCallbacks
def test_health_and_metrics(site):
    yield deferToThread(_read_both, site)
    health = yield deferToThread(requests.get, f"{site.base_url}/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"] == {"configured": False}
    assert body["checks"]["meters"] == {"devices": 2, "reachable": 1, "unreachable": 1,
                                        "never_read": 0}
    assert body["checks"]["reactor_lag_ms"] >= 0
    live = yield deferToThread(requests.get, f"{site.base_url}/health/live")
    assert live.json() == {"status": "ok", "live": True}

    scraped = yield deferToThread(requests.get, f"{site.base_url}/metrics")
    assert scraped.headers["content-type"].startswith("text/plain; version=")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text)
               for s in family.samples}
    assert samples[("cimhes_requests_total", (("noun", "MeterReadings"),
                                              ("result", "PARTIAL"), ("verb", "get")))] == 1
    assert samples[("cimhes_request_seconds_count", (("noun", "MeterReadings"),))] == 1
    assert samples[("cimhes_device_reads_total", (("result", "ok"),))] == 1
    assert samples[("cimhes_device_failures_total", (("kind", "ConnectionFailed"),))] == 1
    assert samples[("cimhes_authentications_total", (("outcome", "success"),))] >= 1
    assert samples[("cimhes_meter_sessions_open", ())] == 0
    assert ("cimhes_reactor_lag_seconds", ()) in samples
    # The on-demand read's jobs are finished: no read backlog, and nothing waits in the outbox.
    assert samples[("cimhes_job_backlog", (("kind", "read"), ("state", "queued")))] == 0
    assert not [key for key in samples if key[0] == "cimhes_outbox_pending"]

    # Work that waits shows: a control due tomorrow, two messages no relay has taken.
    now = datetime.now(timezone.utc)
    JobStore(site.store).create_request(
        "metrics-test", "control", [NewJob(site.live.mrid, kind="control")], priority=0,
        max_attempts=1, now=now, not_before=now + timedelta(days=1))
    site.store.add_to_outbox([OutboxEntry("metrics-test", "probe", "<x/>")] * 2, now)
    scraped = yield deferToThread(requests.get, f"{site.base_url}/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text)
               for s in family.samples}
    assert samples[("cimhes_job_backlog", (("kind", "control"), ("state", "queued")))] == 1
    assert samples[("cimhes_outbox_pending", (("destination", "metrics-test"),))] == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(url: str, screenshot: Path) -> str:
    """The DOM Chromium built for the page, and a screenshot of it."""
    browser = _chromium()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--no-first-run", "--disable-extensions", "--window-size=1200,900"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                         timeout=90)
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True,
                   timeout=90)
    return dom.stdout


@pytest_twisted.inlineCallbacks
def test_the_pages_in_a_headless_chromium(site):
    if _chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/test installs it from Debian's packages")
        pytest.skip("no chromium here (scripts/test installs Debian's chromium)")
    yield deferToThread(_read_both, site)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    signed_in = site.base_url.replace("http://", f"http://{TEST_USER}:{TEST_PASSWORD}@")
    day = site.operations.now().date().isoformat()

    sla = yield deferToThread(_browse, f"{signed_in}/reports/sla?day={day}",
                              SCREENSHOTS / "sla.png")
    assert f"SLA report {day}" in sla
    assert '<table id="groups">' in sla and "<svg" in sla and 'class="bar"' in sla
    assert "MeterReadings" in sla  # the SOAP request above, in the requests table

    devices = yield deferToThread(_browse, f"{signed_in}/devices", SCREENSHOTS / "devices.png")
    assert site.live.name in devices and DEAD.name in devices
    device = yield deferToThread(_browse, f"{signed_in}/devices/{quote(DEAD.mrid)}",
                                 SCREENSHOTS / "device.png")
    assert "ConnectionFailed" in device and 'id="read-now"' in device

    refused = yield deferToThread(_browse, f"{site.base_url}/devices",
                                  SCREENSHOTS / "refused.png")
    assert site.live.name not in refused
    for name in ("sla", "devices", "device"):
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 1000
    (SCREENSHOTS / "pages.json").write_text(json.dumps({"base_url": site.base_url}))
