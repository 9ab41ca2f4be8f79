"""Carries a sans-IO `ClientSession` over TCP (DLMS wrapper, port 4059) on the Twisted reactor.

`connect(reactor, device, session, limits, pacer)` waits for a slot of the `ConnectionPacer`,
opens the connection and gives a `DlmsConnection`; `connection.request(data, what)` sends one
request's bytes and gives a Deferred that fires with the session's final event for it
(`Associated`, `AttributeValue`, `DataAccessError`, `Released`) or fails with a `DeviceError`
naming the device. Block transfer happens inside: every `NextBlockRequest` is written straight
back and re-arms the response timer.

Every limit of `SessionLimits` is enforced here, each costing a timer (reactor.callLater) or a
counter, never a thread:
- a connect that does not complete in `connect_timeout` yields `Timeout`; a refused one
  `ConnectionFailed`; a connect the head-end cannot even start for want of file descriptors
  `HeadEndExhausted` (the device is not blamed);
- a meter silent for `response_timeout` after a request or block yields `Timeout`;
- the whole session, from the connect to the last answer, ends at `session_deadline` with
  `Timeout` (a meter answering every request just inside the response timeout cannot hold a
  session for minutes);
- the bytes received for one answer past `max_answer_bytes`, or its blocks past
  `max_answer_blocks`, yield `AnswerTooLarge`.
On each of these the connection is aborted, its timers cancelled and the session dropped, so
the answer's memory is returned. Whoever opened the connection closes it (`close()`) after
release or on error.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import error as neterror
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.dlms_session import ClientSession, Event, NextBlockRequest
from cimhes.drivers.errors import (
    AnswerTooLarge,
    ConnectionFailed,
    DeviceError,
    HeadEndExhausted,
    Timeout,
)
from cimhes.drivers.limits import ConnectionPacer, SessionLimits
from cimhes.drivers.stepping import Answer

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class DlmsConnection(Protocol):
    """One TCP connection to one meter, feeding bytes to and from its ClientSession."""

    def __init__(self, reactor: Any, session: ClientSession, limits: SessionLimits) -> None:
        self._reactor = reactor
        self.session = session
        self.limits = limits
        self._pending: Deferred | None = None
        self._what = ""
        self._timer: Any = None
        self._deadline: Any = reactor.callLater(limits.session_deadline, self._on_deadline)
        self._answer_bytes = 0
        self._answer_blocks = 0
        # A device error that arrived while no request was waiting: the next request gets it.
        self._unclaimed: DeviceError | None = None
        self._closed = False
        self.made: Deferred | None = None  # fired by connectionMade, when `connect` set it

    # -- used by the driver ----------------------------------------------------------------

    def request(self, data: bytes, what: str) -> Deferred:
        """Send `data`; the Deferred fires with the session's final event for this request."""
        return self._send_request(Deferred(self._cancel_request), data, what)

    def ask(self, data: bytes, what: str) -> Answer:
        """As `request`, for a coroutine stepped by `cimhes.drivers.stepping.run`: the same
        outcome as an awaitable `Answer`, without a Deferred per exchange."""
        return self._send_request(Answer(self._cancel_request), data, what)

    def _send_request(self, pending, data: bytes, what: str):
        if self._pending is not None:
            raise RuntimeError(f"request {what!r} while {self._what!r} is still waiting")
        if self._unclaimed is not None:
            error, self._unclaimed = self._unclaimed, None
            pending.errback(error)
            return pending
        if self._closed:
            pending.errback(ConnectionFailed(
                self.session.device_mrid, f"connection closed before {what}"))
            return pending
        self._pending, self._what = pending, what
        self._answer_bytes = self._answer_blocks = 0
        send(self.transport, data)
        self._arm_timer()
        return pending

    def close(self) -> None:
        """Close politely (after release, or when the driver is done with this meter)."""
        self._closed = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.loseConnection()

    # -- Twisted ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if self._unclaimed is not None:  # the deadline passed while connecting
            self._abort()
        made, self.made = self.made, None
        if made is not None:  # connected by `connect`: it waits for this
            made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._answer_bytes += len(data)
        if self._answer_bytes > self.limits.max_answer_bytes:
            self._fail(AnswerTooLarge(
                self.session.device_mrid,
                f"answer to {self._what or 'nothing asked'} passed "
                f"{self.limits.max_answer_bytes} bytes; connection closed"))
            return
        for event in self.session.receive_data(data):
            self._on_event(event)
            if self._closed:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_timers()
        if self._pending is not None:
            self._finish(ConnectionFailed(
                self.session.device_mrid,
                f"connection closed while waiting for {self._what}: {reason.getErrorMessage()}"))

    # -- inside ----------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, NextBlockRequest):
            self._answer_blocks += 1
            if self._answer_blocks >= self.limits.max_answer_blocks:
                self._fail(AnswerTooLarge(
                    self.session.device_mrid,
                    f"answer to {self._what} passed {self.limits.max_answer_blocks} blocks; "
                    "connection closed"))
                return
            send(self.transport, event.data)
            self._arm_timer()
        elif self._pending is None:
            if isinstance(event, DeviceError) and self._unclaimed is None:
                self._unclaimed = event
        else:
            self._finish(event)

    def _finish(self, outcome: Any) -> None:
        # The response timer stays armed: the next request pushes it back (cheap), where a
        # cancel and a new callLater per exchange cost the reactor's timer heap. Fired while
        # no request waits, it does nothing.
        pending, self._pending = self._pending, None
        if isinstance(outcome, DeviceError):
            pending.errback(outcome)
        else:
            pending.callback(outcome)

    def _fail(self, error: DeviceError) -> None:
        """End the session with `error`: the waiting request gets it (or the next one)."""
        if self._pending is not None:
            self._finish(error)
        elif self._unclaimed is None:
            self._unclaimed = error
        self._abort()

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.limits.response_timeout)
        else:
            self._timer = self._reactor.callLater(self.limits.response_timeout,
                                                  self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._pending is None:
            return  # between requests: nothing was waiting for an answer
        self._fail(Timeout(self.session.device_mrid,
                           f"no answer to {self._what} within "
                           f"{self.limits.response_timeout:g} s"))

    def _on_deadline(self) -> None:
        self._deadline = None
        doing = f" (waiting for {self._what})" if self._pending is not None else ""
        self._fail(Timeout(self.session.device_mrid,
                           f"session deadline of {self.limits.session_deadline:g} s "
                           f"passed{doing}"))

    def _cancel_request(self, pending: Deferred | Answer) -> None:
        # The caller gave up (cancel()); `pending` then fails with CancelledError.
        self._pending = None
        self._abort()

    def _abort(self) -> None:
        self._closed = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.abortConnection()


def send(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sent at once when nothing is queued before it.

    Twisted's TCP transport only queues a write and asks epoll for writability; the bytes
    leave on the reactor's next turn, which then asks epoll to stop watching: two epoll_ctl
    calls and a reactor turn per request, a sixth of the reactor's CPU per meter read. One
    request is a few dozen bytes that the socket's empty send buffer takes at once, so they
    are sent here. Whatever the socket does not take (or any socket error) goes through
    `transport.write`, which keeps the order and reports the error as it would have."""
    if (type(transport) is not tcp.Client or transport.dataBuffer or transport._tempDataBuffer
            or not transport.connected or transport.disconnecting
            or transport._writeDisconnected):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


def connect(reactor: Any, device: DeviceAddress, session: ClientSession,
            limits: SessionLimits | float, pacer: ConnectionPacer | None = None) -> Deferred:
    """Open a TCP connection to `device` once `pacer` allows; Deferred[DlmsConnection], or
    ConnectionFailed / Timeout / HeadEndExhausted. Cancelling it stops the attempt."""
    where = f"{device.host}:{device.port}"
    limits = SessionLimits.of(limits)
    if device.physical_address is not None:
        # Behind a concentrator: a channel on its one shared connection.
        from cimhes.drivers.concentrator_link import links_of
        return links_of(reactor).connect(device, session, limits, pacer)
    waiting = pacer.slot() if pacer is not None else Deferred()
    if pacer is None:
        waiting.callback(None)
    protocol: list[DlmsConnection] = []

    def start(_: None) -> Deferred:
        # The session deadline counts from here: the connect is part of the session.
        connection = DlmsConnection(reactor, session, limits)
        protocol.append(connection)
        timeout = min(limits.connect_timeout, limits.session_deadline)
        factory = _Connecting(connection)
        factory.connector = reactor.connectTCP(device.host, device.port, factory, timeout)
        return connection.made

    def failed(failure: Failure) -> Failure:
        for connection in protocol:
            connection._cancel_timers()  # never connected: connectionLost will not come
        return connect_failure(failure, device, where,
                               min(limits.connect_timeout, limits.session_deadline))

    return waiting.addCallback(start).addErrback(failed)


class _Connecting(ClientFactory):
    """One connect of one DlmsConnection by `reactor.connectTCP`: what a TCP4ClientEndpoint
    and `connectProtocol` do (a Deferred of the connected protocol, cancellable, failing with
    the connector's reason), without their wrapping protocol (a call more per received chunk)
    and without the factory's start and stop log events (two per meter read)."""

    noisy = False

    def __init__(self, connection: DlmsConnection) -> None:
        self._connection = connection
        self.connector: Any = None
        connection.made = Deferred(self._cancel)

    def buildProtocol(self, addr: Any) -> DlmsConnection:
        return self._connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        made, self._connection.made = self._connection.made, None
        if made is not None:
            made.errback(reason)

    def _cancel(self, made: Deferred) -> None:
        self._connection.made = None
        made.errback(neterror.ConnectingCancelledError(self.connector.getDestination()))
        self.connector.stopConnecting()


def connect_failure(failure: Failure, device: DeviceAddress, where: str, timeout: float) -> Failure:
    """A failed connect to `where` as the device's error (raised), or `failure` itself when it
    is not the network's doing (cancelled by the caller, or a bug)."""
    if failure.check(neterror.TimeoutError):
        raise Timeout(device.mrid, f"no TCP connection to {where} within {timeout:g} s")
    if failure.check(CancelledError, neterror.ConnectingCancelledError, DeviceError):
        return failure  # the caller cancelled: that is not the device's failure
    if (failure.check(neterror.ConnectError)
            and getattr(failure.value, "osError", None) in _OUT_OF_DESCRIPTORS):
        raise HeadEndExhausted(
            device.mrid, f"the head-end has no file descriptor left to connect to {where} "
            f"({failure.getErrorMessage()}): lower the session bound or raise the "
            "process's descriptor limit")
    if failure.check(neterror.ConnectError, neterror.DNSLookupError):
        raise ConnectionFailed(device.mrid, f"cannot connect to {where}: "
                               f"{failure.getErrorMessage()}")
    return failure  # not the network's doing: a bug, reported as such by the engine
