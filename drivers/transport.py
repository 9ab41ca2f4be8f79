"""Carries a sans-IO `ClientSession` over TCP (DLMS wrapper, port 4059) on the Twisted reactor.

`connect(reactor, device, session, timeout)` opens the connection and gives a `DlmsConnection`;
`connection.request(data, what)` sends one request's bytes and gives a Deferred that fires with
the session's final event for it (`Associated`, `AttributeValue`, `DataAccessError`, `Released`)
or fails with a `DeviceError` naming the device. Block transfer happens inside: every
`NextBlockRequest` is written straight back and re-arms the timer.

Waiting costs a timer (reactor.callLater), never a thread: a meter silent for `timeout` seconds
after a request yields `Timeout` and the connection is aborted; a refused connection yields
`ConnectionFailed`, a connect that does not complete in `timeout` yields `Timeout`. Whoever
opened the connection closes it (`close()`) after release or on error.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.dlms_session import ClientSession, Event, NextBlockRequest
from cimhes.drivers.errors import ConnectionFailed, DeviceError, Timeout


class DlmsConnection(Protocol):
    """One TCP connection to one meter, feeding bytes to and from its ClientSession."""

    def __init__(self, reactor: Any, session: ClientSession, timeout: float) -> None:
        self._reactor = reactor
        self.session = session
        self.timeout = timeout
        self._pending: Deferred | None = None
        self._what = ""
        self._timer: Any = None
        # A device error that arrived while no request was waiting: the next request gets it.
        self._unclaimed: DeviceError | None = None
        self._closed = False

    # -- used by the driver ----------------------------------------------------------------

    def request(self, data: bytes, what: str) -> Deferred:
        """Send `data`; the Deferred fires with the session's final event for this request."""
        if self._pending is not None:
            raise RuntimeError(f"request {what!r} while {self._what!r} is still waiting")
        pending = Deferred(self._cancel_request)
        if self._closed:
            pending.errback(ConnectionFailed(
                self.session.device_mrid, f"connection closed before {what}"))
            return pending
        if self._unclaimed is not None:
            error, self._unclaimed = self._unclaimed, None
            pending.errback(error)
            return pending
        self._pending, self._what = pending, what
        self.transport.write(data)
        self._arm_timer()
        return pending

    def close(self) -> None:
        """Close politely (after release, or when the driver is done with this meter)."""
        self._closed = True
        self._cancel_timer()
        self.transport.loseConnection()

    # -- Twisted ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        for event in self.session.receive_data(data):
            self._on_event(event)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_timer()
        if self._pending is not None:
            self._finish(ConnectionFailed(
                self.session.device_mrid,
                f"connection closed while waiting for {self._what}: {reason.getErrorMessage()}"))

    # -- inside ----------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, NextBlockRequest):
            self.transport.write(event.data)
            self._arm_timer()
        elif self._pending is None:
            if isinstance(event, DeviceError) and self._unclaimed is None:
                self._unclaimed = event
        else:
            self._finish(event)

    def _finish(self, outcome: Any) -> None:
        self._cancel_timer()
        pending, self._pending = self._pending, None
        if isinstance(outcome, DeviceError):
            pending.errback(outcome)
        else:
            pending.callback(outcome)

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        else:
            self._timer = self._reactor.callLater(self.timeout, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        what = self._what
        self._finish(Timeout(self.session.device_mrid,
                             f"no answer to {what} within {self.timeout:g} s"))
        self._abort()

    def _cancel_request(self, pending: Deferred) -> None:
        # The caller gave up (Deferred.cancel); Twisted fails `pending` with CancelledError.
        self._pending = None
        self._abort()

    def _abort(self) -> None:
        self._closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abortConnection()


def connect(reactor: Any, device: DeviceAddress, session: ClientSession,
            timeout: float) -> Deferred:
    """Open a TCP connection to `device`; Deferred[DlmsConnection], or ConnectionFailed/Timeout."""
    endpoint = TCP4ClientEndpoint(reactor, device.host, device.port, timeout=timeout)
    connecting = connectProtocol(endpoint, DlmsConnection(reactor, session, timeout))

    def failed(failure: Failure) -> Failure:
        where = f"{device.host}:{device.port}"
        if failure.check(neterror.TimeoutError):
            raise Timeout(device.mrid, f"no TCP connection to {where} within {timeout:g} s")
        if failure.check(CancelledError, neterror.ConnectingCancelledError, DeviceError):
            return failure  # the caller cancelled: that is not the device's failure
        raise ConnectionFailed(device.mrid,
                               f"cannot connect to {where}: {failure.getErrorMessage()}")

    return connecting.addErrback(failed)
