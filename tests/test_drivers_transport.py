"""The Twisted carriage of a DLMS session: meters that are silent, hang up, or are given up on."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol

from cimhes.drivers import DeviceAddress
from cimhes.drivers.dlms_session import ClientSession
from cimhes.drivers.errors import ConnectionFailed, Timeout
from cimhes.drivers.idis import READING_TYPE_MAP, IdisMeterDriver
from cimhes.drivers.limits import SessionLimits
from cimhes.drivers.transport import connect, send
from cimhes.fixtures.fleet import start_fleet


class Silent(Protocol):
    """A meter that accepts the connection and then never says a word."""

    def connectionMade(self):
        self.factory.connections.append(self)

    def connectionLost(self, reason=None):
        self.factory.lost.append(reason)

    def dataReceived(self, data):
        pass


class HangsUp(Protocol):
    """A meter that drops the connection as soon as it is asked anything."""

    def dataReceived(self, data):
        self.transport.loseConnection()


class Collects(Protocol):
    """A peer that keeps every byte it is sent."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.received = bytearray()

    def connectionLost(self, reason=None):
        self.factory.lost.append(reason)

    def dataReceived(self, data):
        self.received += data


@pytest.fixture
def listening():
    """listening(protocol) -> a DeviceAddress of a meter served by that protocol on loopback."""
    ports = []

    def listen(protocol):
        factory = Factory.forProtocol(protocol)
        factory.connections, factory.lost = [], []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        address = DeviceAddress(f"{protocol.__name__}-mrid", protocol.__name__.upper(),
                                "idis-meter", "127.0.0.1", port.getHost().port)
        return address, factory

    yield listen
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def sleep(seconds):
    waiting = Deferred()
    reactor.callLater(seconds, waiting.callback, None)
    return waiting


@pytest_twisted.ensureDeferred
async def test_meter_that_never_answers_is_a_timeout_naming_it(listening):
    meter, factory = listening(Silent)
    started = reactor.seconds()
    with pytest.raises(Timeout) as timed_out:
        await IdisMeterDriver().read(reactor, meter, list(READING_TYPE_MAP), None, None, 0.3)
    assert timed_out.value.device_mrid == meter.mrid
    assert "AARQ" in timed_out.value.reason
    assert 0.3 <= reactor.seconds() - started < 2.0
    await sleep(0.05)
    assert len(factory.lost) == 1  # the driver closed its side


@pytest_twisted.ensureDeferred
async def test_meter_that_hangs_up_is_connection_failed(listening):
    meter, _ = listening(HangsUp)
    with pytest.raises(ConnectionFailed) as failed:
        await IdisMeterDriver().read(reactor, meter, [], None, None, 5.0)
    assert failed.value.device_mrid == meter.mrid
    assert "AARQ" in failed.value.reason


@pytest_twisted.ensureDeferred
async def test_nobody_listening_is_connection_failed():
    meter = DeviceAddress("nobody-mrid", "NOBODY", "idis-meter", "127.0.0.1", 1)
    with pytest.raises(ConnectionFailed) as failed:
        await connect(reactor, meter, ClientSession(meter.mrid), 2.0)
    assert failed.value.device_mrid == "nobody-mrid"
    assert "127.0.0.1:1" in failed.value.reason


@pytest_twisted.ensureDeferred
async def test_cancelling_a_read_aborts_its_connection(listening):
    meter, factory = listening(Silent)
    reading = IdisMeterDriver().read(reactor, meter, [], None, None, 30.0)
    await sleep(0.1)
    assert len(factory.connections) == 1
    reading.cancel()
    with pytest.raises(CancelledError):
        await reading
    await sleep(0.05)
    assert len(factory.lost) == 1


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_at_once_follows_in_order(listening):
    # send() writes straight to the socket when nothing is queued; the rest of a write larger
    # than the socket's buffers, and every write behind it, go through Twisted's queue.
    meter, factory = listening(Collects)
    connection = await connect(reactor, meter, ClientSession(meter.mrid), 5.0)
    big = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than loopback's send and receive buffers
    send(connection.transport, big)
    assert connection.transport._tempDataBuffer  # the fallback is what this test is about
    send(connection.transport, b"tail")
    for _ in range(200):
        if len(factory.connections[0].received) >= len(big) + 4:
            break
        await sleep(0.05)
    assert factory.connections[0].received == big + b"tail"
    connection.close()


@pytest_twisted.ensureDeferred
async def test_an_association_idle_past_the_response_timeout_is_not_timed_out():
    # The response timer stays armed between exchanges (pushed back by the next request): come
    # due while no request waits, it must not end the session.
    fleet = start_fleet(reactor, 1, base_index=1101, port=0)
    try:
        meter = DeviceAddress(**fleet.inventory()["meters"][0])
        session = ClientSession(meter.mrid, meter.client_address, meter.server_address,
                                meter.security, meter.password)
        connection = await connect(reactor, meter, session, SessionLimits.of(0.3))
        await connection.request(session.associate(), "AARQ")
        await sleep(0.7)
        clock = await connection.request(session.get(8, "0.0.1.0.0.255", 2), "GET clock")
        assert isinstance(clock.value, bytes) and len(clock.value) == 12
        await connection.request(session.release(), "RLRQ")
        connection.close()
    finally:
        await fleet.stop_all()
