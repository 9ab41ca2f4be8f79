"""A restarted `cimhes simulate` is the same HLS-GMAC meters: keys and invocation counters kept in
the file beside its inventory (fixtures/security_file.py), so counters used before the restart
are still refused and the meter's own counters go on rising."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cimhes.drivers import DeviceAddress
from cimhes.drivers.ciphering import HlsGmac
from cimhes.drivers.dlms_session import Associated, AttributeValue, AuthenticationRequired, \
    ClientSession, Released
from cimhes.drivers.errors import CounterRejected
from cimhes.fixtures.security_file import load_securities, security_file_for

CIMHES = Path(sys.executable).with_name("cimhes")
CLIENT_TITLE = bytes.fromhex("43494d4845530001")


def simulate(inventory: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [str(CIMHES), "simulate", "--meters", "1", "--port", "0", "--security", "hls-gmac",
         "--inventory", str(inventory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))
    reader.start()
    reader.join(timeout=30)
    if not line or not line[0]:
        process.kill()
        pytest.fail(f"simulate printed no ready line; stderr:\n{process.stderr.read()}")
    assert json.loads(line[0])["ready"] is True
    return process


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=15) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def session_with(device: DeviceAddress, first: int, last_seen: int = -1):
    """One HLS-GMAC association over a blocking socket: (events in order, the session)."""
    hls = HlsGmac(device.security_keys(), CLIENT_TITLE, bytes.fromhex(device.system_title),
                  first, first + 100, last_seen)
    session = ClientSession(device.mrid, device.client_address, device.server_address,
                            "hls-gmac", None, hls)
    events = []
    with socket.create_connection((device.host, device.port), timeout=10) as sock:

        def exchange(request: bytes):
            sock.sendall(request)
            while True:
                got = session.receive_data(sock.recv(65536))
                if got:
                    events.extend(got)
                    return got[-1]

        event = exchange(session.associate())
        if isinstance(event, AuthenticationRequired):
            event = exchange(session.authenticate())
        if isinstance(event, Associated):
            exchange(session.get(8, "0.0.1.0.0.255", 2))
            exchange(session.release())
    return events, session


def test_the_meters_keys_and_counters_outlive_a_restart(tmp_path):
    inventory = tmp_path / "fleet.json"
    kept = security_file_for(inventory)
    process = simulate(inventory)
    try:
        [entry] = json.loads(inventory.read_text())["meters"]
        device = DeviceAddress.from_inventory(entry)
        events, first = session_with(device, first=5000)
        assert [type(e) for e in events] == [AuthenticationRequired, Associated, AttributeValue,
                                             Released]
        seen = first.last_server_counter
    finally:
        stop(process)
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600  # it holds keys
    [meter] = load_securities(kept).values()
    assert meter.last_client_counter == first.next_client_counter - 1
    assert meter.next_counter > seen

    process = simulate(inventory)
    try:
        [again] = json.loads(inventory.read_text())["meters"]
        del again["port"], entry["port"]  # port 0: another ephemeral port
        assert again == entry  # same address, system title and keys
        device = DeviceAddress.from_inventory(json.loads(inventory.read_text())["meters"][0])
        # A counter the meter accepted before its restart is still refused ...
        events, _ = session_with(device, first=5000)
        assert [type(e) for e in events] == [CounterRejected]
        # ... one above it is taken, and the meter's own counters went on rising.
        events, later = session_with(device, first=first.next_client_counter, last_seen=seen)
        assert [type(e) for e in events][-1] is Released
        assert later.last_server_counter > seen
    finally:
        stop(process)


def test_a_malformed_security_file_is_refused_naming_it(tmp_path):
    inventory = tmp_path / "fleet.json"
    security_file_for(inventory).write_text('{"meters": {"1": {"system_title": "zz"}}}')
    process = subprocess.run(
        [str(CIMHES), "simulate", "--meters", "1", "--port", "0", "--security", "hls-gmac",
         "--inventory", str(inventory)], capture_output=True, text=True, timeout=60)
    assert process.returncode != 0
    assert "fleet.security.json" in process.stderr and "not a simulator security file" in \
        process.stderr
