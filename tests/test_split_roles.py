"""Controls and event-log fetches across split roles, with real processes: `cimhes serve --role api`
and `cimhes serve --role engine` over a real PostgreSQL (own database) and RabbitMQ (own vhost),
meters simulated by `cimhes simulate` (own process). zeep calls the api; the engine does every
DLMS session. And a `serve` killed with SIGKILL in the middle of event-log fetches: the next
process resumes them and stores every meter's events.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import create_engine, func, select
from zeep.exceptions import TransportError
from requests.exceptions import RequestException

from cimhes.engine.controls import ControlJobRecord
from cimhes.engine.jobs import JobRecord
from cimhes.engine.store import Device, EndDeviceEventRecord

from .brokers import RABBITMQ_ENV, TestVhost
from .credentials import zeep_client
from .databases import postgres_or_skip
from .test_scale_out import _cimhes, _ready

HOST = "127.0.24.1"  # this file's loopback range
USER, PASSWORD = "split-mdm", "split-mdm-password"
DISCONNECT = "3.31.0.23"
CONTROL_STATE = "0.0.0.6.0.1.43.0.0.0.0.0.0.0.0.0.0.0"  # 0 disconnected, 1 connected
METERS = 3


def _until(condition, within: float, what: str):
    """Poll `condition()` every 0.1 s until it gives something true (returned); fail past
    `within` seconds naming `what`."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {within} s"
        time.sleep(0.1)


def _stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _simulate(directory, meters: int, delay: float, started: list):
    inventory = directory / "inventory.json"
    process = _cimhes("simulate", "--meters", str(meters), "--port", "0", "--delay", str(delay),
                      "--inventory", str(inventory))
    started.append(process)
    assert _ready(process)["ready"]
    return inventory, [m["mrid"] for m in json.loads(inventory.read_text())["meters"]]


def _add_user(db: str, key_file: str) -> None:
    added = subprocess.run(
        [sys.executable, "-m", "cimhes.endpoints.cli", "user", "add", USER, "--role",
         "switch-operator", "--role", "readings-reader", "--role", "events-reader",
         "--password-stdin", "--db", db, "--secret-key-file", key_file],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr


@pytest.fixture(scope="module")
def split(tmp_path_factory, request):
    """An api and an engine process over one PostgreSQL database and one vhost of their own, a
    fleet of METERS meters (the module's tests use them in turn): (api's base URL, the meters'
    mRIDs, database URL, the engine process)."""
    base = os.environ.get(RABBITMQ_ENV)
    if not base:
        pytest.skip(f"{RABBITMQ_ENV} names no RabbitMQ broker (scripts/test starts one)")
    server = postgres_or_skip(request)
    directory = tmp_path_factory.mktemp("split")
    vhost = TestVhost(base)
    db = server.new_database(migrated=True)
    processes: list[subprocess.Popen] = []
    try:
        inventory, mrids = _simulate(directory, METERS, 0.02, processes)
        key_file = str(directory / "secret.key")
        common = ("--db", db, "--amqp-url", vhost.url, "--host", HOST, "--port", "0",
                  "--secret-key-file", key_file, "--no-push", "--min-device-gap", "0")
        api = _cimhes("serve", "--role", "api", "--inventory", str(inventory), *common)
        processes.append(api)
        ready = _ready(api)
        _add_user(db, key_file)
        engine = _cimhes("serve", "--role", "engine", "--sessions", "2", *common)
        processes.append(engine)
        assert _ready(engine)["ready"]
        yield ready["base_url"], mrids, db, engine
    finally:
        _stop(processes[::-1])
        server.drop(db)
        vhost.delete()


def _client(base_url: str, service: str):
    return zeep_client(f"{base_url}/cim/{service}?wsdl", name=USER, password=PASSWORD)


def _control_states(base_url: str, mrids) -> dict[str, Decimal]:
    """The disconnectors' control_state, read on demand through the api (an engine reads)."""
    reply = _client(base_url, "GetMeterReadings").service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings", "MessageID": "split-read"},
        Request={"GetMeterReadings": {
            "EndDevice": [{"mRID": m} for m in mrids],
            "ReadingType": [{"mRID": CONTROL_STATE}]},
            "Option": [{"name": "DataSource", "value": "meter"}]})
    assert reply.Reply.Result == "OK", reply.Reply
    return {r.Meter.mRID: Decimal(r.Readings[0].value)
            for r in reply.Payload.MeterReadings.MeterReading}


