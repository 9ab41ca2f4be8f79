"""One TCP association per data concentrator, shared by every meter session behind it.

`drivers/transport.py: connect` hands a meter behind a concentrator (`gateway_of(device)`) to
`links_of(reactor).connect(device, session, limits, pacer)`: instead of a TCP connection of its
own, the session's `DlmsConnection` gets a `GatewayChannel` on its concentrator's one
connection (wrapper, port 4059) as its transport. The session's frames (already
gateway-requests naming the meter, its security the meter's own) go out on that connection as
they are; what comes back is cut into frames and routed to the right channel by the sans-IO
`GatewayMux` (`drivers/concentrator.py`): by network id, physical address and client wPort.
Every limit of `SessionLimits` still holds per session (the `DlmsConnection`'s own timers);
closing or aborting a session ends only its channel.

Per concentrator (host, port):
- one connection, opened by the first session that needs it (paced like any connect, bounded
  by `connect_timeout`) and shared by all sessions arriving meanwhile; a connect that fails
  fails each of them with its own device's `ConnectionFailed` / `Timeout`;
- a channel (meter, client wPort) holds one session at a time; a second session to the same
  channel waits for the first to end (an answer could not tell them apart);
- at most `bound` sessions at once when the concentrator's route has a `max_sessions`
  (`bound(host, port, n)`; the engine's dispatcher sets it from the stored routes); a session
  over it waits its turn, in order. Waiting for a channel or a place is bounded by the
  session deadline: past it the session is a `Timeout` naming the concentrator;
- when the connection drops, every session on it fails with `ConnectionFailed` ("the connection
  to the concentrator at host:port was lost"; the driver adds the meter and its physical
  address), and the next session opens a new connection;
- a connection without sessions is closed after `idle_timeout` seconds
  (`DEFAULT_IDLE_TIMEOUT`, 30 s): long enough that a schedule's next meters find it open, short
  enough that an idle head-end does not hold the concentrator's few TCP slots;
- a frame for no open session (a meter's late answer, an unknown address, no gateway header) is
  dropped and logged; the other sessions go on. A stream out of step closes the connection.

The links of a process are kept per reactor (`links_of`): like the reactor's sockets they are
one per process, so every service of the process (reads, event logs, controls) shares them.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    DeferredSemaphore,
    ensureDeferred,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import TimeoutError as DeferredTimeout
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.concentrator import (
    ChannelKey,
    Delivered,
    GatewayMux,
    StreamBroken,
    describe,
    gateway_of,
)
from cimhes.drivers.errors import Timeout
from cimhes.drivers.limits import ConnectionPacer, SessionLimits
from cimhes.drivers.transport import DlmsConnection, connect_failure

log = Logger()

DEFAULT_IDLE_TIMEOUT = 30.0


class ConcentratorLost(Exception):
    """The shared connection to a concentrator ended under the sessions on it."""


class GatewayChannel:
    """The transport a meter session's DlmsConnection sees: its channel on the concentrator's
    connection. Writing sends on the shared connection; closing ends only this channel."""

    def __init__(self, link: ConcentratorLink, channel: ChannelKey, protocol: Protocol,
                 lock: DeferredLock, gate: DeferredSemaphore | None) -> None:
        self._link = link
        self.channel = channel
        self.protocol = protocol
        self.lock = lock  # held by this session: its channel
        self.gate = gate  # a place held in this bound, if any
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._link.write(data)

    def loseConnection(self) -> None:
        self._end(connectionDone)

    def abortConnection(self) -> None:
        self._end(connectionDone)

    def getPeer(self) -> str:
        return f"{self._link.where} ({describe(self.channel)})"

    def deliver(self, frame: bytes) -> None:
        if not self.closed:
            self.protocol.dataReceived(frame)

    def lost(self, reason: Failure) -> None:
        self._end(reason)

    def _end(self, reason: Failure) -> None:
        if self.closed:
            return
        self.closed = True
        self._link.release(self)
        self.protocol.connectionLost(reason)


class _LinkProtocol(Protocol):
    """The one TCP connection; hands everything to its ConcentratorLink."""

    def __init__(self, link: ConcentratorLink) -> None:
        self.link = link
        self.mux = GatewayMux()
        self.up = False

    def connectionMade(self) -> None:
        self.up = True

    def dataReceived(self, data: bytes) -> None:
        self.link.received(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.up = False
        self.link.lost(self, reason)


class ConcentratorLink:
    """Everything the head-end holds for one concentrator (host, port): its connection (when
    open), the sessions on it, the channel locks and the session bound."""

    def __init__(self, reactor: Any, host: str, port: int, idle_timeout: float) -> None:
        self._reactor = reactor
        self.host, self.port = host, port
        self.where = f"{host}:{port}"
        self.idle_timeout = idle_timeout
        self._protocol: _LinkProtocol | None = None
        self._connecting: list[Deferred] | None = None
        self._locks: dict[ChannelKey, DeferredLock] = {}
        self._gate: DeferredSemaphore | None = None
        self.sessions: dict[ChannelKey, GatewayChannel] = {}
        self._idle: Any = None
        self.connections_opened = 0  # TCP connections made to this concentrator so far
        self.strays = 0  # frames dropped for want of a session

    @property
    def connected(self) -> bool:
        return self._protocol is not None and self._protocol.up

    def bound(self, max_sessions: int | None) -> None:
        """At most `max_sessions` sessions at once from now on (None: no bound of its own)."""
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"concentrator {self.where}: max_sessions must be at least 1")
        if self._gate is not None and self._gate.limit == max_sessions:
            return
        if self._gate is not None and (self._gate.tokens != self._gate.limit
                                       or self._gate.waiting):
            # Sessions hold places in the old bound: it stays until they are done.
            log.info("concentrator {where}: bound {bound} applies from the next idle moment",
                     where=self.where, bound=max_sessions)
            return
        self._gate = DeferredSemaphore(max_sessions) if max_sessions is not None else None

    async def open(self, device: DeviceAddress, session: Any, limits: SessionLimits,
                   pacer: ConnectionPacer | None) -> Any:
        """The session's DlmsConnection on its channel, once the channel is free, a place under
        the bound is there and the connection is up."""
        gateway = gateway_of(device)
        channel = GatewayMux.channel_of(gateway, session.client_address)
        lock = self._locks.setdefault(channel, DeferredLock())
        deadline = self._reactor.seconds() + limits.session_deadline
        gate = self._gate
        try:
            await self._wait(lock.acquire(), deadline, device,
                             f"another session to {describe(channel)} to end")
        except BaseException:
            self._forget_lock(channel, lock)
            raise
        placed = False
        try:
            if gate is not None:
                await self._wait(gate.acquire(), deadline, device,
                                 f"a place among its {gate.limit} sessions")
                placed = True
            if not self.connected:
                try:
                    await self._connection(limits, pacer)
                except BaseException:
                    failure = Failure()
                    connect_failure(failure, device, self.where,
                                    min(limits.connect_timeout, limits.session_deadline))
                    raise
        except BaseException:
            if placed:
                gate.release()
            lock.release()
            self._forget_lock(channel, lock)
            raise
        self._cancel_idle()
        connection = DlmsConnection(self._reactor, session, limits)
        transport = GatewayChannel(self, channel, connection, lock, gate if placed else None)
        self._protocol.mux.open(channel)
        self.sessions[channel] = transport
        connection.makeConnection(transport)
        return connection

    async def _wait(self, waiting: Deferred, deadline: float, device: DeviceAddress,
                    what: str) -> None:
        left = deadline - self._reactor.seconds()
        if waiting.called:
            await waiting
            return
        waiting.addTimeout(max(left, 0.0), self._reactor)
        try:
            await waiting
        except DeferredTimeout:
            raise Timeout(device.mrid, f"waited the session deadline at the concentrator "
                          f"{self.where} for {what}") from None

    def _connection(self, limits: SessionLimits, pacer: ConnectionPacer | None) -> Deferred:
        """Fires when the shared connection is up (one attempt for all who wait)."""
        waiting: Deferred = Deferred()
        if self._connecting is not None:
            self._connecting.append(waiting)
            return waiting
        self._connecting = [waiting]
        timeout = min(limits.connect_timeout, limits.session_deadline)
        slot = pacer.slot() if pacer is not None else None

        def start(_: object) -> Deferred:
            endpoint = TCP4ClientEndpoint(self._reactor, self.host, self.port, timeout=timeout)
            return connectProtocol(endpoint, _LinkProtocol(self))

        def done(result: Any) -> None:
            waiters, self._connecting = self._connecting, None
            if not isinstance(result, Failure):
                self._protocol = result
                self.connections_opened += 1
                if not self.sessions and not waiters:
                    self._arm_idle()
            for each in waiters:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(None)

        started = (slot if slot is not None else succeed(None)).addCallback(start)
        started.addBoth(done)
        return waiting

    # -- the shared connection ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.connected:
            self._protocol.transport.write(data)

    def received(self, protocol: _LinkProtocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        for event in protocol.mux.receive_data(data):
            if isinstance(event, Delivered):
                session = self.sessions.get(event.channel)
                if session is not None:
                    session.deliver(event.frame)
            elif isinstance(event, StreamBroken):
                log.warn("concentrator {where}: {reason}; connection closed", where=self.where,
                         reason=event.reason)
                protocol.transport.abortConnection()
                return
            else:
                self.strays += 1
                log.info("concentrator {where}: dropped {reason}", where=self.where,
                         reason=event.reason)

    def lost(self, protocol: _LinkProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._cancel_idle()
        gone = Failure(ConcentratorLost(
            f"the connection to the concentrator at {self.where} was lost "
            f"({reason.getErrorMessage()})"))
        for session in list(self.sessions.values()):
            session.lost(gone)

    def release(self, session: GatewayChannel) -> None:
        """`session` ended: its channel, its place and its lock are free again."""
        if self.sessions.get(session.channel) is session:
            del self.sessions[session.channel]
        if self._protocol is not None:
            self._protocol.mux.close(session.channel)
        if session.gate is not None:
            session.gate.release()
        session.lock.release()
        self._forget_lock(session.channel, session.lock)
        if not self.sessions and self.connected:
            self._arm_idle()

    def _forget_lock(self, channel: ChannelKey, lock: DeferredLock) -> None:
        if not lock.locked and not lock.waiting and self._locks.get(channel) is lock:
            del self._locks[channel]

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self._idle = self._reactor.callLater(self.idle_timeout, self._on_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if not self.sessions and self.connected:
            log.info("concentrator {where}: idle for {seconds:g} s; connection closed",
                     where=self.where, seconds=self.idle_timeout)
            self._protocol.transport.loseConnection()

    def close(self) -> None:
        """Close the connection now (sessions on it fail as on a drop)."""
        self._cancel_idle()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.loseConnection()


class ConcentratorLinks:
    """The concentrator links of one process, by (host, port)."""

    def __init__(self, reactor: Any, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle timeout must be positive, got {idle_timeout!r}")
        self._reactor = reactor
        self.idle_timeout = idle_timeout
        self._links: dict[tuple[str, int], ConcentratorLink] = {}

    def link(self, host: str, port: int) -> ConcentratorLink:
        key = (host, port)
        if key not in self._links:
            self._links[key] = ConcentratorLink(self._reactor, host, port, self.idle_timeout)
        return self._links[key]

    def bound(self, host: str, port: int, max_sessions: int | None) -> None:
        self.link(host, port).bound(max_sessions)

    def connect(self, device: DeviceAddress, session: Any, limits: SessionLimits,
                pacer: ConnectionPacer | None) -> Deferred:
        """Deferred[DlmsConnection] for `session` to `device` (behind a concentrator)."""
        return ensureDeferred(self.link(device.host, device.port).open(
            device, session, limits, pacer))

    def close_all(self) -> None:
        for link in self._links.values():
            link.close()


_PER_REACTOR: "weakref.WeakKeyDictionary[Any, ConcentratorLinks]" = weakref.WeakKeyDictionary()


def links_of(reactor: Any) -> ConcentratorLinks:
    """The concentrator links of the process running `reactor` (made on first use)."""
    links = _PER_REACTOR.get(reactor)
    if links is None:
        links = _PER_REACTOR[reactor] = ConcentratorLinks(reactor)
    return links


__all__ = ["DEFAULT_IDLE_TIMEOUT", "ConcentratorLink", "ConcentratorLinks", "ConcentratorLost",
           "GatewayChannel", "links_of"]
