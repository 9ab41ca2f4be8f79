"""A collection killed with SIGKILL mid-way and started again: every meter done exactly once.

Real processes: the simulated fleet (`cimhes simulate`) and `cimhes collect` each run in their
own process; the collector is killed while sessions are open, then run again on the same
database, and the job table and the readings are checked afterwards.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from cimhes.engine.jobs import JobRecord, JobStore
from cimhes.engine.store import Store

PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MINUS_A_PROFILE = "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
METERS = 30


def _cimhes(*args: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cimhes.endpoints.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


@pytest.fixture
def fleet(tmp_path):
    inventory = tmp_path / "inventory.json"
    simulator = _cimhes("simulate", "--meters", str(METERS), "--port", "0", "--delay", "0.04",
                        "--inventory", str(inventory))
    try:
        ready = json.loads(simulator.stdout.readline())
        assert ready["ready"], ready
        yield inventory
    finally:
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(10)


def _wait_for_done(process: subprocess.Popen, at_least: int, timeout: float) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r": (\d+) done", line)
        if found and int(found.group(1)) >= at_least:
            return lines
    raise AssertionError(f"collector never reached {at_least} done: {lines}\n"
                         f"{process.stderr.read() if process.poll() is not None else ''}")


def test_a_collection_killed_mid_way_resumes_and_reads_every_meter_exactly_once(tmp_path, fleet):
    schedules = tmp_path / "schedules.json"
    schedules.write_text(json.dumps({"schedules": [{
        "name": "nightly-profile", "cron": "0 1 * * *", "group": "all",
        "reading_types": [PLUS_A_PROFILE, MINUS_A_PROFILE], "window": "previous-day",
        "deadline_hours": 20}]}))
    db = tmp_path / "collect.sqlite"
    at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = ("collect", "--schedules", str(schedules), "--schedule", "nightly-profile",
               "--inventory", str(fleet), "--db", str(db), "--at", at, "--sessions", "3",
               "--min-device-gap", "0", "--progress-every", "0.1")

    first = _cimhes(*command)
    try:
        _wait_for_done(first, 6, timeout=60)
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()

    store = Store(f"sqlite:///{db}")
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(JobRecord.__table__.select()).mappings().all()
        states = [row["state"] for row in rows]
        assert len(rows) == METERS
        assert states.count("done") >= 6
        assert "running" in states  # killed with sessions open
        done_before = {row["id"]: row["finished_at"] for row in rows if row["state"] == "done"}
    finally:
        store.close()

    second = _cimhes(*command)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, out + err
    assert "resumed, 30 meters" in out
    assert re.search(r"unfinished jobs requeued", err)

    store = Store(f"sqlite:///{db}")
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(JobRecord.__table__.select()).mappings().all()
        assert len(rows) == METERS and {row["state"] for row in rows} == {"done"}
        # What was finished before the kill was not run again ...
        for row in rows:
            if row["id"] in done_before:
                assert row["finished_at"] == done_before[row["id"]]
            assert row["attempts"] == 1 and row["missing"] is None
        # ... and every meter's day is stored, each interval once.
        key = JobStore(store).requests()[0][0]
        assert JobStore(store).progress(key).counts == {"done": METERS}
        for mrid in {row["device_mrid"] for row in rows}:
            for reading_type in (PLUS_A_PROFILE, MINUS_A_PROFILE):
                times = [t for t, _ in store.stored_values(mrid, reading_type)]
                assert len(times) == len(set(times)) == 96
    finally:
        store.close()
