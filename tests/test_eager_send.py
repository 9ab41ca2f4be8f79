"""A meter request goes on the wire when it is made, not at the reactor's next turn
(drivers/transport.py: send), and never out of order with what Twisted still holds."""
from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol

from cimhes.drivers.transport import send as send_now


class Client(Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)


@pytest.fixture
def peer():
    listener = socket.socket()
    listener.bind(("127.0.9.1", 0))
    listener.listen(4)
    yield listener
    listener.close()


async def _connected(peer) -> tuple[Protocol, socket.socket]:
    factory = ClientFactory.forProtocol(Client)
    factory.made = Deferred()
    reactor.connectTCP(*peer.getsockname(), factory)
    client = await factory.made
    accepted, _ = peer.accept()
    return client, accepted


def _received(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1000, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


@pytest_twisted.ensureDeferred
async def test_a_request_is_on_the_wire_before_the_reactor_turns_again(peer):
    client, meter = await _connected(peer)
    try:
        send_now(client.transport, b"AARQ")
        # No reactor turn since: the bytes are at the meter, and the transport is not
        # waiting to write (no epoll change was made for it).
        assert _received(meter) == b"AARQ"
        assert client.transport not in reactor.getWriters()
    finally:
        client.transport.abortConnection()
        meter.close()


@pytest_twisted.ensureDeferred
async def test_bytes_twisted_still_holds_go_first(peer):
    client, meter = await _connected(peer)
    try:
        client.transport.write(b"first,")  # buffered by Twisted until its next turn
        send_now(client.transport, b"second")
        assert _received(meter) == b""  # not ahead of the buffered bytes
        waited = Deferred()
        reactor.callLater(0.05, waited.callback, None)
        await waited
        meter.settimeout(5)
        got = b""
        while len(got) < len(b"first,second"):
            got += meter.recv(100)
        assert got == b"first,second"
    finally:
        client.transport.abortConnection()
        meter.close()


class Channel:
    """A transport that is not a TCP connection (a concentrator's channel, say).

    (Not twisted.internet.testing's StringTransport: importing that module declares interfaces
    on collections.abc's classes, which then breaks xmlschema in the same test process.)"""

    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)


def test_any_other_transport_is_written_the_ordinary_way():
    transport = Channel()
    send_now(transport, b"GET")
    assert transport.written == [b"GET"]
