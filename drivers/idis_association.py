"""One association with an IDIS meter, the one way every driver operation talks to it.

`in_association(reactor, device, limits, pacer, work)` connects, associates (AARQ), runs
`work(conversation)`, releases (RLRQ) and closes; a `Conversation` sends one request at a time
and waits for its answer. `located` makes every DeviceError leaving an operation name the device
by name and host:port. The decoding helpers for what every operation reads (the clock, a
profile's rows and columns) live here too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from operator import itemgetter
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.concentrator import gateway_of
from cimhes.drivers.dlms_session import (
    AuthenticationRequired,
    ClientSession,
    DataAccessError,
    cosem_datetime,
)
from cimhes.drivers.errors import CounterRejected, DeviceError, ProtocolError
from cimhes.drivers.limits import ConnectionPacer, SessionLimits
from cimhes.drivers.security import (
    HeadEndSecurity,
    resynchronise,
    session_ended,
    session_security,
)
from cimhes.drivers.transport import DlmsConnection, connect

log = Logger()
T = TypeVar("T")

CLOCK_OBIS = "0.0.1.0.0.255"
CLOCK_CLASS = 8
PROFILE_GENERIC_CLASS = 7


class Conversation:
    """One open association with one meter, as the driver's operations use it: each method
    sends one request and waits for its answer (block transfer followed inside)."""

    def __init__(self, connection: DlmsConnection, session: ClientSession,
                 stepped: bool = False) -> None:
        self.connection = connection
        self.session = session
        self.device_mrid = session.device_mrid
        # In a coroutine stepped by cimhes.drivers.stepping.run: answers without Deferreds.
        self._request = connection.ask if stepped else connection.request

    async def get(self, class_id: int, obis: str, attribute: int) -> Any:
        """AttributeValue, or DataAccessError when the meter refuses."""
        return await self._request(self.session.get(class_id, obis, attribute),
                                   f"GET {obis} attribute {attribute}")

    async def set(self, class_id: int, obis: str, attribute: int, value: bytes) -> Any:
        """SetResult (`value`: one A-XDR encoded Data)."""
        return await self.connection.request(self.session.set(class_id, obis, attribute, value),
                                             f"SET {obis} attribute {attribute}")

    async def action(self, class_id: int, obis: str, method: int,
                     parameter: bytes | None) -> Any:
        """ActionResult (`parameter`: one A-XDR encoded Data, or None)."""
        return await self.connection.request(
            self.session.action(class_id, obis, method, parameter),
            f"ACTION {obis} method {method}")

    async def clock(self) -> datetime:
        """The meter's clock (0.0.1.0.0.255 attribute 2); ProtocolError if unreadable."""
        clock = await self.get(CLOCK_CLASS, CLOCK_OBIS, 2)
        if isinstance(clock, DataAccessError):
            raise ProtocolError(self.device_mrid, f"clock unreadable: {clock.reason}")
        return datetime_or_error(self.device_mrid, clock.value, "clock time")

    async def profile_rows(self, profile: str, start: datetime, end: datetime,
                           known_captures: list | None = None
                           ) -> tuple[list, list[tuple[datetime, list]]] | DataAccessError:
        """(capture_objects, [(row time, row)]) of `profile`'s rows start <= time <= end.
        With `known_captures` (remembered from an earlier read) the capture objects are not
        asked for, unless the rows do not fit them: then they are asked for once more."""
        if known_captures is None:
            captures = await self.get(PROFILE_GENERIC_CLASS, profile, 3)
            if isinstance(captures, DataAccessError):
                return captures
            known_captures = captures.value
        else:
            captures = None
        rows = await self._request(
            self.session.get_rows_by_range(profile, start, end),
            f"GET {profile} buffer from {start.isoformat()} to {end.isoformat()}")
        if isinstance(rows, DataAccessError):
            return rows
        if captures is None:
            try:
                return timed_rows(self.device_mrid, profile, known_captures, rows.value)
            except ProtocolError:
                # The profile changed since its capture objects were read: read them again.
                captures = await self.get(PROFILE_GENERIC_CLASS, profile, 3)
                if isinstance(captures, DataAccessError):
                    return captures
                known_captures = captures.value
        return timed_rows(self.device_mrid, profile, known_captures, rows.value)


