"""The push listener as `cimhes demo` and `cimhes serve` start it: on the ready line, and a
pushed alarm becomes a stored EndDeviceEvent; `--no-push` leaves it off."""
from __future__ import annotations

import json
import socket
import sqlite3
import time
from datetime import datetime, timezone

from cimhes.cim.end_device_event_types import IDIS_ALARM_BITS
from cimhes.fixtures.push import alarm_body, data_notification, framed

from .test_cli import _start, _stop

POWER_UP, FRAUD_ATTEMPT = 2, 13  # alarm register 1 bits


def _stored_events(db, mrid: str) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [row[0] for row in connection.execute(
            "SELECT e.event_type FROM end_device_event e JOIN device d ON d.id = e.device_id "
            "WHERE d.mrid = ? ORDER BY e.event_type", (mrid,))]


def test_an_alarm_pushed_to_the_demo_becomes_a_stored_end_device_event(tmp_path):
    db = tmp_path / "demo.sqlite"
    process, ready = _start("demo", "--port", "0", "--meters", "2", "--meter-port", "0",
                            "--db", str(db), "--inventory", str(tmp_path / "inventory.json"))
    try:
        push = ready["push"]
        assert push["host"] == "127.0.0.1" and push["port"] > 0
        meter = json.loads((tmp_path / "inventory.json").read_text())["meters"][1]
        apdu = data_notification(alarm_body(meter["name"], 1 << POWER_UP | 1 << FRAUD_ATTEMPT),
                                 datetime.now(timezone.utc).replace(microsecond=0))
        with socket.create_connection((push["host"], push["port"]), timeout=5) as meter_link:
            meter_link.sendall(framed(apdu))
        deadline = time.monotonic() + 15
        while not _stored_events(db, meter["mrid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _stored_events(db, meter["mrid"]) == sorted(
            [IDIS_ALARM_BITS[POWER_UP].event_type, IDIS_ALARM_BITS[FRAUD_ATTEMPT].event_type])
    finally:
        code = _stop(process)
    assert code == 0, process.stderr.read()


def test_no_push_leaves_the_listener_off(tmp_path):
    process, ready = _start("demo", "--port", "0", "--meters", "1", "--meter-port", "0",
                            "--no-push", "--db", str(tmp_path / "demo.sqlite"),
                            "--inventory", str(tmp_path / "inventory.json"))
    try:
        assert ready["push"] == "off"
    finally:
        assert _stop(process) == 0
