"""The push listener: a Twisted TCP server where IDIS meters deliver DataNotifications (TCP wrapper).

Each connection feeds a sans-IO `PushReceiver`; every complete APDU goes to `PushIntake.take`,
which never raises. A connection whose framing breaks (bad wrapper header, a frame above
`max_apdu`) is recorded as an unrecognised push and closed; the listener keeps serving. At most
`max_connections` (default 2,000) are open at once: past that a new connection is refused by
closing it at once, which meters retry. A connection idle for `idle_timeout` seconds (default 30)
is closed (one sweep every quarter of it looks at every connection's last activity: a timer per
connection cost more than the push under a storm of one-push connections).
"""
from __future__ import annotations

from datetime import datetime, timezone

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from cimhes.drivers.push import DEFAULT_MAX_APDU, PushError, PushReceiver
from cimhes.engine.events import UnrecognisedPush
from cimhes.engine.push import PushIntake

DEFAULT_MAX_CONNECTIONS = 2000
DEFAULT_IDLE_TIMEOUT = 30.0


class PushProtocol(Protocol):
    log = Logger()

    def __init__(self, factory: PushListenerFactory) -> None:
        self.factory = factory
        self.receiver = PushReceiver(factory.max_apdu)
        self.active_at = factory.reactor.seconds()
        self.peer = "?"

    def connectionMade(self) -> None:
        # A TCP server transport's `client` is the peer's (host, port): `getPeer()` builds an
        # IPv4Address (an attrs class) per call, a tenth of the reactor's time in a storm.
        client = getattr(self.transport, "client", None)
        if isinstance(client, tuple) and len(client) >= 2:
            self.peer = f"{client[0]}:{client[1]}"
        else:
            address = self.transport.getPeer()
            self.peer = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        if len(self.factory.connections) >= self.factory.max_connections:
            self.factory.intake.counts["connections refused"] += 1
            self.transport.abortConnection()
            return
        self.factory.connections.add(self)
        self.factory.watch_idle()

    def dataReceived(self, data: bytes) -> None:
        self.active_at = self.factory.reactor.seconds()
        try:
            apdus = self.receiver.receive_data(data)
        except PushError as broken:
            intake = self.factory.intake
            intake.counts[broken.problem] += 1
            intake.record(UnrecognisedPush(datetime.now(timezone.utc), self.peer, None,
                                           broken.problem, broken.reason, len(data), data[:512]))
            self.transport.loseConnection()
            return
        for apdu in apdus:
            self.factory.intake.take(apdu, self.peer)

    def connectionLost(self, reason=None) -> None:
        self.factory.connections.discard(self)


class PushListenerFactory(Factory):
    def __init__(self, reactor, intake: PushIntake, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_apdu: int = DEFAULT_MAX_APDU):
        self.reactor = reactor
        self.intake = intake
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_apdu = max_apdu
        self.connections: set[PushProtocol] = set()
        self._sweep = None

    def watch_idle(self) -> None:
        """Sweep for idle connections while there are any."""
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.idle_timeout / 4, self._close_idle)

    def _close_idle(self) -> None:
        self._sweep = None
        since = self.reactor.seconds() - self.idle_timeout
        for protocol in [p for p in self.connections if p.active_at <= since]:
            protocol.transport.loseConnection()
        if self.connections:
            self.watch_idle()

    def stopFactory(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None

    def buildProtocol(self, addr) -> PushProtocol:
        return PushProtocol(self)
