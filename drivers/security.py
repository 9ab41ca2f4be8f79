"""What a driver needs from the head-end to run HLS-GMAC sessions: its system title and a book
of invocation counters that outlives the process.

The head-end's client invocation counter for a meter must never be used twice, across restarts
and across sessions running at the same time: each session reserves a block of
`COUNTERS_PER_SESSION` counters before it starts (atomically, in the store) and uses them in
order; the block's unused rest is never handed out again. The book also holds the largest
counter seen from each meter, so a reply replayed from an earlier session is refused too
(`cimhes.drivers.errors.ReplayDetected`), and records security events.

`cimhes.engine.security.StoredCounters` implements `CounterBook` on the store. A driver calls
`session_security` before a session and `session_ended` after it; when the meter refuses the
head-end's counter as already used (the book is behind the meter), `resynchronise` reads the
meter's counter as the public client and moves the book past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.ciphering import HlsGmac, check_system_title
from cimhes.drivers.concentrator import gateway_of
from cimhes.drivers.dlms_session import ClientSession, DataAccessError
from cimhes.drivers.errors import (
    AuthenticationFailed,
    CounterRejected,
    DeviceError,
    ProtocolError,
    ReplayDetected,
)
from cimhes.drivers.limits import ConnectionPacer, SessionLimits
from cimhes.drivers.transport import connect

log = Logger()

# A full read uses about ten (association 3, one per GET and per block, release 0); the block
# is large so that a long profile read never runs out, and small against the 2**32 counters.
COUNTERS_PER_SESSION = 1024
# The invocation counter object of the management client's global key (IDIS, gurux's default
# 0.0.43.1.0.255), readable by the public client: the last counter the meter accepted.
INVOCATION_COUNTER_OBIS = "0.0.43.1.0.255"
PUBLIC_CLIENT_ADDRESS = 16
DEFAULT_CLIENT_SYSTEM_TITLE = "43494d4845530001"  # "CIMHES" 0x0001


@dataclass(frozen=True)
class CounterReservation:
    """Client counters [first, limit) for one session, and the last counter seen from the
    meter (-1: none yet)."""

    first: int
    limit: int
    last_server_counter: int = -1


class CounterBook(Protocol):
    def reserve(self, device_mrid: str, count: int) -> Deferred:
        """Deferred[CounterReservation], or Deferred[None] when no counter is recorded for
        the device (the driver then reads the meter's and calls `start`)."""

    def start(self, device_mrid: str, first: int, count: int) -> Deferred:
        """Deferred[CounterReservation] of `count` counters from at least `first`."""

    def seen(self, device_mrid: str, server_counter: int) -> Deferred:
        """Record the largest counter accepted from the device in a session."""

    def security_event(self, device_mrid: str, kind: str, detail: str) -> Deferred:
        """Record a security event ("replay", "authentication-failure") for the device."""


@dataclass(frozen=True)
class HeadEndSecurity:
    """The head-end's side of HLS-GMAC: its system title (8 octets) and its counter book."""

    client_system_title: bytes
    counters: CounterBook

    def __post_init__(self) -> None:
        check_system_title(self.client_system_title, "head-end")


# --- what the drivers call around a session ---------------------------------------------------

async def session_security(reactor: Any, device: DeviceAddress, limits: SessionLimits,
                           pacer: ConnectionPacer | None,
                           security: HeadEndSecurity | None) -> HlsGmac | None:
    """The HLS-GMAC settings of the session about to start with `device` (None unless its
    security is "hls-gmac"): counters reserved in the book before use; for a meter the book
    does not know yet, from the meter's own counter, read as the public client first."""
    if device.security != "hls-gmac":
        return None
    if security is None:
        raise ValueError(f"device {device.mrid} uses HLS-GMAC; the driver needs the head-end's "
                         "security (system title, counter book)")
    reservation = await security.counters.reserve(device.mrid, COUNTERS_PER_SESSION)
    if reservation is None:
        counter = await read_invocation_counter(reactor, device, limits, pacer)
        reservation = await security.counters.start(device.mrid, counter + 1,
                                                    COUNTERS_PER_SESSION)
    return _hls_gmac(device, security, reservation)


async def resynchronise(reactor: Any, device: DeviceAddress, limits: SessionLimits,
                        pacer: ConnectionPacer | None, security: HeadEndSecurity,
                        cause: CounterRejected) -> HlsGmac:
    """After the meter refused the head-end's counter as already used: read the meter's own
    counter as the public client, move the book past it, and give the settings of a session
    that starts there (recorded as a "counter-resync" security event: a book behind its
    meter means a store restored from a backup, or another client using the head-end's key)."""
    counter = await read_invocation_counter(reactor, device, limits, pacer)
    reservation = await security.counters.start(device.mrid, counter + 1, COUNTERS_PER_SESSION)
    await security.counters.security_event(
        device.mrid, "counter-resync", f"{cause.reason}; the meter's invocation counter is "
        f"{counter}, the head-end continues from {reservation.first}")
    log.warn("{mrid}: invocation counter resynchronised from the meter's ({counter})",
             mrid=device.mrid, counter=counter)
    return _hls_gmac(device, security, reservation)


def _hls_gmac(device: DeviceAddress, security: HeadEndSecurity,
              reservation: CounterReservation) -> HlsGmac:
    return HlsGmac(device.security_keys(), security.client_system_title,
                   bytes.fromhex(device.system_title), reservation.first, reservation.limit,
                   reservation.last_server_counter)


async def session_ended(device: DeviceAddress, session: ClientSession, hls: HlsGmac | None,
                        security: HeadEndSecurity | None,
                        failure: BaseException | None = None) -> None:
    """After a session: record the largest counter seen from the meter, and a refused reply
    (replay, authentication failure) as a security event."""
    if hls is None or security is None:
        return
    if isinstance(failure, (ReplayDetected, AuthenticationFailed)):
        kind = "replay" if isinstance(failure, ReplayDetected) else "authentication-failure"
        await security.counters.security_event(device.mrid, kind, failure.reason)
    if session.last_server_counter > hls.last_server_counter:
        await security.counters.seen(device.mrid, session.last_server_counter)


async def read_invocation_counter(reactor: Any, device: DeviceAddress, limits: SessionLimits,
                                  pacer: ConnectionPacer | None) -> int:
    """The meter's invocation counter object (the last counter it accepted from the management
    client), read in a public-client association."""
    session = ClientSession(device.mrid, PUBLIC_CLIENT_ADDRESS, device.server_address,
                            gateway=gateway_of(device))
    connection = await connect(reactor, device, session, limits, pacer)
    try:
        await connection.request(session.associate(), "AARQ (public client)")
        answer = await connection.request(
            session.get(1, INVOCATION_COUNTER_OBIS, 2),
            f"GET {INVOCATION_COUNTER_OBIS} attribute 2 (public client)")
        try:
            await connection.request(session.release(), "RLRQ (public client)")
        except DeviceError as failure:
            log.info("release of {mrid} failed: {failure}", mrid=device.mrid, failure=failure)
    finally:
        connection.close()
    if isinstance(answer, DataAccessError) or not isinstance(answer.value, int):
        raise ProtocolError(device.mrid, f"invocation counter {INVOCATION_COUNTER_OBIS} "
                            f"unreadable by the public client: {answer}")
    return answer.value
