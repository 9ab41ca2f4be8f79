"""Secrets: meter passwords sealed in the store with the operator's key, files readable by their
owner only, and no SQL text, parameters or secret in any reply or log line when the store fails
(every log and reply of these fault tests is searched for the secrets in play)."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_twisted
import requests
from cryptography.fernet import Fernet
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.sealed import KEY_ENVIRONMENT_VARIABLE, SecretBox, WrongSecretKey
from cimhes.engine.store import Store
from cimhes.fixtures.fleet import start_fleet, write_inventory

from .credentials import TEST_PASSWORD, TEST_USER, add_test_user

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
METER_PASSWORD = "Zq8pW2xK"  # LLS: eight octets
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
CIMHES = Path(sys.executable).with_name("cimhes")
# What must never reach a reply or a log line.
LEAKS = ("INSERT", "SELECT", "[SQL", "[parameters", METER_PASSWORD, TEST_PASSWORD,
         METER_PASSWORD.encode().hex())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _device(password=METER_PASSWORD, mrid="m-1") -> DeviceAddress:
    return DeviceAddress.from_inventory({
        "mrid": mrid, "name": "serial-1", "device_type": "idis-meter", "host": "127.0.0.1",
        "port": 4059, "client_address": 1, "server_address": 1, "security": "low",
        "password": password})


def test_a_meter_password_is_sealed_in_the_database_and_opens_with_the_key(tmp_path):
    box = SecretBox.from_file(tmp_path / "key")
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", box)
    store.load_inventory([_device()])
    (token,) = sqlite3.connect(tmp_path / "db.sqlite").execute(
        "SELECT sealed_password FROM device").fetchone()
    assert METER_PASSWORD not in token and token.startswith("gAAAA")  # a Fernet token
    for path in tmp_path.glob("db.sqlite*"):  # nowhere in the files, WAL included
        assert METER_PASSWORD.encode() not in path.read_bytes(), path
    assert store.find_devices(["m-1"], [])["m-1"].password == METER_PASSWORD
    store.close()

    # The same database under another key says so, and shows neither key nor token.
    other = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", SecretBox.ephemeral())
    with pytest.raises(WrongSecretKey, match="sealed with another key") as caught:
        other.find_devices(["m-1"], [])
    assert token not in str(caught.value)
    other.close()


def test_hls_keys_are_sealed_too(tmp_path):
    keys = {"encryption_key": "000102030405060708090a0b0c0d0e0f",
            "authentication_key": "d0d1d2d3d4d5d6d7d8d9dadbdcdddedf"}
    device = DeviceAddress.from_inventory({
        "mrid": "m-2", "name": "serial-2", "device_type": "idis-meter", "host": "127.0.0.1",
        "port": 4059, "client_address": 1, "server_address": 1, "security": "hls-gmac",
        "system_title": "4142430000000001", **keys})
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", SecretBox.from_file(tmp_path / "key"))
    store.load_inventory([device])
    found = store.find_devices(["m-2"], [])["m-2"]
    assert (found.encryption_key, found.authentication_key) == tuple(keys.values())
    store.close()
    for path in tmp_path.glob("db.sqlite*"):
        data = path.read_bytes()
        for key in keys.values():
            assert key.encode() not in data and bytes.fromhex(key) not in data, path


def test_the_key_comes_from_the_environment_when_set(tmp_path, monkeypatch):
    key = Fernet.generate_key()
    monkeypatch.setenv(KEY_ENVIRONMENT_VARIABLE, key.decode())
    box = SecretBox.from_file(tmp_path / "never-made.key")
    assert not (tmp_path / "never-made.key").exists()
    assert Fernet(key).decrypt(box.seal("x").encode()) == b"x"
    monkeypatch.setenv(KEY_ENVIRONMENT_VARIABLE, "not a key")
    with pytest.raises(ValueError, match=f"{KEY_ENVIRONMENT_VARIABLE} is not a Fernet key"):
        SecretBox.from_file(tmp_path / "never-made.key")


def test_database_key_and_inventory_files_are_readable_by_their_owner_only(tmp_path):
    os.umask(0o022)  # the usual umask would make them world-readable
    box = SecretBox.from_file(tmp_path / "var" / "key")
    store = Store(f"sqlite:///{tmp_path / 'var' / 'db.sqlite'}", box)
    store.load_inventory([_device()])
    fleet = start_fleet(reactor, 1, clock=lambda: NOW, port=0, base_index=241)
    try:
        write_inventory(tmp_path / "inventory.json", fleet)
    finally:
        fleet.stop_all()
    for path in (tmp_path / "var" / "db.sqlite", tmp_path / "var" / "db.sqlite-wal",
                 tmp_path / "var" / "key", tmp_path / "inventory.json"):
        assert _mode(path) == 0o600, path
    store.close()


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 2, clock=lambda: NOW, port=0, base_index=243,
                        password=METER_PASSWORD)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


def _post(base_url: str, mrids: list[str]) -> requests.Response:
    devices = "".join(f"<g:EndDevice><g:mRID>{m}</g:mRID></g:EndDevice>" for m in mrids)
    body = (
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
        '<m:GetMeterReadings xmlns:m="http://iec.ch/TC57/2011/GetMeterReadingsMessage" '
        'xmlns:h="http://iec.ch/TC57/2011/schema/message" '
        'xmlns:g="http://iec.ch/TC57/2011/GetMeterReadings#">'
        '<m:Header><h:Verb>get</h:Verb><h:Noun>MeterReadings</h:Noun></m:Header>'
        f'<m:Request><g:GetMeterReadings>{devices}'
        f'<g:ReadingType><g:mRID>{PLUS_A}</g:mRID></g:ReadingType></g:GetMeterReadings>'
        '</m:Request></m:GetMeterReadings></s:Body></s:Envelope>')
    return requests.post(f"{base_url}/cim/GetMeterReadings", data=body.encode(),
                         headers={"Content-Type": "text/xml; charset=utf-8"},
                         auth=(TEST_USER, TEST_PASSWORD), timeout=30)


@pytest_twisted.inlineCallbacks
def test_a_store_failure_during_a_request_shows_no_sql_and_no_secret(tmp_path, fleet, caplog):
    db = tmp_path / "cimhes.sqlite"
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{db}?timeout=0.2", device_timeout=5.0,
        secret_key_file=str(tmp_path / "secret.key")),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    add_test_user(head_end)
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    base_url = f"http://127.0.0.1:{port.getHost().port}"
    mrids = [m["mrid"] for m in fleet.inventory()["meters"]]
    key = (tmp_path / "secret.key").read_text().strip()
    locker = sqlite3.connect(db, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        caplog.set_level(logging.DEBUG)
        locker.execute("BEGIN IMMEDIATE")  # another writer holds the database
        response = yield deferToThread(_post, base_url, mrids)
        locker.execute("ROLLBACK")
        assert response.status_code == 500
        assert "database error OperationalError: database is locked" in response.text
        assert "log reference" in response.text
        logs = caplog.text
        assert "database is locked" in logs
        for leak in (*LEAKS, key):
            assert leak not in response.text, leak
            assert leak not in logs, leak

        served = yield deferToThread(_post, base_url, mrids)  # and it keeps serving
        assert served.status_code == 200 and ">OK<" in served.text
    finally:
        locker.close()
        yield port.stopListening()
        head_end.store_runner.stop()
        head_end.store.close()


def test_a_start_on_a_locked_database_is_one_line_without_sql_or_passwords(tmp_path):
    db = tmp_path / "cimhes.sqlite"
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"meters": [
        {"mrid": "m-1", "name": "s-1", "device_type": "idis-meter", "host": "127.0.0.1",
         "port": 4059, "client_address": 1, "server_address": 1, "security": "low",
         "password": METER_PASSWORD}]}))
    Store(f"sqlite:///{db}").close()  # the tables exist, so the load is a write
    locker = sqlite3.connect(db, timeout=0, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        finished = subprocess.run(
            [str(CIMHES), "serve", "--push-port", "0", "--inventory", str(inventory), "--port", "0",
             "--db", f"sqlite:///{db}?timeout=0.3",
             "--secret-key-file", str(tmp_path / "key")],
            capture_output=True, text=True, timeout=60)
    finally:
        locker.close()
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("cimhes serve: error: database"), \
        finished.stderr
    assert "database is locked" in errors[0]
    for leak in LEAKS:
        assert leak not in finished.stderr and leak not in finished.stdout, leak


def test_raw_meter_octets_never_reach_an_error_and_the_debug_log_masks_the_password(caplog):
    from cimhes.drivers.dlms_session import (
        EXCEPTION_RESPONSE,
        WRAPPER_HEADER,
        WRAPPER_VERSION,
        ClientSession,
    )

    session = ClientSession("m-1", 1, 1, security="low", password=METER_PASSWORD)
    session.associate()
    # A meter that answers with an exception-response echoing the AARQ, password and all.
    apdu = bytes([EXCEPTION_RESPONSE]) + b"\x60\x36\xa1\x09" + METER_PASSWORD.encode() + b"\x00"
    caplog.set_level(logging.DEBUG)
    (event,) = session.receive_data(WRAPPER_HEADER.pack(WRAPPER_VERSION, 1, 1, len(apdu)) + apdu)
    reason = str(event)
    assert f"({len(apdu)} octets)" in reason
    for leak in (METER_PASSWORD, METER_PASSWORD.encode().hex(), apdu.hex()):
        assert leak not in reason and leak not in caplog.text, leak
    assert "raw octets d860" in caplog.text  # the octets are there for debugging, masked
