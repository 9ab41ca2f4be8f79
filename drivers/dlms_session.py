"""Sans-IO DLMS/COSEM client session over the TCP wrapper: bytes in, events out, bytes to send.

`ClientSession` is one application association with one meter, in the manner of h11: it owns no
socket and no timer. Its methods (`associate`, `get`, `get_rows_by_range`, `set`, `action`,
`release`) return the bytes to send; `receive_data` takes whatever arrived and returns the events it completes. A
small explicit state machine says what may happen next:

    IDLE --associate()--> ASSOCIATING --AARE accepted--> ASSOCIATED
                                      --AARE rejected--> IDLE   (event: AssociationRefused)
                                      --AARE accepted, HLS--> AUTHENTICATION_DUE
                                                              (event: AuthenticationRequired)
    AUTHENTICATION_DUE --authenticate()--> AUTHENTICATING --f(CtoS) right--> ASSOCIATED
    ASSOCIATED --get()/get_rows_by_range()--> AWAITING_DATA --last block--> ASSOCIATED
    ASSOCIATED --set()--> AWAITING_SET --set-response--> ASSOCIATED          (event: SetResult)
    ASSOCIATED --action()--> AWAITING_ACTION --action-response--> ASSOCIATED (event: ActionResult)
    ASSOCIATED --release()--> RELEASING --RLRE--> IDLE
    any --wrapper header broken--> BROKEN   (the byte stream is out of step: only closing helps)

Failures the device causes are values in the event list (`ProtocolError`, `AssociationRefused`
from `cimhes.drivers.errors`), each naming the device. A frame that is well delimited but whose
APDU is malformed or unexpected fails the request in progress and leaves the association as it
was, so the caller may still release politely. Calling a method in the wrong state is a bug in
the caller and raises `LocalProtocolError`.

Gurux-dlms's GXDLMSClient (Logical Name referencing, InterfaceType.WRAPPER, authentication NONE
or LOW) is the oracle for the bytes this module builds (tests/test_drivers_requests.py) and is
made on first use only (`_client`), for services beyond reading. This module does the read path
itself, each for a reason gurux gives:
- it builds the AARQ and RLRQ and reads the AARE: gurux's aarqRequest and AARE parsing cost
  ~0.7 ms per association, more than all the GETs of a full read, for fixed BER fields;
- it builds the GET requests (normal, by range, next): gurux's builder cost more CPU than the
  rest of the session for a dozen fixed bytes, and its autoIncreaseInvokeID never takes effect
  (tests/test_drivers_requests.py checks the bytes against gurux's);
- it splits the TCP stream into wrapper frames and checks version and wPorts (gurux scans for a
  0x0001 word and silently skips bytes it does not like);
- it builds SET-Request-Normal and ACTION-Request-Normal and reads their answers (typed
  `SetResult`, `ActionResult`, invoke-id checked) the same way (tests/test_drivers_requests.py
  checks the bytes against gurux's `write` and `method` builders);
- it reads GET-Responses (normal and with datablock) and decodes their Data with
  `cimhes.drivers.axdr` (gurux's generic decoder is most of the client's CPU; gurux never
  checks that the answer carries the invoke-id sent);
- it decodes COSEM date-times exactly (`cosem_datetime`), deviation sign stated.

Given a `Gateway` (a meter behind a data concentrator), every APDU it sends goes out inside a
gateway-request and every answer must come back inside the meter's gateway-response
(`cimhes.drivers.concentrator`); ciphering and authentication stay the meter's own.
"""

from __future__ import annotations

import enum
import logging
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from gurux_dlms import GXDLMSClient
from gurux_dlms.enums import Authentication, InterfaceType

from cimhes.drivers.axdr import AxdrError, ber_length, decode_data
from cimhes.drivers.ciphering import (
    GENERAL_GLO_CIPHERING,
    PLAIN_TAGS,
    CipheredChannel,
    CipheringError,
    CountersExhausted,
    HlsGmac,
    ReplayedCounter,
)
from cimhes.drivers.ciphering import ber_length as encode_ber_length
from cimhes.drivers.concentrator import Gateway, GatewayError
from cimhes.drivers.errors import (
    AssociationRefused,
    AuthenticationFailed,
    CounterRejected,
    DeviceError,
    HeadEndExhausted,
    ProtocolError,
    ReplayDetected,
)

WRAPPER_VERSION = 0x0001
WRAPPER_HEADER = struct.Struct(">HHHH")  # version, source wPort, destination wPort, length

# GET requests (Green Book 9.3, xDLMS Get-Request), built here: gurux's builder was the largest
# part of the client's CPU after its decoder, for a few fixed bytes per request.
GET_REQUEST = 0xC0
GET_REQUEST_NORMAL = 1
GET_REQUEST_NEXT = 2
INVOKE_PRIORITY = 0xC0  # Invoke-Id-And-Priority: priority high, service class confirmed
PROFILE_GENERIC_CLASS = 7
_GET_NORMAL = struct.Struct(">BBBH6sBB")  # tag, kind, invoke, class, OBIS, attribute, selection
_GET_NEXT = struct.Struct(">BBBI")        # tag, kind, invoke, block number
# Selective access: selector 1 (range_descriptor), structure of 4: the restricting object
# (capture_object_definition of the clock 0.0.1.0.0.255 attribute 2), from and to as
# octet-string date-times, and an empty selected_values array (all columns).
_DATE_TIME_TAG = bytes.fromhex("090c")  # octet-string of 12
_RANGE_ON_CLOCK = bytes.fromhex("01020402041200080906" "0000010000ff" "0f02120000") + _DATE_TIME_TAG
_ALL_COLUMNS = bytes.fromhex("0100")
_DATE_TIME_OCTETS = struct.Struct(">HBBBBBBBhB")