async def in_association(reactor: Any, device: DeviceAddress, limits: SessionLimits,
                         pacer: ConnectionPacer | None,
                         work: Callable[[Conversation], Awaitable[T]],
                         security: HeadEndSecurity | None = None, stepped: bool = False) -> T:
    """Connect, associate (HLS-GMAC when the device's security says so: `security` is the
    head-end's system title and counter book), run `work`, release politely, close: the one
    way every operation on an IDIS meter talks to it.

    A meter that refuses the head-end's invocation counter as already used has a counter ahead
    of the book: it is read as the public client and the book moved past it
    (`resynchronise`); refused at the AARQ (nothing done yet), the association is tried once
    more, refused later the error stands (the book is right for the next session).
    `stepped`: the caller runs this coroutine with `cimhes.drivers.stepping.run`, so the
    exchanges are awaited as Answers, not Deferreds."""
    hls = await session_security(reactor, device, limits, pacer, security)
    resynchronised = False
    while True:
        session = ClientSession(device.mrid, device.client_address, device.server_address,
                                device.security, device.password, hls, gateway_of(device))
        connection = await connect(reactor, device, session, limits, pacer)
        request = connection.ask if stepped else connection.request
        failure = None
        associating = True
        try:
            if isinstance(await request(session.associate(), "AARQ"), AuthenticationRequired):
                await request(session.authenticate(),
                              "reply_to_HLS_authentication (HLS-GMAC pass 3)")
            associating = False
            result = await work(Conversation(connection, session, stepped))
            try:
                await request(session.release(), "RLRQ")
            except DeviceError as error:
                # Every answer is in; a meter that fumbles the release does not spoil them.
                log.info("release of {mrid} failed: {failure}", mrid=device.mrid, failure=error)
            return result
        except DeviceError as error:
            failure = error
            if not isinstance(error, CounterRejected) or hls is None or resynchronised:
                raise
        finally:
            connection.close()
            await session_ended(device, session, hls, security, failure)
        hls = await resynchronise(reactor, device, limits, pacer, security, failure)
        resynchronised = True
        if not associating:
            raise failure


def located(operation: Deferred, device: DeviceAddress) -> Deferred:
    """Every DeviceError leaving `operation` (raised, or in its result's `errors`) names the
    device by name and host:port."""
    return operation.addCallbacks(_located_result, _located_failure,
                                  callbackArgs=(device,), errbackArgs=(device,))


def _located_result(result: Any, device: DeviceAddress) -> Any:
    where = location(device)
    for error in result.errors:
        error.located(device.name, where)
    return result


def _located_failure(failure: Any, device: DeviceAddress) -> Any:
    if isinstance(failure.value, DeviceError):
        failure.value.located(device.name, location(device))
    return failure


def location(device: DeviceAddress) -> str:
    """host:port, and for a meter behind a concentrator its physical address there."""
    if device.physical_address is None:
        return f"{device.host}:{device.port}"
    return (f"physical address {device.physical_address} behind the concentrator at "
            f"{device.host}:{device.port}")


def datetime_or_error(mrid: str, value: Any, what: str) -> datetime:
    if not isinstance(value, (bytes, bytearray)):
        raise ProtocolError(mrid, f"{what} is {value!r}, not a date-time octet-string")
    try:
        return cosem_datetime(value)
    except ValueError as failure:
        raise ProtocolError(mrid, f"{what}: {failure}") from None


_OBIS_OCTETS: dict[str, bytes] = {}


def _obis_bytes(obis: str) -> bytes:
    # The catalogue's few OBIS codes, asked for on every read: parsed once each.
    octets = _OBIS_OCTETS.get(obis)
    if octets is None:
        octets = bytes(int(part) for part in obis.split("."))
        if len(_OBIS_OCTETS) < 10_000:
            _OBIS_OCTETS[obis] = octets
    return octets


def column_of(captures: list, obis: str, attribute: int) -> int | None:
    wanted = _obis_bytes(obis)
    for index, capture in enumerate(captures):
        if (isinstance(capture, list) and len(capture) == 4
                and bytes(capture[1]) == wanted and capture[2] == attribute):
            return index
    return None


# Decoded row times, by their 12 octets: a fleet's profiles share their interval boundaries, so
# most rows of a read find their time here instead of decoding it again. Bounded; a pure cache.
_ROW_TIMES: dict[bytes, datetime] = {}
_ROW_TIMES_KEPT = 20_000


def timed_rows(mrid: str, profile: str, captures: Any,
                rows: Any) -> tuple[list, list[tuple[datetime, list]]]:
    """The buffer's rows with their clock column decoded (which rows a reading type keeps is
    decided per type: the meter's range selection is inclusive at both ends, and a meter that
    over-delivers must not widen the window)."""
    if not isinstance(captures, list):
        raise ProtocolError(mrid, f"{profile} capture_objects is {captures!r}, not an array")
    time_column = column_of(captures, CLOCK_OBIS, 2)
    if time_column is None:
        raise ProtocolError(mrid, f"{profile} does not capture {CLOCK_OBIS} attribute 2")
    if not isinstance(rows, list):
        raise ProtocolError(mrid, f"{profile} buffer is {rows!r}, not an array")
    width = len(captures)
    if rows and set(map(type, rows)) == {list} and set(map(len, rows)) == {width}:
        # Every row well-formed (the usual case), checked and timed without Python per row.
        stamps = list(map(itemgetter(time_column), rows))
        times = (list(map(_ROW_TIMES.get, stamps)) if set(map(type, stamps)) == {bytes}
                 else [None])
        if None not in times:
            return captures, list(zip(times, rows))
    timed = []
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            raise ProtocolError(mrid, f"{profile} row {row!r} does not have {width} columns")
        # A null date-time (IDIS compressed profiles) would need the capture period: not read.
        stamp = row[time_column]
        at = _ROW_TIMES.get(stamp) if isinstance(stamp, bytes) else None
        if at is None:
            at = datetime_or_error(mrid, stamp, f"{profile} row time")
            if len(_ROW_TIMES) >= _ROW_TIMES_KEPT:
                _ROW_TIMES.clear()
            _ROW_TIMES[stamp] = at
        timed.append((at, row))
    return captures, timed