def test_a_disconnect_at_the_api_is_carried_out_by_the_engine_and_read_back(split):
    base_url, mrids, db, engine = split
    assert _control_states(base_url, mrids) == {m: Decimal(1) for m in mrids}  # all connected

    client = _client(base_url, "ExecuteEndDeviceControls")
    reply = client.service.CreateEndDeviceControls(
        Header={"Verb": "create", "Noun": "EndDeviceControls", "MessageID": "split-disconnect",
                "Source": "test-mdm"},
        Payload={"EndDeviceControls": {"EndDeviceControl": [{
            "EndDeviceControlType": {"ref": DISCONNECT},
            "EndDevices": [{"mRID": mrids[0]}]}]}})
    assert reply.Reply.Result == "OK", reply.Reply
    assert not reply.Reply.Error
    [control] = reply.Payload.EndDeviceControls.EndDeviceControl
    batch = control.mRID
    assert batch.startswith("control:")

    # The engine process ran it (the api opens no meter session) and stored its outcome.
    store = create_engine(db)
    try:
        with store.connect() as connection:
            rows = connection.execute(
                select(JobRecord.kind, JobRecord.state, JobRecord.device_mrid,
                       JobRecord.claimed_by, ControlJobRecord.status, ControlJobRecord.read_back)
                .join(ControlJobRecord, ControlJobRecord.job_id == JobRecord.id)).all()
    finally:
        store.dispose()
    [(kind, state, device, claimed_by, status, read_back)] = rows
    assert (kind, state, device, status) == ("control", "done", mrids[0], "done")
    assert f":{engine.pid}:" in claimed_by
    assert read_back  # the engine read the disconnector back in the same association

    # Read back through the api again, by a new session: only the asked meter is open.
    assert _control_states(base_url, mrids) == {mrids[0]: Decimal(0),
                                                **{m: Decimal(1) for m in mrids[1:]}}


def test_an_event_log_fetch_at_the_api_is_the_engines_job(split):
    base_url, mrids, db, engine = split
    end = datetime.now(timezone.utc)
    start = end - timedelta(days=5)
    client = _client(base_url, "GetEndDeviceEvents")
    reply = client.service.GetEndDeviceEvents(
        Header={"Verb": "get", "Noun": "EndDeviceEvents", "MessageID": "split-events"},
        Request={"GetEndDeviceEvents": {
            "Meter": [{"mRID": m} for m in mrids],
            "TimeSchedule": [{"scheduleInterval": {"start": start, "end": end}}]},
            "Option": [{"name": "DataSource", "value": "meter"}]})
    assert reply.Reply.Result == "OK", reply.Reply
    events = reply.Payload.EndDeviceEvents.EndDeviceEvent
    assert {e.Assets.mRID for e in events} == set(mrids)

    store = create_engine(db)
    try:
        with store.connect() as connection:
            jobs = connection.execute(select(JobRecord.kind, JobRecord.state, JobRecord.device_mrid,
                                             JobRecord.claimed_by)
                                      .where(JobRecord.kind == "events")).all()
            stored = dict(connection.execute(
                select(Device.mrid, func.count()).join(
                    EndDeviceEventRecord, EndDeviceEventRecord.device_id == Device.id)
                .group_by(Device.mrid)).all())
    finally:
        store.dispose()
    assert sorted((kind, state, device) for kind, state, device, _ in jobs) == [
        ("events", "done", m) for m in sorted(mrids)]
    assert all(f":{engine.pid}:" in claimed_by for *_, claimed_by in jobs)
    assert sum(stored.values()) == len(events) and set(stored) == set(mrids)