# SET and ACTION requests (Green Book 9.3, Set-Request-Normal, Action-Request-Normal).
SET_REQUEST = 0xC1
SET_REQUEST_NORMAL = 1
ACTION_REQUEST_NORMAL = 1
_SET_NORMAL = struct.Struct(">BBBH6sBB")     # tag, kind, invoke, class, OBIS, attribute, no selection
_ACTION_NORMAL = struct.Struct(">BBBH6sB")   # tag, kind, invoke, class, OBIS, method
# SET and ACTION with block transfer (Green Book 9.3: Set-Request-With-First-Datablock [2],
# Set-Request-With-Datablock [3]; Action-Request-With-First-Pblock [4], Action-Request-With-
# Pblock [6]), each block a DataBlock-SA (last-block BOOLEAN, block-number Unsigned32, raw-data
# OCTET STRING) carrying the next piece of the one encoded value; the meter acknowledges each
# but the last (Set-Response-Datablock [2] / Action-Response-Next-Pblock [4], with the block's
# number) and answers the last with the result (Set-Response-Last-Datablock [3], result and
# number / Action-Response-Normal).
SET_REQUEST_FIRST_DATABLOCK = 2
SET_REQUEST_WITH_DATABLOCK = 3
ACTION_REQUEST_FIRST_PBLOCK = 4
ACTION_REQUEST_WITH_PBLOCK = 6
SET_RESPONSE_DATABLOCK = 2
SET_RESPONSE_LAST_DATABLOCK = 3
ACTION_RESPONSE_NEXT_PBLOCK = 4
# Conformance bits (bit 0 = the first byte's most significant) of block transfer with SET and
# with ACTION.
CONFORMANCE_BLOCK_SET = 12
CONFORMANCE_BLOCK_ACTION = 13
_SET_FIRST_BLOCK = struct.Struct(">BBBH6sBBBI")  # ..., attribute, no selection, last, number
_ACTION_FIRST_BLOCK = struct.Struct(">BBBH6sBBI")  # ..., method, last, number
_NEXT_BLOCK = struct.Struct(">BBBBI")  # tag, kind, invoke, last, number

# APDU tags (Green Book, xDLMS / ACSE APDUs) of the answers this client expects.
AARE = 0x61
RLRE = 0x63
GET_RESPONSE = 0xC4
SET_RESPONSE = 0xC5
GET_RESPONSE_NORMAL = 1
GET_RESPONSE_WITH_DATABLOCK = 2
CONFIRMED_SERVICE_ERROR = 0x0E
EXCEPTION_RESPONSE = 0xD8

# Data-access-result enumeration (Blue Book, Get-Data-Result), for readable reasons.
DATA_ACCESS_RESULTS = {
    1: "hardware-fault",
    2: "temporary-failure",
    3: "read-write-denied",
    4: "object-undefined",
    9: "object-class-inconsistent",
    11: "object-unavailable",
    12: "type-unmatched",
    13: "scope-of-access-violated",
    14: "data-block-unavailable",
    15: "long-get-aborted",
    16: "no-long-get-in-progress",
    17: "long-set-aborted",
    18: "no-long-set-in-progress",
    19: "data-block-number-invalid",
    250: "other-reason",
}

# Action-Result enumeration (Green Book, Action-Response).
ACTION_RESULTS = {
    0: "success",
    1: "hardware-fault",
    2: "temporary-failure",
    3: "read-write-denied",
    4: "object-undefined",
    9: "object-class-inconsistent",
    11: "object-unavailable",
    12: "type-unmatched",
    13: "scope-of-access-violated",
    14: "data-block-unavailable",
    15: "long-action-aborted",
    16: "no-long-action-in-progress",
    250: "other-reason",
}

# ACSE associate-source-diagnostic (service-user), Green Book.
ASSOCIATION_DIAGNOSTICS = {
    0: "null",
    1: "no-reason-given",
    2: "application-context-name-not-supported",
    11: "authentication-mechanism-name-not-recognised",
    12: "authentication-mechanism-name-required",
    13: "authentication-failure",
    14: "authentication-required",
}
ASSOCIATION_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}

AUTHENTICATIONS = {"none": Authentication.NONE, "low": Authentication.LOW}
SECURITIES = (*AUTHENTICATIONS, "hls-gmac")

# Association without ciphering (Green Book AARQ/RLRQ): LN context, LLS mechanism 1, and the
# InitiateRequest gurux proposes (no dedicated key, DLMS 6, conformance 0x401e5d: get, set,
# action, selective access, block transfer, multiple references; client PDU size 0xffff).
CONTEXT_LN = bytes.fromhex("60857405080101")  # 2.16.756.5.8.1.1
MECHANISM_LLS = bytes.fromhex("60857405080201")  # 2.16.756.5.8.2.1
PLAIN_INITIATE_REQUEST = bytes.fromhex("01000000065f1f0400401e5dffff")
RLRQ_NORMAL = bytes((0x62, 0x03, 0x80, 0x01, 0x00))  # RLRQ, reason normal

# HLS-GMAC association (Green Book: AARQ/AARE of a ciphered LN context, mechanism 5).
CONTEXT_LN_CIPHERING = bytes.fromhex("60857405080103")  # 2.16.756.5.8.1.3
MECHANISM_HLS_GMAC = bytes.fromhex("60857405080205")  # 2.16.756.5.8.2.5
DIAGNOSTIC_AUTHENTICATION_FAILURE = 13
DIAGNOSTIC_AUTHENTICATION_REQUIRED = 14
ACTION_REQUEST = 0xC3
ACTION_RESPONSE = 0xC7
ASSOCIATION_LN_CLASS = 15
ASSOCIATION_LN = bytes((0, 0, 40, 0, 0, 255))  # the current association
REPLY_TO_HLS_AUTHENTICATION = 1  # method 1 of the association LN object
CHALLENGE_SIZE = 16  # CtoS, within the 8..64 octets the Green Book allows
# Conformance a ciphered session proposes: get, set, selective-access, block transfer with
# get, set and action, action (for reply_to_HLS_authentication and the controls).
HLS_CONFORMANCE = ((1 << (23 - 11)) | (1 << (23 - 12)) | (1 << (23 - 13)) | (1 << (23 - 19))
                   | (1 << (23 - 20)) | (1 << (23 - 21)) | (1 << (23 - 23)))
# What ciphering adds to an APDU at most: tag, length (3), security control, counter (4), tag (12).
CIPHERING_OVERHEAD = 21
CLIENT_MAX_PDU_SIZE = 0xFFFF

log = logging.getLogger(__name__)


class LocalProtocolError(RuntimeError):
    """The caller used the session in a way its state does not allow (a bug, not the device)."""


class State(enum.Enum):
    IDLE = "idle"
    ASSOCIATING = "associating"
    AUTHENTICATION_DUE = "authentication due"
    AUTHENTICATING = "authenticating"
    ASSOCIATED = "associated"
    AWAITING_DATA = "awaiting data"
    AWAITING_SET = "awaiting set result"
    AWAITING_ACTION = "awaiting action result"
    RELEASING = "releasing"
    BROKEN = "broken"


@dataclass(frozen=True)
class Associated:
    """The meter accepted the association; `max_pdu_size` is its negotiated receive PDU size."""

    max_pdu_size: int


@dataclass(frozen=True)
class AuthenticationRequired:
    """HLS: the meter accepted the AARQ and sent its challenge; `authenticate()` answers it."""


