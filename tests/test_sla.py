"""SLA figures checked against a collection with known gaps: meters complete in time, complete but
late, with missing intervals, and broken; requests answered in time, late and failed."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
import pytest_twisted
import requests
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.sla import PROFILE_PLUS_A, SlaCalculator, SlaSettings, day_period, month_period
from cimhes.engine.store import (
    Device,
    DeviceGroup,
    DeviceGroupMember,
    ReadingRecord,
    RequestSummary,
)
from cimhes.engine.users import Role

from .credentials import TEST_PASSWORD, TEST_USER, add_test_user

DAY = date(2026, 11, 20)
MIDNIGHT = datetime(2026, 11, 20, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
QUARTER = timedelta(minutes=15)


def _devices():
    return [DeviceAddress(mrid=f"sla-{k}", name=f"SLA{k}", device_type="idis-meter",
                          host="127.17.0.1", port=9) for k in "ABCD"]


def _load_collection(head_end):
    """A: all 96 intervals stored by 01:00 next day. B: all 96, ten of them only at 08:00
    (after the 06:00 deadline). C: 90 stored in time, 6 missing. D: nothing (broken)."""
    store = head_end.store
    with store.engine.begin() as connection:
        ids = dict(connection.execute(Device.__table__.select().with_only_columns(
            Device.mrid, Device.id)).all())
        rows = []

        def add(mrid, index, read_at):
            rows.append({"device_id": ids[mrid], "reading_type": PROFILE_PLUS_A,
                         "timestamp": MIDNIGHT + QUARTER * (index + 1), "value": "1.0", "source": "meter",
                         "read_at": read_at})

        in_time = MIDNIGHT + timedelta(hours=25)
        late = MIDNIGHT + timedelta(hours=32)
        for i in range(96):
            add("sla-A", i, in_time)
            add("sla-B", i, late if i < 10 else in_time)
            if i not in (7, 8, 9, 50, 51, 95):
                add("sla-C", i, in_time)
        # A value of the day before and of another reading type must not count.
        rows.append({**rows[0], "timestamp": MIDNIGHT})
        rows.append({**rows[1], "reading_type": "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"})
        connection.execute(ReadingRecord.__table__.insert(), rows)
    head_end.operations.statuses.set_broken("sla-D", True, "no power at the site")
    for ms, result in ((100, "OK"), (200, "OK"), (300, "FAILED"), (90_000, "OK")):
        received = MIDNIGHT + timedelta(hours=10, minutes=len(store.requests()))
        store.record_request(RequestSummary(
            message_id=None, noun="MeterReadings", verb="get", source="mdm",
            received_at=received, replied_at=received + timedelta(milliseconds=ms),
            result=result, devices_asked=1, devices_failed=0))


@pytest.fixture
def head_end(tmp_path):
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}",
        secret_key_file=str(tmp_path / "secret.key")), _devices())
    _load_collection(head_end)
    yield head_end
    head_end.store_runner.stop()
    head_end.store.close()


def test_a_day_counts_complete_late_gappy_and_broken_meters_as_they_are(head_end):
    calculator = SlaCalculator(head_end.store)
    label, start, days = day_period(DAY)
    report = calculator.report(label, start, days, SlaSettings(), {}, set(), NOW)
    (group,) = report.groups
    assert (group.group, group.meters, group.excluded, group.meter_days) == ("(no group)", 4, 0, 4)
    assert group.complete_by_deadline == 1  # only A: B was late, C has gaps, D has nothing
    assert group.share_complete == pytest.approx(0.25)
    assert (group.intervals_expected, group.intervals_missing) == (384, 6 + 96)

    without_broken = calculator.report(label, start, days, SlaSettings(), {}, {"sla-D"}, NOW)
    (group,) = without_broken.groups
    assert (group.meters, group.excluded, group.intervals_missing) == (3, 1, 6)
    assert group.share_complete == pytest.approx(1 / 3)

    # A later deadline makes B complete too.
    relaxed = calculator.report(label, start, days, SlaSettings(deadline_hours=12), {},
                                {"sla-D"}, NOW)
    assert relaxed.groups[0].complete_by_deadline == 2

    (asked,) = report.requests
    assert (asked.noun, asked.verb, asked.received) == ("MeterReadings", "get", 4)
    assert (asked.in_time, asked.late, asked.failed) == (3, 1, 1)
    assert (asked.p50_ms, asked.p90_ms, asked.p99_ms) == (200, 90_000, 90_000)


def test_groups_split_the_figures_and_a_month_counts_only_days_begun(head_end):
    calculator = SlaCalculator(head_end.store)
    groups = {"sla-A": "north", "sla-B": "north", "sla-C": "south"}
    label, start, days = day_period(DAY)
    report = calculator.report(label, start, days, SlaSettings(), groups, set(), NOW)
    figures = {g.group: (g.meters, g.complete_by_deadline, g.intervals_missing)
               for g in report.groups}
    assert figures == {"(no group)": (1, 0, 96), "north": (2, 1, 0), "south": (1, 0, 6)}

    label, start, days = month_period(2026, 11)
    month = calculator.report(label, start, days, SlaSettings(), {}, set(), NOW)
    assert (label, days, len(month.daily)) == ("2026-11", 30, 21)  # 1st .. 21st have begun
    (group,) = month.groups
    assert group.meter_days == 4 * 21
    # The stray value stamped 20 Nov 00:00 closes 19 Nov's last interval: it counts there.
    assert group.intervals_missing == 4 * 21 * 96 - (96 + 96 + 90) - 1
    assert month.daily[19].share_complete == pytest.approx(0.25)
    assert {d.share_complete for i, d in enumerate(month.daily) if i != 19} == {0.0}
    assert month.requests[0].received == 4


def test_the_stores_device_groups_split_the_report_and_a_device_may_be_in_two(head_end):
    with head_end.store.engine.begin() as connection:
        ids = dict(connection.execute(Device.__table__.select().with_only_columns(
            Device.mrid, Device.id)).all())
        connection.execute(DeviceGroup.__table__.insert(), [
            {"id": 1, "name": "north", "mrid": None}, {"id": 2, "name": "pilot", "mrid": None}])
        connection.execute(DeviceGroupMember.__table__.insert(), [
            {"group_id": 1, "device_id": ids["sla-A"]}, {"group_id": 1, "device_id": ids["sla-B"]},
            {"group_id": 2, "device_id": ids["sla-A"]}])
    groups = head_end.operations.statuses.groups()
    assert groups == {"sla-A": ("north", "pilot"), "sla-B": ("north",)}
    label, start, days = day_period(DAY)
    report = SlaCalculator(head_end.store).report(label, start, days, SlaSettings(), groups,
                                                  set(), NOW)
    figures = {g.group: (g.meters, g.complete_by_deadline) for g in report.groups}
    assert figures == {"(no group)": (2, 0), "north": (2, 1), "pilot": (1, 1)}
    assert (report.daily[0].meter_days, report.daily[0].complete_by_deadline) == (4, 1)


@pytest_twisted.inlineCallbacks
def test_the_report_page_and_its_csv_behind_authentication(head_end):
    add_test_user(head_end)
    add_test_user(head_end, "events-only", "events-only-password", [Role.EVENTS_READER])
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        anonymous = yield deferToThread(requests.get, f"{base}/reports/sla?day=2026-11-20")
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith('Basic realm="cimhes"')
        assert anonymous.text.startswith("7.1")
        wrong_role = yield deferToThread(requests.get, f"{base}/reports/sla?day=2026-11-20",
                                         auth=("events-only", "events-only-password"))
        assert wrong_role.status_code == 403 and wrong_role.text.startswith("7.2")

        auth = (TEST_USER, TEST_PASSWORD)
        page = yield deferToThread(requests.get, f"{base}/reports/sla?day=2026-11-20"
                                   "&exclude_broken=1", auth=auth)
        assert page.status_code == 200
        assert "<svg" in page.text and "33.3 %" in page.text
        csv_groups = yield deferToThread(
            requests.get, f"{base}/reports/sla?day=2026-11-20&exclude_broken=1&format=csv",
            auth=auth)
        assert csv_groups.headers["content-type"].startswith("text/csv")
        assert csv_groups.text.splitlines() == [
            "period,group,meters,excluded,meter_days,complete_by_deadline,share_complete,"
            "intervals_expected,intervals_missing",
            "2026-11-20,(no group),3,1,3,1,0.3333,288,6"]
        csv_requests = yield deferToThread(
            requests.get, f"{base}/reports/sla?day=2026-11-20&format=csv&table=requests",
            auth=auth)
        assert csv_requests.text.splitlines()[1] == \
            "2026-11-20,MeterReadings,get,4,3,1,1,200.0,90000.0,90000.0"
        bad = yield deferToThread(requests.get, f"{base}/reports/sla?day=yesterday", auth=auth)
        assert bad.status_code == 400
    finally:
        yield port.stopListening()