def test_a_serve_killed_mid_fetch_resumes_the_fetch_when_it_starts_again(tmp_path):
    processes: list[subprocess.Popen] = []
    # Slow meters: each fetch (five logs) takes seconds, so the kill lands mid-session.
    inventory, mrids = _simulate(tmp_path, 4, 0.25, processes)
    db = f"sqlite:///{tmp_path / 'cimhes.sqlite'}"
    key_file = str(tmp_path / "secret.key")
    args = ("serve", "--inventory", str(inventory), "--db", db, "--host", HOST, "--port", "0",
            "--secret-key-file", key_file, "--no-push", "--sessions", "2",
            "--min-device-gap", "0")
    first = _cimhes(*args)
    processes.append(first)
    try:
        base_url = _ready(first)["base_url"]
        _add_user(db, key_file)
        end = datetime.now(timezone.utc)

        def ask():
            try:
                _client(base_url, "GetEndDeviceEvents").service.GetEndDeviceEvents(
                    Header={"Verb": "get", "Noun": "EndDeviceEvents", "MessageID": "k-1"},
                    Request={"GetEndDeviceEvents": {
                        "Meter": [{"mRID": m} for m in mrids],
                        "TimeSchedule": [{"scheduleInterval": {
                            "start": end - timedelta(days=5), "end": end}}]},
                        "Option": [{"name": "DataSource", "value": "meter"}]})
            except (TransportError, RequestException):
                pass  # its server was killed under it
        caller = threading.Thread(target=ask, daemon=True)
        caller.start()

        store = create_engine(db)

        def states():
            with store.connect() as connection:
                return dict(connection.execute(select(JobRecord.state, func.count())
                                               .group_by(JobRecord.state)).all())
        # Two sessions at a time (a claimed job is "running" in the store from its claim): once
        # the first two fetches are done, the other two are in their sessions of ~3 s each.
        _until(lambda: (lambda s: s.get("done", 0) >= 1 and s.get("running", 0) >= 1)(
            states()), 60, "a fetch done while others run")
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        caller.join(30)
        left = states()
        assert left.get("done", 0) < 4 and left.get("running", 0) >= 1, left

        second = _cimhes(*args)
        processes.append(second)
        assert _ready(second)["ready"]
        _until(lambda: states() == {"done": 4}, 90, "every fetch done after the restart")
        with store.connect() as connection:
            jobs = connection.execute(select(JobRecord.kind, JobRecord.claimed_by,
                                             JobRecord.attempts)).all()
            stored = dict(connection.execute(
                select(Device.mrid, func.count()).join(
                    EndDeviceEventRecord, EndDeviceEventRecord.device_id == Device.id)
                .group_by(Device.mrid)).all())
        store.dispose()
        assert {kind for kind, _, _ in jobs} == {"events"}
        # Each finished once, by the process that resumed it or by the first for those it
        # finished before it died; every meter's events are stored.
        assert all(attempts == 1 for _, _, attempts in jobs)
        assert sum(f":{second.pid}:" in claimed for _, claimed, _ in jobs) >= 1
        assert set(stored) == set(mrids) and all(stored.values())
    finally:
        _stop(processes[::-1])


def test_collect_runs_an_events_schedule_as_jobs_and_stores_the_events(tmp_path):
    processes: list[subprocess.Popen] = []
    try:
        # Seven meters: the simulator logs a power failure on each meter one day in seven
        # (fixtures/meter_model.py), so one of them has one in any previous day.
        inventory, mrids = _simulate(tmp_path, 7, 0.0, processes)
        schedules = tmp_path / "schedules.json"
        schedules.write_text(json.dumps({"schedules": [
            {"name": "daily-events", "cron": "5 * * * *", "group": "all",
             "event_logs": ["standard", "power failure"], "window": "previous-day",
             "deadline_hours": 1}]}))
        db = f"sqlite:///{tmp_path / 'collect.sqlite'}"
        done = subprocess.run(
            [sys.executable, "-m", "cimhes.endpoints.cli", "collect", "--schedules",
             str(schedules), "--schedule", "daily-events", "--inventory", str(inventory),
             "--db", db, "--secret-key-file", str(tmp_path / "secret.key")],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "7 done (0 with intervals missing), 0 failed, 0 pending" in done.stdout
        store = create_engine(db)
        try:
            with store.connect() as connection:
                jobs = connection.execute(select(JobRecord.kind, JobRecord.state,
                                                 JobRecord.reading_types)).all()
                logs = set(connection.execute(select(EndDeviceEventRecord.log)).scalars())
        finally:
            store.dispose()
        assert sorted(map(tuple, ((k, s, tuple(t)) for k, s, t in jobs))) == [
            ("events", "done", ("standard", "power failure"))] * 7
        assert logs == {"0.0.99.98.0.255", "1.0.99.97.0.255:long power failure"}
    finally:
        _stop(processes)