@dataclass(frozen=True)
class AttributeValue:
    """The complete value of the attribute asked for, decoded by `cimhes.drivers.axdr`: int,
    bytes (octet-string, date-time), list (array/structure), ..."""

    value: Any


@dataclass(frozen=True)
class DataAccessError:
    """The meter answered the GET with a data-access-result instead of data."""

    result: int

    @property
    def reason(self) -> str:
        return DATA_ACCESS_RESULTS.get(self.result, f"data-access-result {self.result}")


@dataclass(frozen=True)
class SetResult:
    """The meter's answer to a SET: its data-access-result (0 success)."""

    result: int

    @property
    def ok(self) -> bool:
        return self.result == 0

    @property
    def reason(self) -> str:
        return "success" if self.ok else DATA_ACCESS_RESULTS.get(
            self.result, f"data-access-result {self.result}")


@dataclass(frozen=True)
class ActionResult:
    """The meter's answer to an ACTION: its action-result (0 success) and the return
    parameters, if any (a decoded value, or a DataAccessError)."""

    result: int
    data: Any = None

    @property
    def ok(self) -> bool:
        return self.result == 0

    @property
    def reason(self) -> str:
        return ACTION_RESULTS.get(self.result, f"action-result {self.result}")


@dataclass(frozen=True)
class NextBlockRequest:
    """A block transfer goes on: the meter sent one block of a long GET (`data` asks for the
    next), or acknowledged one block of a long SET or ACTION (`data` is the next block).
    `data` must be sent."""

    data: bytes


@dataclass(frozen=True)
class Released:
    """The meter answered the release request; the session is IDLE again."""


Event = Union[Associated, AuthenticationRequired, AttributeValue, DataAccessError, SetResult,
              ActionResult, NextBlockRequest, Released, DeviceError]


_DATE_TIME = struct.Struct(">HBBBBBBBhB")


def cosem_datetime(octets: bytes | bytearray) -> datetime:
    """Decode a 12-octet COSEM date-time (Blue Book 4.1.6.1) into an aware UTC datetime.

    The deviation is "minutes of local time to UTC" with the sign the standard uses (UTC+1 local
    time carries -60: UTC = local + deviation), which is also gurux's default reading
    (useUtc2NormalTime False). Deviation 0x8000 (not specified) is taken as UTC: the project's
    meters keep UTC. Hundredths 0xFF (not specified) count as 0. Any other wildcard (year,
    month, day, hour, minute, second) makes the value not a point in time: ValueError.
    """
    if len(octets) != 12:
        raise ValueError(f"date-time must be 12 octets, got {len(octets)}")
    year, month, day, _weekday, hour, minute, second, hundredths, deviation, _status = (
        _DATE_TIME.unpack(octets))
    if year == 0xFFFF or 0xFF in (month, day, hour, minute, second) or month > 12 or day > 31:
        raise ValueError(f"date-time {bytes(octets).hex()} is not a point in time")
    if hundredths == 0xFF:
        hundredths = 0
    moment = datetime(year, month, day, hour, minute, second, hundredths * 10000,
                      tzinfo=timezone.utc)
    if deviation and deviation != -0x8000:
        moment += timedelta(minutes=deviation)
    return moment


