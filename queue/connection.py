"""One connection to the RabbitMQ broker, kept open: pika's Twisted adapter, reconnecting by itself.

`BrokerConnection` connects with `pika.adapters.twisted_connection.TwistedProtocolConnection`
over the reactor's TCP; each time a connection is open it runs every registered `on_open`
callback (which opens channels, declares the topology and starts consumers or relays) and, when
the connection drops or cannot be made, tries again after a backoff (1 s, doubled up to 30 s by
default). Its `state` ("connecting", "connected", "disconnected", "stopped") and every change of
it are logged under ``cimhes.queue``; the URL in logs never shows the password (`redact`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientCreator

log = logging.getLogger("cimhes.queue")


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and replies)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass(frozen=True)
class ReconnectPolicy:
    """Backoff between connection attempts: ``first`` s, doubled each failure, at most ``most``."""

    first: float = 1.0
    most: float = 30.0
    connect_timeout: float = 10.0

    def delay(self, failures: int) -> float:
        return min(self.first * 2 ** max(0, failures - 1), self.most)


class BrokerConnection:
    """The head-end's broker connection: connects, runs its `on_open` callbacks, reconnects."""

    def __init__(self, reactor, url: str, policy: ReconnectPolicy | None = None):
        self._reactor = reactor
        self.url = url
        self.parameters = pika.URLParameters(url)
        self._policy = policy or ReconnectPolicy()
        self._on_open: list[Callable] = []
        self._failures = 0
        self._retry = None
        self._stopped = True
        self.protocol: TwistedProtocolConnection | None = None
        self.state = "stopped"
        self.last_error: str | None = None
        self.opened = 0  # connections opened so far (1 + reconnections)
        self._connected_waiters: list[Deferred] = []

    def on_open(self, callback: Callable) -> None:
        """`callback(protocol)` runs on every new connection (may return a Deferred)."""
        self._on_open.append(callback)

    def _set_state(self, state: str, why: str | None = None) -> None:
        if state != self.state:
            log.info("AMQP broker %s: %s%s", redact(self.url), state, f" ({why})" if why else "")
        self.state = state

    def start(self) -> None:
        if not self._stopped:
            return
        self._stopped = False
        self._connect()

    def connected(self) -> Deferred:
        """Fires once the connection is open and its `on_open` callbacks have run."""
        waiting = Deferred()
        if self.state == "connected":
            waiting.callback(self.protocol)
        else:
            self._connected_waiters.append(waiting)
        return waiting

    @inlineCallbacks
    def _connect(self):
        self._retry = None
        if self._stopped:
            return
        self._set_state("connecting")
        params, protocol = self.parameters, None
        try:
            protocol = yield ClientCreator(self._reactor, TwistedProtocolConnection, params).connectTCP(
                params.host, params.port, timeout=self._policy.connect_timeout)
            yield protocol.ready
            self.protocol = protocol
            for callback in self._on_open:
                yield callback(protocol)
        except Exception as exc:  # noqa: BLE001 (any failure to connect means: try again)
            self.protocol = None
            if protocol is not None and protocol.is_open:
                protocol.close()
            self._lost(f"{type(exc).__name__}: {exc}")
            return
        self._failures = 0
        self.last_error = None
        self.opened += 1
        self._set_state("connected")
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiting in waiters:
            waiting.callback(protocol)
        closed = protocol.closed
        if closed is not None:
            closed.addBoth(lambda reason: self._closed(protocol, reason))

    def _closed(self, protocol, reason) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        if self._stopped:
            self._set_state("stopped")
            return
        text = getattr(reason, "value", reason)
        self._lost(f"connection closed: {text}")

    def _lost(self, why: str) -> None:
        self.protocol = None
        self.last_error = why
        self._failures += 1
        if self._stopped:
            self._set_state("stopped")
            return
        delay = self._policy.delay(self._failures)
        self._set_state("disconnected", f"{why}; retrying in {delay:g} s")
        self._retry = self._reactor.callLater(delay, self._connect)

    def stop(self) -> Deferred:
        """Close the connection and stop reconnecting; fires once it is closed."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        protocol, done = self.protocol, Deferred()
        if protocol is not None and protocol.is_open:
            closed = protocol.closed
            protocol.close()
            if closed is not None:
                closed.addBoth(lambda _: done.called or done.callback(None))
            else:
                done.callback(None)
        else:
            done.callback(None)
        self._set_state("stopped")
        return done

    def health(self) -> dict:
        """What a health endpoint shows of the broker connection (never the password)."""
        return {"url": redact(self.url), "state": self.state, "last_error": self.last_error}
