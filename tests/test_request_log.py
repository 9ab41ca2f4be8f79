"""The request log across a crash: a request is logged as it arrives, and one that was in flight
when the process was killed (kill -9) shows as "interrupted" after the restart."""
from __future__ import annotations

import base64
import signal
import socket
import sqlite3
import time

from .test_cli import _start, _stop
from .test_process_log import _request


def _rows(db):
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT message_id, result, replied_at FROM request ORDER BY id").fetchall()


def test_a_request_in_flight_at_a_kill_shows_as_interrupted_after_the_restart(tmp_path):
    db = tmp_path / "demo.sqlite"
    args = ("demo", "--port", "0", "--meters", "1", "--meter-port", "0", "--delay", "1.0",
            "--db", str(db))
    process, ready = _start(*args)
    try:
        host, port = ready["base_url"].removeprefix("http://").split(":")
        body = _request(ready["meters"][0])
        credentials = base64.b64encode(f"{ready['user']}:{ready['password']}".encode())
        head = (f"POST /cim/GetMeterReadings HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: text/xml; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nAuthorization: Basic ").encode() + \
            credentials + b"\r\n\r\n"
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(head + body)
        waited_until = time.monotonic() + 15  # logged on arrival, long before the ~5 s read
        while not _rows(db) and time.monotonic() < waited_until:  # is answered; a busy
            time.sleep(0.05)                                    # machine may take a while
        assert _rows(db) == [("hang-up-1", None, None)]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        sock.close()
    finally:
        if process.poll() is None:
            process.kill()

    process, _ = _start(*args)  # the next start on the same database
    try:
        assert _rows(db) == [("hang-up-1", "interrupted", None)]
    finally:
        _stop(process)
    assert "1 requests were in flight when the previous process stopped" in process.stderr.read()