class ClientSession:
    """One DLMS/COSEM association with one meter, as a pure state machine (see module doc)."""

    def __init__(self, device_mrid: str, client_address: int = 16, server_address: int = 1,
                 security: str = "none", password: str | None = None,
                 hls: HlsGmac | None = None, gateway: Gateway | None = None) -> None:
        if security not in SECURITIES:
            raise ValueError(f"security {security!r} is not one of {list(SECURITIES)}")
        if security == "low" and not password:
            raise ValueError("security 'low' needs a password")
        # Octets never shown in a log line (an echoed AARQ carries the password).
        self._secret_octets = [password.encode()] if password else []
        if (security == "hls-gmac") != (hls is not None):
            raise ValueError("security 'hls-gmac' goes with its HlsGmac settings, and only it")
        self.device_mrid = device_mrid
        self.client_address = client_address
        self.server_address = server_address
        self._security = security
        self._password = password if security == "low" else None
        self._gurux: GXDLMSClient | None = None  # made when first needed (see `_client`)
        self._channel = CipheredChannel(hls) if hls is not None else None
        # Behind a concentrator: every APDU out in a gateway-request, every answer in a
        # gateway-response (cimhes.drivers.concentrator); ciphering stays the meter's own.
        self._gateway = gateway
        self._challenge = b""  # CtoS we sent (HLS)
        self._server_challenge = b""  # StoC the meter sent (HLS)
        self._state = State.IDLE
        self._buffer = bytearray()
        self._blocks: list[tuple[int, bytes]] = []  # (block number, raw-data) of a long GET
        # A long SET or ACTION being sent: (next-block request kind, the value's octets not yet
        # sent, the number of the block last sent, octets per block).
        self._sending: tuple[int, bytes, int, int] | None = None
        self.conformance: int | None = None  # negotiated, from the AARE
        self._invoke_id = 0
        self._next_invoke = 1
        self.max_pdu_size: int | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def _client(self) -> GXDLMSClient:
        """Gurux's client for these addresses and authentication, made on first use: the read
        path never needs it (constructing one costs more than a GET), other services may."""
        if self._gurux is None:
            self._gurux = GXDLMSClient(
                True, self.client_address, self.server_address,
                AUTHENTICATIONS.get(self._security, Authentication.NONE), self._password,
                InterfaceType.WRAPPER)
            if self.max_pdu_size is not None:
                self._gurux.settings.maxPduSize = self.max_pdu_size
        return self._gurux

    # -- requests: each returns the bytes to send --------------------------------------------

    @property
    def ciphered(self) -> bool:
        return self._channel is not None

    @property
    def last_server_counter(self) -> int:
        """The largest invocation counter accepted from the meter (-1: none; HLS only)."""
        return self._channel.last_peer_counter if self._channel is not None else -1

    @property
    def next_client_counter(self) -> int:
        """The first of this session's reserved client counters not used yet (HLS only)."""
        return self._channel.next_counter if self._channel is not None else 0

    def associate(self) -> bytes:
        self._expect_state(State.IDLE, "associate")
        if self._channel is not None:
            data = self._frame(self._hls_aarq())
        else:
            data = self._frame(self._plain_aarq())
        self._state = State.ASSOCIATING
        return data

    def authenticate(self) -> bytes:
        """HLS pass 3: reply_to_HLS_authentication with f(StoC), ciphered."""
        self._expect_state(State.AUTHENTICATION_DUE, "authenticate")
        self._invoke_id = self._next_invoke_id()
        answer = self._count(self._channel.challenge_answer, self._server_challenge)
        apdu = (bytes((ACTION_REQUEST, 0x01, 0xC0 | self._invoke_id, 0x00, ASSOCIATION_LN_CLASS))
                + ASSOCIATION_LN + bytes((REPLY_TO_HLS_AUTHENTICATION, 0x01, 0x09, len(answer)))
                + answer)
        self._state = State.AUTHENTICATING
        return self._frame(self._count(self._channel.protect, apdu))

    def get(self, class_id: int, obis: str, attribute: int) -> bytes:
        """GET one attribute (normal; the meter may answer with block transfer)."""
        self._expect_state(State.ASSOCIATED, "get")
        invoke = self._next_invoke_id()
        return self._start_get(invoke, _GET_NORMAL.pack(
            GET_REQUEST, GET_REQUEST_NORMAL, INVOKE_PRIORITY | invoke, class_id,
            _logical_name(obis), attribute, 0))

    def get_rows_by_range(self, obis: str, start: datetime, end: datetime) -> bytes:
        """GET a profile generic's buffer (attribute 2) with a range_descriptor on the clock
        (class 8, 0.0.1.0.0.255, attribute 2): rows with start <= time <= end, all columns."""
        self._expect_state(State.ASSOCIATED, "get_rows_by_range")
        if start.tzinfo is None or end.tzinfo is None:
            raise LocalProtocolError("get_rows_by_range needs timezone-aware datetimes")
        invoke = self._next_invoke_id()
        # Sent in UTC so the date-times carry deviation 0, as the meters keep their clock.
        return self._start_get(invoke, b"".join((
            _GET_NORMAL.pack(GET_REQUEST, GET_REQUEST_NORMAL, INVOKE_PRIORITY | invoke,
                             PROFILE_GENERIC_CLASS, _logical_name(obis), 2, 1),
            _RANGE_ON_CLOCK, _cosem_datetime_octets(start), _DATE_TIME_TAG,
            _cosem_datetime_octets(end), _ALL_COLUMNS)))

    def set(self, class_id: int, obis: str, attribute: int, value: bytes) -> bytes:
        """SET one attribute (no selective access) to `value`, one A-XDR encoded Data
        (`cimhes.drivers.axdr` builds it). A request larger than the meter's negotiated PDU
        size goes with block transfer (Set-Request-With-First-Datablock, then
        With-Datablock after each acknowledgement: `NextBlockRequest` events) when the meter
        granted it, else it is refused here (`LocalProtocolError`) rather than sent to be
        refused."""
        self._expect_state(State.ASSOCIATED, "set")
        invoke = self._next_invoke_id()
        priority = INVOKE_PRIORITY | invoke
        apdu = _SET_NORMAL.pack(SET_REQUEST, SET_REQUEST_NORMAL, priority,
                                class_id, _logical_name(obis), attribute, 0) + value
        what = f"SET {obis} attribute {attribute}"
        if self._fits(apdu):
            return self._start(State.AWAITING_SET, invoke, apdu)
        self._check_blocks(CONFORMANCE_BLOCK_SET, apdu, what)
        return self._first_block(State.AWAITING_SET, invoke, value, SET_REQUEST_WITH_DATABLOCK,
                                 lambda last: _SET_FIRST_BLOCK.pack(
                                     SET_REQUEST, SET_REQUEST_FIRST_DATABLOCK, priority,
                                     class_id, _logical_name(obis), attribute, 0, last, 1))

    def action(self, class_id: int, obis: str, method: int, parameter: bytes | None) -> bytes:
        """Invoke `method` of an object with `parameter`, one A-XDR encoded Data, or none
        (ACTION-Request-Normal; a parameter too large for the meter's PDU size goes with
        block transfer, Action-Request-With-First-Pblock then With-Pblock, as for `set`)."""
        self._expect_state(State.ASSOCIATED, "action")
        invoke = self._next_invoke_id()
        priority = INVOKE_PRIORITY | invoke
        apdu = _ACTION_NORMAL.pack(ACTION_REQUEST, ACTION_REQUEST_NORMAL,
                                   priority, class_id, _logical_name(obis), method)
        apdu += b"\x00" if parameter is None else b"\x01" + parameter
        what = f"ACTION {obis} method {method}"
        if self._fits(apdu) or parameter is None:
            self._check_fits(apdu, what)
            return self._start(State.AWAITING_ACTION, invoke, apdu)
        self._check_blocks(CONFORMANCE_BLOCK_ACTION, apdu, what)
        return self._first_block(State.AWAITING_ACTION, invoke, parameter,
                                 ACTION_REQUEST_WITH_PBLOCK,
                                 lambda last: _ACTION_FIRST_BLOCK.pack(
                                     ACTION_REQUEST, ACTION_REQUEST_FIRST_PBLOCK, priority,
                                     class_id, _logical_name(obis), method, last, 1))

    def release(self) -> bytes:
        self._expect_state(State.ASSOCIATED, "release")
        data = self._frame(RLRQ_NORMAL)
        self._state = State.RELEASING
        return data

    # -- replies ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the transport; return the events completed by them (maybe none)."""
        if self._state is State.BROKEN:
            return [self._error("data arrived after the byte stream went out of step")]
        self._buffer += data
        events: list[Event] = []
        while len(self._buffer) >= WRAPPER_HEADER.size:
            version, source, destination, length = WRAPPER_HEADER.unpack_from(self._buffer)
            if (version != WRAPPER_VERSION or source != self.server_address
                    or destination != self.client_address):
                header = bytes(self._buffer[:WRAPPER_HEADER.size]).hex()
                self._state = State.BROKEN
                self._buffer.clear()
                events.append(self._error(
                    f"bad wrapper header {header}: expected version 0001, source wPort "
                    f"{self.server_address}, destination wPort {self.client_address}"))
                break
            end = WRAPPER_HEADER.size + length
            if len(self._buffer) < end:
                break
            frame = bytes(self._buffer[:end])
            del self._buffer[:end]
            if self._gateway is not None:
                try:
                    inner = self._gateway.response(frame[WRAPPER_HEADER.size:])
                except GatewayError as failure:
                    events.append(self._fail_request(f"through the concentrator: {failure}"))
                    continue
                frame = WRAPPER_HEADER.pack(version, source, destination, len(inner)) + inner
            events.append(self._handle_frame(frame))
        return events

    # -- inside ------------------------------------------------------------------------------

    def _expect_state(self, state: State, action: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"cannot {action} in state {self._state.value}")

    def _next_invoke_id(self) -> int:
        """A fresh invoke-id (1..15, cycling) for each GET, so an earlier answer replayed is
        refused by `_on_get_response`. (Gurux's autoIncreaseInvokeID would not do: it writes
        `settings.invokeID` while its requests read `settings.invokeId`.)"""
        invoke = self._next_invoke
        self._next_invoke = invoke % 15 + 1
        return invoke

    def _start_get(self, invoke: int, apdu: bytes) -> bytes:
        return self._start(State.AWAITING_DATA, invoke, apdu)

    def _start(self, state: State, invoke: int, apdu: bytes, keep_sending: bool = False) -> bytes:
        self._blocks = []
        if not keep_sending:
            self._sending = None
        self._invoke_id = invoke
        self._state = state
        return self._protect(self._frame(apdu))

    def _room(self) -> int | None:
        """Octets a plain APDU may have to fit the meter's PDU size once protected."""
        if self.max_pdu_size is None:
            return None
        return self.max_pdu_size - (CIPHERING_OVERHEAD if self._channel is not None else 0)

    def _fits(self, apdu: bytes) -> bool:
        room = self._room()
        return room is None or len(apdu) <= room

    def _check_fits(self, apdu: bytes, what: str) -> None:
        if not self._fits(apdu):
            raise LocalProtocolError(
                f"{what} is {len(apdu)} octets, more than the {self._room()} the meter's PDU "
                f"size {self.max_pdu_size} leaves")

    def _check_blocks(self, bit: int, apdu: bytes, what: str) -> None:
        """Block transfer for this service must be granted, and the blocks must carry data."""
        if self.conformance is None or not self.conformance & (1 << (23 - bit)):
            raise LocalProtocolError(
                f"{what} is {len(apdu)} octets, more than the {self._room()} the meter's PDU "
                f"size {self.max_pdu_size} leaves, and the meter did not grant block transfer "
                "for it")
        if self._room() < _SET_FIRST_BLOCK.size + 4:
            raise LocalProtocolError(f"{what}: the meter's PDU size {self.max_pdu_size} leaves "
                                     "no room for a data block")

    def _block_size(self, header: int) -> int:
        """Octets of raw-data in a block whose fixed part is `header` octets: the APDU fills the
        room, the raw-data's length octets included (as gurux-dlms splits them)."""
        room = self._room() - header
        return room - len(encode_ber_length(room - 1))

    def _first_block(self, state: State, invoke: int, value: bytes, next_kind: int,
                     header: Callable[[int], bytes]) -> bytes:
        size = self._block_size(len(header(0)))
        chunk, rest = value[:size], value[size:]
        apdu = header(0) + encode_ber_length(len(chunk)) + chunk
        self._sending = (next_kind, rest, 1, self._block_size(_NEXT_BLOCK.size))
        return self._start(state, invoke, apdu, keep_sending=True)

    def _next_block(self, acknowledged: bytes) -> Event:
        """The meter acknowledged block `number` (4 octets) of the long SET/ACTION: the next."""
        kind, rest, sent, size = self._sending
        number = int.from_bytes(acknowledged, "big")
        if number != sent:
            return self._fail_request(f"the meter acknowledged block {number}, block {sent} "
                                      "was sent")
        if not rest:
            return self._fail_request(f"the meter acknowledged block {number}, the last one, "
                                      "as if more were to come")
        chunk, rest = rest[:size], rest[size:]
        tag = SET_REQUEST if kind == SET_REQUEST_WITH_DATABLOCK else ACTION_REQUEST
        self._sending = (kind, rest, sent + 1, size)
        apdu = (_NEXT_BLOCK.pack(tag, kind, INVOKE_PRIORITY | self._invoke_id, 0 if rest else 1,
                                 sent + 1) + encode_ber_length(len(chunk)) + chunk)
        return NextBlockRequest(self._protect(self._frame(apdu)))

    def _frame(self, apdu: bytes) -> bytes:
        """The wrapper frame carrying `apdu` (inside a gateway-request behind a concentrator)."""
        if self._gateway is not None:
            apdu = self._gateway.request(apdu)
        return WRAPPER_HEADER.pack(WRAPPER_VERSION, self.client_address, self.server_address,
                                   len(apdu)) + apdu

    def _protect(self, frame: bytes) -> bytes:
        """A frame built by `_frame`, with its APDU ciphered when the session is (HLS)."""
        if self._channel is None:
            return frame
        apdu = frame[WRAPPER_HEADER.size:]
        if self._gateway is not None:
            apdu = apdu[len(self._gateway.request_prefix):]
        return self._frame(self._count(self._channel.protect, apdu))

    def _count(self, operation, *args):
        try:
            return operation(*args)
        except CountersExhausted as exhausted:
            raise HeadEndExhausted(self.device_mrid, str(exhausted)) from None

    def _plain_aarq(self) -> bytes:
        """AARQ without ciphering (Green Book; the bytes gurux's aarqRequest makes, checked in
        tests/test_drivers_requests.py): LN context, for LLS the authentication requirement,
        mechanism 1 and the password, and the InitiateRequest."""
        body = _ber(0xA1, _ber(0x06, CONTEXT_LN))
        if self._password is not None:
            body += (bytes((0x8A, 0x02, 0x07, 0x80)) + _ber(0x8B, MECHANISM_LLS)
                     + _ber(0xAC, _ber(0x80, self._password.encode())))
        return _ber(0x60, body + _ber(0xBE, _ber(0x04, PLAIN_INITIATE_REQUEST)))

    def _hls_aarq(self) -> bytes:
        """AARQ for HLS-GMAC: ciphered LN context, calling-AP-title = the client's system
        title, mechanism 5, CtoS, and the InitiateRequest as glo-initiate-request."""
        self._challenge = secrets.token_bytes(CHALLENGE_SIZE)
        title = self._channel.settings.client_system_title
        initiate = (bytes((0x01, 0x00, 0x00, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00))
                    + HLS_CONFORMANCE.to_bytes(3, "big")
                    + CLIENT_MAX_PDU_SIZE.to_bytes(2, "big"))
        ciphered = self._count(self._channel.protect, initiate)
        body = (_ber(0xA1, _ber(0x06, CONTEXT_LN_CIPHERING))
                + _ber(0xA6, _ber(0x04, title))
                + bytes((0x8A, 0x02, 0x07, 0x80))
                + _ber(0x8B, MECHANISM_HLS_GMAC)
                + _ber(0xAC, _ber(0x80, self._challenge))
                + _ber(0xBE, _ber(0x04, ciphered)))
        return _ber(0x60, body)

    def _raw(self, data: bytes) -> str:
        """What an error says of raw meter octets: how many, never their content. The octets
        themselves go to the debug log only, with the password masked."""
        shown = bytes(data).hex()
        for secret in self._secret_octets:
            shown = shown.replace(secret.hex(), "**" * len(secret))
        log.debug("%s: raw octets %s", self.device_mrid, shown)
        return f"({len(data)} octets)"

    def _error(self, reason: str) -> ProtocolError:
        return ProtocolError(self.device_mrid, reason)

    def _handle_frame(self, frame: bytes) -> Event:
        apdu = frame[WRAPPER_HEADER.size:]
        if not apdu:
            return self._fail_request("empty APDU in wrapper frame")
        tag = apdu[0]
        if tag == EXCEPTION_RESPONSE and self._channel is not None and apdu[1:3] == b"\x01\x05":
            self._fail_request("")
            return AuthenticationFailed(
                self.device_mrid, "authentication failed: the meter could not decipher the "
                "request (exception-response deciphering-error); it holds other keys")
        if tag == EXCEPTION_RESPONSE and self._channel is not None and apdu[1:3] == b"\x01\x06":
            self._fail_request("")
            return CounterRejected(
                self.device_mrid, "the meter refused the head-end's invocation counter as "
                "already used (exception-response invocation-counter-error)")
        if tag == CONFIRMED_SERVICE_ERROR or tag == EXCEPTION_RESPONSE:
            return self._fail_request(f"meter answered with {_apdu_name(tag)} {self._raw(apdu)}")
        if self._state is State.ASSOCIATING:
            if self._channel is not None:
                return self._on_hls_aare(apdu, tag)
            return self._on_aare(apdu, tag)
        if self._channel is not None and tag != RLRE:
            if tag not in PLAIN_TAGS and tag != GENERAL_GLO_CIPHERING:
                return self._fail_request(
                    f"unciphered {_apdu_name(tag)} in a ciphered association, refused")
            try:
                apdu = self._channel.unprotect(apdu)
            except ReplayedCounter as replay:
                self._fail_request("")
                return ReplayDetected(self.device_mrid, f"answer refused as a replay: {replay}",
                                      replay.counter, replay.last_seen)
            except CipheringError as failure:
                self._fail_request("")
                return AuthenticationFailed(
                    self.device_mrid, f"authentication failed: the meter's answer does not "
                    f"decipher with the keys held for it ({failure})")
            tag = apdu[0]
        if self._state is State.AUTHENTICATING:
            return self._on_hls_reply(apdu, tag)
        if self._state is State.AWAITING_DATA:
            return self._on_get_response(apdu)
        if self._state is State.AWAITING_SET:
            return self._on_set_response(apdu)
        if self._state is State.AWAITING_ACTION:
            return self._on_action_response(apdu)
        if self._state is State.RELEASING:
            if tag != RLRE:
                return self._fail_request(f"expected RLRE, got {_apdu_name(tag)}")
            self._state = State.IDLE
            return Released()
        return self._error(f"unsolicited {_apdu_name(tag)} in state {self._state.value}")

    def _fail_request(self, reason: str) -> ProtocolError:
        """The request in flight failed; go back to where it started, association intact."""
        self._blocks = []
        self._sending = None
        if self._state in (State.ASSOCIATING, State.AUTHENTICATING):
            self._state = State.IDLE
        elif self._state in (State.AWAITING_DATA, State.AWAITING_SET, State.AWAITING_ACTION,
                             State.RELEASING):
            self._state = State.ASSOCIATED
        return self._error(reason)

    def _on_aare(self, apdu: bytes, tag: int) -> Event:
        """The AARE of an association without ciphering (no security or LLS)."""
        if tag != AARE:
            return self._fail_request(f"expected AARE, got {_apdu_name(tag)}")
        try:
            fields = _ber_fields(apdu)
            result = _ber_integer(fields, 0xA2)
            diagnostic = _ber_diagnostic(fields)
        except (ValueError, IndexError) as failure:
            return self._fail_request(f"malformed AARE {self._raw(apdu)}: {failure}")
        if result != 0:
            self._state = State.IDLE
            return AssociationRefused(
                self.device_mrid,
                f"AARE {ASSOCIATION_RESULTS.get(result, f'result {result}')}, diagnostic "
                f"{ASSOCIATION_DIAGNOSTICS.get(diagnostic, str(diagnostic))}",
                result, diagnostic)
        if diagnostic == DIAGNOSTIC_AUTHENTICATION_REQUIRED:
            self._state = State.IDLE
            return self._error("meter asks for high level authentication, not supported")
        try:
            context = _inner(fields.get(0xA1), 0x06)
            initiate = _inner(fields.get(0xBE), 0x04)
        except ValueError as failure:
            return self._fail_request(f"AARE {self._raw(apdu)}: {failure}")
        if context != CONTEXT_LN:
            return self._fail_request(f"AARE names application context {context.hex()}, not "
                                      "logical name referencing without ciphering")
        # InitiateResponse: tag 8, no quality-of-service, DLMS version 6, conformance, PDU size.
        if len(initiate) < 14 or initiate[0] != 0x08 or initiate[1] != 0 or initiate[2] != 6:
            return self._fail_request(f"AARE holds no InitiateResponse: {self._raw(initiate)}")
        self._state = State.ASSOCIATED
        self.max_pdu_size = int.from_bytes(initiate[10:12], "big")
        self.conformance = int.from_bytes(initiate[7:10], "big")
        if self._gurux is not None:
            self._gurux.settings.maxPduSize = self.max_pdu_size
        return Associated(self.max_pdu_size)

    def _on_hls_aare(self, apdu: bytes, tag: int) -> Event:
        """The AARE of an HLS-GMAC association (read here: gurux would decipher it with its
        own slow cipher)."""
        if tag != AARE:
            return self._fail_request(f"expected AARE, got {_apdu_name(tag)}")
        try:
            fields = _ber_fields(apdu)
            result = _ber_integer(fields, 0xA2)
            diagnostic = _ber_diagnostic(fields)
        except (ValueError, IndexError) as failure:
            return self._fail_request(f"malformed AARE {self._raw(apdu)}: {failure}")
        if result != 0:
            self._state = State.IDLE
            words = (f"AARE {ASSOCIATION_RESULTS.get(result, f'result {result}')}, diagnostic "
                     f"{ASSOCIATION_DIAGNOSTICS.get(diagnostic, str(diagnostic))}")
            if diagnostic == DIAGNOSTIC_AUTHENTICATION_FAILURE:
                return AuthenticationFailed(
                    self.device_mrid, f"authentication failed: the meter refused the "
                    f"HLS-GMAC association ({words}); the encryption key, authentication key "
                    "or the head-end's system title is not the one the meter holds")
            return AssociationRefused(self.device_mrid, words, result, diagnostic)
        expected = self._channel.settings.server_system_title
        try:
            title = _inner(fields.get(0xA4), 0x04)
            challenge = _inner(fields.get(0xAA), 0x80)
            user_information = _inner(fields.get(0xBE), 0x04)
        except ValueError as failure:
            return self._fail_request(f"AARE for HLS-GMAC: {failure}")
        if title != expected:
            self._state = State.IDLE
            return AuthenticationFailed(
                self.device_mrid, f"authentication failed: the meter's system title is "
                f"{title.hex()}, the inventory says {expected.hex()}")
        if diagnostic != DIAGNOSTIC_AUTHENTICATION_REQUIRED or not 8 <= len(challenge) <= 64:
            return self._fail_request("AARE for HLS-GMAC lacks the authentication-required "
                                      "diagnostic or an 8..64 octet challenge")
        try:
            initiate = self._channel.unprotect(user_information)
        except ReplayedCounter as replay:
            self._state = State.IDLE
            return ReplayDetected(self.device_mrid, f"AARE refused as a replay: {replay}",
                                  replay.counter, replay.last_seen)
        except CipheringError as failure:
            self._state = State.IDLE
            return AuthenticationFailed(
                self.device_mrid, "authentication failed: the meter's AARE does not decipher "
                f"with the keys held for it ({failure})")
        if len(initiate) < 14 or initiate[0] != 0x08 or initiate[1] != 0:
            return self._fail_request(f"AARE holds no InitiateResponse: {self._raw(initiate)}")
        self.max_pdu_size = int.from_bytes(initiate[10:12], "big")
        self.conformance = int.from_bytes(initiate[7:10], "big")
        self._server_challenge = challenge
        self._state = State.AUTHENTICATION_DUE
        return AuthenticationRequired()

    def _on_hls_reply(self, apdu: bytes, tag: int) -> Event:
        """HLS pass 4: the action-response carrying f(CtoS)."""
        if tag != ACTION_RESPONSE or len(apdu) < 5 or apdu[1] != 0x01:
            return self._fail_request(f"expected action-response to HLS authentication, got "
                                      f"{apdu[:8].hex()}")
        if apdu[2] & 0x0F != self._invoke_id:
            return self._fail_request(f"action-response {apdu[:3].hex()} does not answer "
                                      f"invoke-id {self._invoke_id}")
        if apdu[3] != 0:
            self._state = State.IDLE
            return AuthenticationFailed(
                self.device_mrid, f"authentication failed: the meter refused f(StoC) with "
                f"action-result {apdu[3]} (the authentication key is not the meter's)")
        try:
            if apdu[4:6] != b"\x01\x00":
                raise AxdrError("no return data")
            answer = decode_data(apdu, 6)
            if not isinstance(answer, bytes):
                raise AxdrError("return data is not an octet-string")
            self._channel.check_challenge_answer(answer, self._challenge)
        except AxdrError as failure:
            return self._fail_request(f"action-response to HLS authentication: {failure}")
        except CipheringError as failure:
            self._state = State.IDLE
            return AuthenticationFailed(
                self.device_mrid, f"authentication failed: the meter's f(CtoS) is wrong "
                f"({failure})")
        self._state = State.ASSOCIATED
        return Associated(self.max_pdu_size)

    def _on_get_response(self, apdu: bytes) -> Event:
        """Read a GET-Response (Green Book 9.3: Get-Response-Normal or -With-Datablock).

        Done here rather than by gurux's GXReplyData handling: gurux decodes the finished value
        with its slow generic decoder (see `cimhes.drivers.axdr`) and never checks invoke-ids.
        """
        if apdu[0] != GET_RESPONSE:
            return self._fail_request(f"expected get-response, got {_apdu_name(apdu[0])}")
        if len(apdu) < 5:
            return self._fail_request(f"get-response {self._raw(apdu)} is too short")
        kind, invoke = apdu[1], apdu[2] & 0x0F
        if invoke != self._invoke_id:
            return self._fail_request(
                f"get-response {apdu[:3].hex()} does not answer invoke-id {self._invoke_id}")
        try:
            if kind == GET_RESPONSE_NORMAL:
                if self._blocks:
                    return self._fail_request("get-response-normal inside a block transfer")
                if apdu[3] == 1:  # Get-Data-Result: data-access-result
                    return self._finish_get(DataAccessError(apdu[4]))
                if apdu[3] != 0:
                    return self._fail_request(f"get-response {self._raw(apdu)}: bad Get-Data-Result")
                return self._finish_get(AttributeValue(decode_data(apdu, 4)))
            if kind == GET_RESPONSE_WITH_DATABLOCK:
                return self._on_block(apdu)
        except AxdrError as failure:
            return self._fail_request(f"get-response data: {failure}")
        return self._fail_request(f"get-response of kind {kind} was not asked for")

    def _on_set_response(self, apdu: bytes) -> Event:
        """Set-Response-Normal: tag, kind 1, invoke-id, Data-Access-Result; during a long SET
        Set-Response-Datablock (kind 2, the block number) and Set-Response-Last-Datablock
        (kind 3, the result and the block number)."""
        if apdu[0] != SET_RESPONSE:
            return self._fail_request(f"expected set-response, got {_apdu_name(apdu[0])}")
        if len(apdu) >= 3 and apdu[2] & 0x0F != self._invoke_id:
            return self._fail_request(
                f"set-response {apdu[:3].hex()} does not answer invoke-id {self._invoke_id}")
        if self._sending is not None and len(apdu) == 7 and apdu[1] == SET_RESPONSE_DATABLOCK:
            return self._next_block(apdu[3:7])
        if self._sending is not None and len(apdu) == 8 and apdu[1] == SET_RESPONSE_LAST_DATABLOCK:
            number, (_, rest, sent, _) = int.from_bytes(apdu[4:8], "big"), self._sending
            if apdu[3] == 0 and (rest or number != sent):
                return self._fail_request(f"set-response-last-datablock for block {number} "
                                          f"while block {sent} was sent, {len(rest)} octets left")
            self._sending = None
            self._state = State.ASSOCIATED
            return SetResult(apdu[3])
        self._sending = None  # a normal answer (a refusal) ends a long SET too
        if len(apdu) != 4 or apdu[1] != 1:
            return self._fail_request(f"set-response {self._raw(apdu)} is not a "
                                      "set-response-normal")
        if apdu[2] & 0x0F != self._invoke_id:
            return self._fail_request(
                f"set-response {apdu[:3].hex()} does not answer invoke-id {self._invoke_id}")
        self._state = State.ASSOCIATED
        return SetResult(apdu[3])

    def _on_action_response(self, apdu: bytes) -> Event:
        """Action-Response-Normal: tag, kind 1, invoke-id, Action-Result, optional
        return parameters (Get-Data-Result: data, or a data-access-result)."""
        if apdu[0] != ACTION_RESPONSE:
            return self._fail_request(f"expected action-response, got {_apdu_name(apdu[0])}")
        if (self._sending is not None and len(apdu) == 7
                and apdu[1] == ACTION_RESPONSE_NEXT_PBLOCK):
            if apdu[2] & 0x0F != self._invoke_id:
                return self._fail_request(f"action-response {apdu[:3].hex()} does not answer "
                                          f"invoke-id {self._invoke_id}")
            return self._next_block(apdu[3:7])
        if self._sending is not None and self._sending[1] and apdu[1] == 1 and len(apdu) >= 5 \
                and apdu[3] == 0:
            return self._fail_request("action-response success before the last pblock was sent")
        self._sending = None
        if len(apdu) < 5 or apdu[1] != 1:
            return self._fail_request(f"action-response {self._raw(apdu)} is not an "
                                      "action-response-normal")
        if apdu[2] & 0x0F != self._invoke_id:
            return self._fail_request(
                f"action-response {apdu[:3].hex()} does not answer invoke-id {self._invoke_id}")
        data = None
        try:
            if apdu[4] == 1:
                if len(apdu) < 7:
                    raise AxdrError("return parameters truncated")
                if apdu[5] == 0:
                    data = decode_data(apdu, 6)
                elif apdu[5] == 1 and len(apdu) == 7:
                    data = DataAccessError(apdu[6])
                else:
                    raise AxdrError(f"bad Get-Data-Result choice {apdu[5]}")
            elif apdu[4] != 0 or len(apdu) != 5:
                raise AxdrError("return-parameters flag or length is wrong")
        except AxdrError as failure:
            return self._fail_request(f"action-response {self._raw(apdu)}: {failure}")
        self._state = State.ASSOCIATED
        return ActionResult(apdu[3], data)

    def _on_block(self, apdu: bytes) -> Event:
        # DataBlock-G: last-block BOOLEAN, block-number Unsigned32, result CHOICE
        # { raw-data [0] OCTET STRING, data-access-result [1] ENUMERATED }
        if len(apdu) < 10:
            return self._fail_request(f"get-response datablock {self._raw(apdu)} is too short")
        last = apdu[3] != 0
        number = int.from_bytes(apdu[4:8], "big")
        expected = self._blocks[-1][0] + 1 if self._blocks else number
        if number != expected:
            return self._fail_request(f"block {number} arrived, block {expected} expected")
        if apdu[8] == 1:
            return self._finish_get(DataAccessError(apdu[9]))
        if apdu[8] != 0:
            return self._fail_request(f"datablock {number}: bad result choice {apdu[8]}")
        size, start = ber_length(apdu, 9)
        if start + size != len(apdu):
            return self._fail_request(
                f"datablock {number} says {size} bytes of raw-data, carries {len(apdu) - start}")
        self._blocks.append((number, apdu[start:]))
        if not last:
            # GET-Request-Next carries the number of the block just received.
            return NextBlockRequest(self._protect(self._frame(_GET_NEXT.pack(
                GET_REQUEST, GET_REQUEST_NEXT, INVOKE_PRIORITY | self._invoke_id, number))))
        value = decode_data(b"".join(raw for _, raw in self._blocks))
        return self._finish_get(AttributeValue(value))

    def _finish_get(self, event: Event) -> Event:
        self._blocks = []
        self._state = State.ASSOCIATED
        return event


