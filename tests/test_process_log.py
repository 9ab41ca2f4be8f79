"""The process's log: Twisted's events and Python logging on stderr, one line per event; a client
that hangs up before its answer is one line, and its request is still carried out and stored."""
from __future__ import annotations

import base64
import logging
import socket
import sqlite3
import sys
import time

from cimhes.endpoints.process_log import OneLineFormatter

from .test_cli import _start, _stop

PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


def test_a_traceback_is_one_line():
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed:\n%s", ("why",),
                                   sys.exc_info())
    line = OneLineFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line
    assert line.startswith("ERROR failed:\\nwhy\\nTraceback") and "first\\nsecond" in line


def _request(mrid: str) -> bytes:
    body = (
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
        '<m:GetMeterReadings xmlns:m="http://iec.ch/TC57/2011/GetMeterReadingsMessage" '
        'xmlns:h="http://iec.ch/TC57/2011/schema/message" '
        'xmlns:g="http://iec.ch/TC57/2011/GetMeterReadings#">'
        '<m:Header><h:Verb>get</h:Verb><h:Noun>MeterReadings</h:Noun>'
        '<h:MessageID>hang-up-1</h:MessageID></m:Header>'
        f'<m:Request><g:GetMeterReadings><g:EndDevice><g:mRID>{mrid}</g:mRID></g:EndDevice>'
        f'<g:ReadingType><g:mRID>{PLUS_A}</g:mRID></g:ReadingType></g:GetMeterReadings>'
        '</m:Request></m:GetMeterReadings></s:Body></s:Envelope>').encode()
    return body


def test_a_hang_up_is_one_log_line_and_the_work_is_still_stored(tmp_path):
    db = tmp_path / "demo.sqlite"
    # Every meter answer 0.4 s late: a read takes ~2 s, time enough to hang up first.
    process, ready = _start("demo", "--port", "0", "--meters", "1", "--meter-port", "0",
                            "--delay", "0.4", "--db", str(db))
    try:
        host, port = ready["base_url"].removeprefix("http://").split(":")
        body = _request(ready["meters"][0])
        credentials = base64.b64encode(f"{ready['user']}:{ready['password']}".encode())
        head = (f"POST /cim/GetMeterReadings HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: text/xml; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nAuthorization: Basic ").encode() + \
            credentials + b"\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(head + body)
            time.sleep(0.5)  # admitted and reading, not answered
        for _ in range(100):  # the read finishes after the hang-up, and is stored
            time.sleep(0.1)
            with sqlite3.connect(db) as connection:
                rows = connection.execute(
                    "SELECT count(*) FROM reading").fetchone()[0]
                logged = connection.execute(
                    "SELECT message_id, result FROM request").fetchall()
            if rows and logged and all(result for _, result in logged):
                break  # stored, and the request answered (it is logged as it arrives)
        assert rows == 1
        assert ("hang-up-1", "OK") in logged
    finally:
        _stop(process)
    stderr = process.stderr.read()
    lines = stderr.splitlines()
    hang_ups = [line for line in lines if "hung up before the answer" in line]
    assert len(hang_ups) == 1, stderr
    assert "Traceback" not in stderr, stderr
    # Twisted's own events reach the same log, one line each, without a line per factory.
    assert any(" twisted: " in line and "Site starting on" in line for line in lines), stderr
    assert not any("Starting factory" in line for line in lines), stderr
