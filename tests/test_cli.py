"""The `cimhes` command as scripts use it: the ready line, a real SOAP call, a clean stop."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .credentials import zeep_client

CIMHES = Path(sys.executable).with_name("cimhes")
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


def _start(*args: str) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen([str(CIMHES), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))
    reader.start()
    reader.join(timeout=30)
    if not line or not line[0]:
        process.kill()
        pytest.fail(f"{args[0]} printed no ready line; stderr:\n{process.stderr.read()}")
    return process, json.loads(line[0])


def _stop(process: subprocess.Popen, sig=signal.SIGINT) -> int:
    process.send_signal(sig)
    try:
        return process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()


def _read_registers(base_url: str, mrids: list[str], user: str, password: str):
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl", name=user, password=password)
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings"},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": m} for m in mrids],
                                      "ReadingType": [{"mRID": PLUS_A}]}})


def test_demo_prints_ready_serves_readings_and_stops_on_ctrl_c(tmp_path):
    process, ready = _start("demo", "--port", "0", "--meters", "2", "--meter-port", "0",
                            "--db", str(tmp_path / "demo.sqlite"))
    try:
        assert ready["ready"] is True
        assert ready["base_url"].startswith("http://127.0.0.1:")
        assert len(ready["meters"]) == 2
        assert ready["user"] == "demo" and len(ready["password"]) >= 12
        assert ready["services"] == {name: f"{ready['base_url']}/cim/{name}" for name in (
            "GetMeterReadings", "GetEndDeviceEvents", "ExecuteEndDeviceControls")}
        reply = _read_registers(ready["base_url"], ready["meters"], ready["user"],
                                ready["password"])
        assert reply.Reply.Result == "OK"
        assert {mr.Meter.mRID for mr in reply.Payload.MeterReadings.MeterReading} == \
            set(ready["meters"])
    finally:
        code = _stop(process)
    assert code == 0, process.stderr.read()


def test_simulate_writes_an_inventory_that_serve_loads(tmp_path):
    inventory = tmp_path / "inventory.json"
    fleet, ready = _start("simulate", "--meters", "3", "--port", "0",
                          "--inventory", str(inventory))
    try:
        assert ready == {"ready": True, "inventory": str(inventory), "meters": 3}
        entries = json.loads(inventory.read_text())["meters"]
        assert len(entries) == 3
        db = str(tmp_path / "serve.sqlite")
        _admin("user", "add", "mdm", "--role", "readings-reader", "--password-stdin",
               "--db", db, stdin="mdm-password-1\n")
        server, served = _start("serve", "--push-port", "0",
                                "--inventory", str(inventory), "--port", "0",
                                "--db", db)
        try:
            assert served["meters"] == [e["mrid"] for e in entries]
            assert "password" not in served
            reply = _read_registers(served["base_url"], served["meters"], "mdm",
                                    "mdm-password-1")
            assert reply.Reply.Result == "OK"
            assert len(reply.Payload.MeterReadings.MeterReading) == 3
        finally:
            assert _stop(server, signal.SIGTERM) == 0
    finally:
        assert _stop(fleet, signal.SIGTERM) == 0


def _admin(*args: str, stdin: str = "", code: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([str(CIMHES), *args], input=stdin, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == code, done.stderr
    return done


def test_user_commands_change_users_and_each_change_is_in_the_csv_audit(tmp_path):
    db = str(tmp_path / "admin.sqlite")
    _admin("user", "add", "ops", "--role", "switch-operator", "--role", "readings-reader",
           "--digest", "--password-stdin", "--db", db, stdin="ops-password-1\n")
    _admin("user", "grant", "ops", "load-limit-operator", "--db", db)
    _admin("user", "revoke", "ops", "readings-reader", "--db", db)
    _admin("user", "disable", "ops", "--db", db)
    listed = _admin("user", "list", "--db", db).stdout.splitlines()
    assert listed == ["ops\tdisabled digest\tload-limit-operator,switch-operator"]
    short = _admin("user", "add", "x", "--password-stdin", "--db", db, stdin="short\n", code=2)
    assert "8 to 1024 characters" in short.stderr
    again = _admin("user", "add", "ops", "--password-stdin", "--db", db,
                   stdin="ops-password-2\n", code=2)
    assert "exists" in again.stderr
    roles = _admin("user", "roles").stdout
    assert "switch-operator" in roles and "load-limit-operator" in roles

    out = tmp_path / "audit.csv"
    _admin("audit", "export", "--db", db, "--out", str(out))
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0][:4] == ["at", "actor", "action", "outcome"]
    assert [(r[2], r[6]) for r in rows[1:]] == [
        ("user.add", "ops"), ("user.grant", "ops"), ("user.revoke", "ops"),
        ("user.disable", "ops")]
    assert all(r[1].startswith("cli:") and r[4] == "local" for r in rows[1:])
    assert "ops-password" not in out.read_text()


def test_a_bad_inventory_is_one_clear_line_and_exit_code_2(tmp_path):
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"meters": [{
        "mrid": "m-1", "name": "X1", "device_type": "gas-meter", "host": "127.0.1.9",
        "port": 4059, "client_address": 1, "server_address": 1, "security": "low",
        "password": "12345678"}]}))
    for content, expected in [(None, "gas-meter"), ("{", "is not JSON"),
                              ('{"devices": []}', "is not an inventory")]:
        if content is not None:
            inventory.write_text(content)
        done = subprocess.run([str(CIMHES), "serve", "--push-port", "0",
                               "--inventory", str(inventory), "--port", "0",
                               "--db", str(tmp_path / "x.sqlite")],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2
        assert done.stdout == ""
        assert expected in done.stderr and "Traceback" not in done.stderr


def test_a_port_in_use_is_one_clear_line_and_exit_code_2(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(CIMHES), "demo", "--port", str(port), "--meters", "1",
                               "--meter-port", "0", "--db", str(tmp_path / "x.sqlite")],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "Address already in use" in done.stderr and "Traceback" not in done.stderr


def test_hls_gmac_fleets_write_their_keys_to_the_inventory_and_are_read_with_them(tmp_path):
    inventory = tmp_path / "hls.json"
    fleet, ready = _start("simulate", "--meters", "2", "--port", "0", "--security", "hls-gmac",
                          "--inventory", str(inventory))
    try:
        entries = json.loads(inventory.read_text())["meters"]
        assert inventory.stat().st_mode & 0o077 == 0  # keys: readable by the owner only
        for entry in entries:
            assert entry["security"] == "hls-gmac" and "password" not in entry
            assert len(bytes.fromhex(entry["system_title"])) == 8
            assert len(bytes.fromhex(entry["encryption_key"])) == 16
            assert len(bytes.fromhex(entry["authentication_key"])) == 16
        db = str(tmp_path / "serve.sqlite")
        _admin("user", "add", "mdm", "--role", "readings-reader", "--password-stdin",
               "--db", db, stdin="mdm-password-1\n")
        server, served = _start("serve", "--push-port", "0",
                                "--inventory", str(inventory), "--port", "0",
                                "--db", db)
        try:
            reply = _read_registers(served["base_url"], served["meters"], "mdm",
                                    "mdm-password-1")
            assert reply.Reply.Result == "OK", reply.Reply
        finally:
            assert _stop(server, signal.SIGTERM) == 0
        logs = server.stderr.read()
        assert not [e for e in entries if e["encryption_key"] in logs or e["authentication_key"] in logs]
    finally:
        assert _stop(fleet, signal.SIGTERM) == 0


def test_demo_with_hls_gmac_names_its_inventory_in_the_ready_line(tmp_path):
    inventory = tmp_path / "demo-inventory.json"
    process, ready = _start("demo", "--port", "0", "--meters", "2", "--meter-port", "0",
                            "--security", "hls-gmac", "--inventory", str(inventory),
                            "--db", str(tmp_path / "demo.sqlite"))
    try:
        assert ready["inventory"] == str(inventory)
        entries = json.loads(inventory.read_text())["meters"]
        assert [e["mrid"] for e in entries] == ready["meters"]
        assert all(e["security"] == "hls-gmac" and e["encryption_key"] for e in entries)
        reply = _read_registers(ready["base_url"], ready["meters"], ready["user"],
                                ready["password"])
        assert reply.Reply.Result == "OK", reply.Reply
    finally:
        assert _stop(process) == 0


def test_an_inventory_key_that_is_not_hex_is_refused_without_showing_it(tmp_path):
    inventory = tmp_path / "inventory.json"
    secret = "zz" + "11" * 15
    inventory.write_text(json.dumps({"meters": [{
        "mrid": "m-1", "name": "X1", "device_type": "idis-meter", "host": "127.0.1.9",
        "client_address": 1, "security": "hls-gmac", "system_title": "43494d0000000001",
        "encryption_key": secret, "authentication_key": "22" * 16}]}))
    done = subprocess.run([str(CIMHES), "serve", "--push-port", "0",
                           "--inventory", str(inventory), "--port", "0",
                           "--db", str(tmp_path / "x.sqlite")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "m-1" in done.stderr and "encryption_key is not a hex string" in done.stderr
    assert secret not in done.stderr and "22" * 16 not in done.stderr