def _ber(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + encode_ber_length(len(content)) + content


def _ber_fields(apdu: bytes) -> dict[int, bytes]:
    """Contents of each single-byte-tagged field of an ACSE APDU (which must fill it)."""
    size, position = ber_length(apdu, 1)
    if position + size != len(apdu):
        raise ValueError(f"length {size} does not match the {len(apdu) - position} octets")
    fields: dict[int, bytes] = {}
    while position < len(apdu):
        tag = apdu[position]
        size, start = ber_length(apdu, position + 1)
        if start + size > len(apdu):
            raise ValueError(f"field 0x{tag:02x} at offset {position} overruns the APDU")
        fields[tag] = apdu[start:start + size]
        position = start + size
    return fields


def _inner(content: bytes | None, tag: int) -> bytes:
    """The contents of the one TLV with `tag` inside an explicitly tagged field."""
    if not content or content[0] != tag:
        raise ValueError(f"field missing or without inner tag 0x{tag:02x}")
    size, start = ber_length(content, 1)
    if start + size != len(content):
        raise ValueError(f"inner length {size} does not fill the field")
    return content[start:]


def _ber_integer(fields: dict[int, bytes], tag: int) -> int:
    return int.from_bytes(_inner(fields.get(tag), 0x02), "big")


def _ber_diagnostic(fields: dict[int, bytes]) -> int:
    # result-source-diagnostic: [1] acse-service-user or [2] acse-service-provider, INTEGER
    content = fields.get(0xA3)
    if not content or content[0] not in (0xA1, 0xA2):
        raise ValueError("result-source-diagnostic missing")
    return int.from_bytes(_inner(_inner(content, content[0]), 0x02), "big")


_LOGICAL_NAMES: dict[str, bytes] = {}


def _logical_name(obis: str) -> bytes:
    """The 6 octets of an OBIS code "a.b.c.d.e.f" (a meter's few codes, converted once)."""
    octets = _LOGICAL_NAMES.get(obis)
    if octets is None:
        octets = bytes(int(part) for part in obis.split("."))
        if len(octets) != 6:
            raise LocalProtocolError(f"OBIS code {obis!r} does not have six parts")
        _LOGICAL_NAMES[obis] = octets
    return octets


def _cosem_datetime_octets(moment: datetime) -> bytes:
    """The 12 date-time octets (Blue Book 4.1.6.1) of `moment` in UTC: deviation 0, day of week
    not specified, hundredths 0, status 0 (as gurux sends them)."""
    utc = moment.astimezone(timezone.utc)
    return _DATE_TIME_OCTETS.pack(utc.year, utc.month, utc.day, 0xFF, utc.hour, utc.minute,
                                  utc.second, 0, 0, 0)


def _apdu_name(tag: int) -> str:
    names = {AARE: "AARE", RLRE: "RLRE", GET_RESPONSE: "get-response",
             SET_RESPONSE: "set-response", ACTION_RESPONSE: "action-response",
             CONFIRMED_SERVICE_ERROR: "confirmed-service-error",
             EXCEPTION_RESPONSE: "exception-response"}
    return names.get(tag, f"APDU tag 0x{tag:02x}")
