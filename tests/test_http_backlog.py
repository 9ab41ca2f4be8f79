"""The HTTP door's listen backlog: a burst of connections arriving while the reactor is busy is
queued by the kernel, not dropped (a dropped SYN is retried only after the client's 1 s
retransmission timeout)."""
from __future__ import annotations

import select
import socket
import time

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.endpoints.http_door import HTTP_BACKLOG, listen_http

BURST = 300  # more than Twisted's default backlog of 50, as 200 callers at once are


def _handshakes_completed(port: int, count: int) -> int:
    """Open `count` connections at once without the reactor turning (this test holds it):
    how many the kernel completed within a few seconds."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.9.1", port))
            sockets.append(s)
        done: set[int] = set()
        deadline = time.monotonic() + 3
        while len(done) < count and time.monotonic() < deadline:
            waiting = [s for s in sockets if s.fileno() not in done]
            _, writable, _ = select.select([], waiting[:1000], [], 0.2)
            for s in writable:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.add(s.fileno())
        return len(done)
    finally:
        for s in sockets:
            s.close()


def test_a_burst_of_connections_beyond_twisteds_default_backlog_is_queued_not_dropped():
    assert HTTP_BACKLOG >= BURST
    listening = listen_http(reactor, 0, Site(Resource()), "127.0.9.1")
    try:
        assert _handshakes_completed(listening.getHost().port, BURST) == BURST
    finally:
        listening.stopListening()
