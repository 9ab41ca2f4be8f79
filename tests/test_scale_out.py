"""Scale-out: one api and two engine processes of `cimhes serve` over a real RabbitMQ (own vhost)
and a real PostgreSQL (own database), reading a simulated fleet (its own process).

The api process creates a schedule's collection run and hands the jobs out through the work
queue; one engine is killed with SIGKILL while it holds jobs; its unacknowledged jobs are
redelivered to the other, and every meter's day ends stored exactly once. A synchronous
GetMeterReadings over AMQP is answered by the api with readings an engine read. Route slots
(route_lease) never exceed the per-route bound over both engines.
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

import pytest
from lxml import etree
from sqlalchemy import create_engine, func, select, text

from cimhes.cim.codec import encode_get_meter_readings
from cimhes.cim.message import Header, Verb
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.engine.jobs import JobRecord
from cimhes.engine.route_leases import RouteLeases
from cimhes.engine.store import Device, ReadingRecord, Store
from cimhes.queue.topology import REQUESTS_EXCHANGE

from .brokers import amqp_vhost, ask  # noqa: F401 (fixture)
from .databases import postgres_or_skip

PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MINUS_A_PROFILE = "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
REGISTER = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
METERS = 48
ROUTES = 4
PER_ROUTE = 2
HOST = "127.0.25.1"


def _cimhes(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cimhes.endpoints.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(process: subprocess.Popen, timeout: float = 60.0) -> dict:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0]:
        process.kill()
        raise AssertionError(f"no ready line: {process.stderr.read()[-3000:]}")
    return json.loads(line[0])


@pytest.fixture
def fleet(tmp_path):
    inventory = tmp_path / "inventory.json"
    simulator = _cimhes("simulate", "--meters", str(METERS), "--port", "0", "--delay", "0.1",
                        "--inventory", str(inventory))
    try:
        assert _ready(simulator)["ready"]
        # Every meter on one of a few routes (concentrator segments), so the route bound counts.
        data = json.loads(inventory.read_text())
        for index, meter in enumerate(data["meters"]):
            meter["route"] = f"segment-{index % ROUTES}"
        inventory.write_text(json.dumps(data))
        yield inventory, [m["mrid"] for m in data["meters"]]
    finally:
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(10)


def vhost_user(vhost) -> str:
    return vhost.user


def _request(mrids) -> bytes:
    element = encode_get_meter_readings(GetMeterReadings(
        header=Header(verb=Verb.GET, noun="MeterReadings", message_id="scale-1",
                      source="test-mdm"),
        end_devices=tuple(DeviceRef(mrid=m) for m in mrids), reading_types=(REGISTER,)))
    return etree.tostring(element, xml_declaration=True, encoding="UTF-8")


def test_two_engines_one_killed_every_meter_stored_exactly_once(tmp_path, fleet, amqp_vhost,
                                                                 request):
    inventory, mrids = fleet
    db = postgres_or_skip(request).new_database(migrated=True)
    now = datetime.now(timezone.utc)
    fire = now - timedelta(minutes=1)
    schedules = tmp_path / "schedules.json"
    schedules.write_text(json.dumps({"schedules": [{
        "name": "nightly-profile", "cron": f"{fire.minute} {fire.hour} * * *", "group": "all",
        "reading_types": [PLUS_A_PROFILE, MINUS_A_PROFILE], "window": "previous-day",
        "deadline_hours": 20}]}))
    common = ("--db", db, "--amqp-url", amqp_vhost.url, "--host", HOST, "--port", "0",
              "--secret-key-file", str(tmp_path / "secret.key"),
              "--max-sessions-per-route", str(PER_ROUTE), "--min-device-gap", "0", "--no-push")
    processes: list[subprocess.Popen] = []
    engine_store = create_engine(db)
    try:
        # The api first: it loads the inventory and its scheduler makes the run at
        # once; its jobs wait in the durable queue until an engine takes them.
        api = _cimhes("serve", "--role", "api", "--inventory", str(inventory),
                      "--schedules", str(schedules), "--remote-wait", "60", *common)
        processes.append(api)
        assert _ready(api)["ready"]
        engines = []
        for _ in range(2):
            engine = _cimhes("serve", "--role", "engine", "--sessions", "6",
                             "--job-prefetch", "12", "--route-lease", "20", *common)
            processes.append(engine)
            engines.append(engine)
        for engine in engines:
            assert _ready(engine)["ready"]

        victim = engines[0]
        victim_jobs: set[int] = set()
        deadline = time.monotonic() + 60
        busiest_route = 0
        while time.monotonic() < deadline:
            with engine_store.connect() as connection:
                states = dict(connection.execute(
                    select(JobRecord.state, func.count()).group_by(JobRecord.state)).all())
                running = connection.execute(select(JobRecord.id).where(
                    JobRecord.state == "running",
                    JobRecord.claimed_by.like(f"%:{victim.pid}:%"))).scalars().all()
                busiest_route = max(busiest_route, connection.scalar(text(
                    "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM route_lease "
                    "GROUP BY route) AS per_route")))
            done = states.get("done", 0)
            if done >= METERS // 4 and running:
                victim_jobs = set(running)
                os.kill(victim.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        assert victim_jobs, f"the victim never held jobs mid-collection: {states}"
        assert victim.wait(10) == -signal.SIGKILL

        # AMQP callers are cimhes users named as their AMQP user (queue/authorisation.py).
        added = subprocess.run(
            [sys.executable, "-m", "cimhes.endpoints.cli", "user", "add", vhost_user(amqp_vhost),
             "--role", "readings-reader", "--password-stdin", "--db", db,
             "--secret-key-file", str(tmp_path / "secret.key")],
            input="not-used-over-amqp-1\n", capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        # A synchronous request through the api, amid the collection: its jobs (on-demand,
        # ahead of scheduled ones) run on the surviving engine.
        props, body = ask(amqp_vhost.url, REQUESTS_EXCHANGE, "MeterReadings",
                          _request(mrids[:3]), correlation_id="sync-1", timeout=60)
        reply = etree.fromstring(body)
        assert reply.findtext("{*}Reply/{*}Result") == "OK", body.decode()[:2000]
        read = {r.findtext("{*}Meter/{*}mRID") for r in reply.findall(".//{*}MeterReading")}
        assert read == set(mrids[:3])
        assert all(r.find("{*}Readings/{*}value") is not None
                   for r in reply.findall(".//{*}MeterReading"))

        # The survivor finishes everything, the victim's unacknowledged jobs too.
        total = METERS + 3
        deadline = time.monotonic() + 75
        while time.monotonic() < deadline:
            with engine_store.connect() as connection:
                states = dict(connection.execute(
                    select(JobRecord.state, func.count()).group_by(JobRecord.state)).all())
                busiest_route = max(busiest_route, connection.scalar(text(
                    "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM route_lease "
                    "GROUP BY route) AS per_route")))
            if states.get("done", 0) == total:
                break
            time.sleep(0.2)
        assert states == {"done": total}, states
        assert 1 <= busiest_route <= PER_ROUTE  # slots were used, never more than the bound

        store = Store(db)
        try:
            with store.engine.connect() as connection:
                jobs = connection.execute(select(JobRecord)).mappings().all()
                # Each of the victim's jobs was finished by the survivor, once.
                survivor = f":{engines[1].pid}:"
                for job in jobs:
                    if job["id"] in victim_jobs:
                        assert survivor in job["claimed_by"] and job["missing"] is None
                counts = connection.execute(
                    select(Device.mrid, ReadingRecord.reading_type, func.count(),
                           func.count(func.distinct(ReadingRecord.timestamp)))
                    .join(Device, Device.id == ReadingRecord.device_id)
                    .where(ReadingRecord.reading_type.in_([PLUS_A_PROFILE, MINUS_A_PROFILE]))
                    .group_by(Device.mrid, ReadingRecord.reading_type)).all()
                corrections = connection.scalar(text("SELECT count(*) FROM reading_correction"))
            assert len(counts) == METERS * 2
            assert {(rows, distinct) for _, _, rows, distinct in counts} == {(96, 96)}
            assert corrections == 0  # a job run twice stored the same values: nothing replaced
        finally:
            store.close()
        # A clean stop gives the survivor's route slots back.
        engines[1].send_signal(signal.SIGTERM)
        assert engines[1].wait(20) == 0
        store = Store(db)
        try:
            leases = RouteLeases(store, PER_ROUTE)
            holders = [engine for r in range(ROUTES)
                       for engine in leases.held(f"segment-{r}", datetime.now(timezone.utc))]
            # (The killed engine's slots stay until they expire, --route-lease after its death.)
            assert not [e for e in holders if survivor in e], holders
        finally:
            store.close()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)
        engine_store.dispose()


@pytest.mark.parametrize("args, says", [
    (("--role", "engine", "--db", "x.sqlite", "--amqp-url", "amqp://guest:guest@127.0.25.1/"),
     "needs a database server shared by every process"),
    (("--role", "api", "--inventory", "inv.json", "--db", "postgresql+psycopg://u@127.0.25.1/x"),
     "--role api needs --amqp-url"),
    (("--role", "all",), "--inventory is required"),
])
def test_a_role_that_cannot_work_is_refused_in_one_line(tmp_path, monkeypatch, args, says):
    monkeypatch.delenv("CIMHES_AMQP_URL", raising=False)
    done = subprocess.run([sys.executable, "-m", "cimhes.endpoints.cli", "serve", "--port", "0",
                           "--host", HOST, "--no-push", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)
    assert done.returncode == 2
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
