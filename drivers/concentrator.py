"""Meters behind a data concentrator: the DLMS gateway protocol, and the concentrator as a route.

A concentrator in gateway mode is reached over the TCP wrapper like a meter; each APDU for a
meter behind it travels inside a gateway APDU naming the meter (IEC 62056-5-3, the DLMS UA Green
Book, gateway protocol: gateway-request [230] and gateway-response [231]):

    gateway-request   0xE6  network-id (Unsigned8)  physical-device-address (OCTET STRING)  xDLMS APDU
    gateway-response  0xE7  network-id (Unsigned8)  physical-device-address (OCTET STRING)  xDLMS APDU

The octet string is A-XDR: a length (one octet below 128, else 0x81/0x82 and the length) and the
octets. The same layout is what gurux-dlms writes when its `GXDLMSSettings.gateway` is set
(`GXDLMS.getLNPdu`, `Command.GATEWAY_REQUEST` = 0xE6, `GATEWAY_RESPONSE` = 0xE7) and reads in
`GXDLMS.getPdu`. The APDU inside is the meter's own, as the session built it: an HLS-GMAC
session's APDUs stay ciphered with the meter's keys end to end (the concentrator forwards what it
cannot read), an LLS session's AARQ carries the meter's password.

`Gateway` is sans-IO (bytes in, bytes out): `ClientSession` wraps every APDU it sends with
`request` and unwraps every answer with `response`. `gateway_of(device)` is the device's gateway
when the inventory places it behind a concentrator (`DeviceAddress.physical_address`).

`GatewayMux` is the sans-IO half of one TCP association shared by every meter session behind
one concentrator (`drivers/concentrator_link.py` carries it on Twisted): it cuts the byte stream
from the concentrator into wrapper frames and names, for each, the session it belongs to. A
gateway-response says which meter answers by its network id and physical device address (the
same fields as the request); the wrapper header's destination wPort says which of that meter's
client associations (management client SAP 1, public client SAP 16, ...) it answers. So a
channel is (network id, physical address, client wPort), and at most one session holds a
channel at a time. A frame for no open channel (an unknown address, a late answer to a session
already ended) or without a gateway header is a `Stray`: dropped and reported, the others go on.
Only a broken byte stream (a wrapper version other than 1) is fatal to the association.

`ConcentratorRoute` describes one concentrator as the inventory's "routes" list does (kind
"concentrator"): where it listens, its network id, and how many meter sessions its PLC segment
serves at once. That bound is the engine's per-route bound (`engine/limits.py`), applied to
every job on the route, across requests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cimhes.drivers.address import DeviceAddress

GATEWAY_REQUEST = 0xE6
GATEWAY_RESPONSE = 0xE7
# Meter sessions one concentrator's PLC segment serves at once, unless its route says otherwise.
DEFAULT_MAX_SESSIONS = 4
MAX_PHYSICAL_ADDRESS = 64  # octets; PLC MAC addresses are 2 (PRIME node) to 8 (EUI-64)


class GatewayError(ValueError):
    """An answer that is not the gateway-response of this meter (wrong tag, network id or
    address, or too short); the session turns it into a ProtocolError naming the device."""


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    if size < 0x100:
        return bytes((0x81, size))
    return bytes((0x82,)) + size.to_bytes(2, "big")


@dataclass(frozen=True)
class Gateway:
    """The way through one concentrator to one meter: its network id and physical address."""

    network_id: int
    physical_address: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.network_id <= 255:
            raise ValueError(f"network id {self.network_id} is not 0..255")
        if not 1 <= len(self.physical_address) <= MAX_PHYSICAL_ADDRESS:
            raise ValueError(f"physical device address must be 1..{MAX_PHYSICAL_ADDRESS} "
                             f"octets, got {len(self.physical_address)}")
        object.__setattr__(self, "_request_prefix", self._prefix(GATEWAY_REQUEST))
        object.__setattr__(self, "_response_prefix", self._prefix(GATEWAY_RESPONSE))

    def _prefix(self, tag: int) -> bytes:
        return (bytes((tag, self.network_id)) + _length(len(self.physical_address))
                + self.physical_address)

    @property
    def request_prefix(self) -> bytes:
        """The octets a gateway-request puts before the meter's APDU."""
        return self._request_prefix  # type: ignore[attr-defined]

    def request(self, apdu: bytes) -> bytes:
        """The gateway-request carrying `apdu` to this meter."""
        return self._request_prefix + apdu  # type: ignore[attr-defined]

    def response(self, apdu: bytes) -> bytes:
        """The meter's APDU inside a gateway-response from this meter; GatewayError otherwise."""
        prefix = self._response_prefix  # type: ignore[attr-defined]
        if apdu[:len(prefix)] == prefix and len(apdu) > len(prefix):
            return apdu[len(prefix):]
        network_id, address, _ = parse_gateway_apdu(apdu, GATEWAY_RESPONSE)
        if network_id != self.network_id or address != self.physical_address:
            raise GatewayError(
                f"gateway-response from network {network_id} address {address.hex()}, "
                f"expected network {self.network_id} address {self.physical_address.hex()}")
        raise GatewayError("gateway-response carries no APDU")


def parse_gateway_apdu(apdu: bytes, tag: int) -> tuple[int, bytes, bytes]:
    """(network id, physical device address, inner APDU) of a gateway APDU with `tag`."""
    if not apdu or apdu[0] != tag:
        shown = f"tag 0x{apdu[0]:02x}" if apdu else "an empty APDU"
        name = {GATEWAY_REQUEST: "gateway-request", GATEWAY_RESPONSE: "gateway-response"}[tag]
        raise GatewayError(f"expected a {name} (0x{tag:02X}), got {shown}")
    if len(apdu) < 4:
        raise GatewayError(f"gateway APDU of {len(apdu)} octets is too short")
    network_id, size, start = apdu[1], apdu[2], 3
    if size == 0x81 and len(apdu) > 3:
        size, start = apdu[3], 4
    elif size == 0x82 and len(apdu) > 4:
        size, start = int.from_bytes(apdu[3:5], "big"), 5
    elif size >= 0x80:
        raise GatewayError(f"gateway APDU address length octet 0x{size:02x} is not A-XDR")
    if not 1 <= size <= MAX_PHYSICAL_ADDRESS or start + size > len(apdu):
        raise GatewayError(f"gateway APDU physical address of {size} octets does not fit")
    return network_id, bytes(apdu[start:start + size]), bytes(apdu[start + size:])


_WRAPPER = struct.Struct(">HHHH")  # version, source wPort, destination wPort, length
WRAPPER_VERSION = 1

ChannelKey = tuple[int, bytes, int]  # (network id, physical address, client wPort)


@dataclass(frozen=True)
class Delivered:
    """A wrapper frame for the session on `channel` (passed on whole, gateway header and all:
    the session checks it is its meter's answer)."""

    channel: ChannelKey
    frame: bytes


@dataclass(frozen=True)
class Stray:
    """A frame no open channel takes: dropped. `reason` says why (for the log)."""

    reason: str


@dataclass(frozen=True)
class StreamBroken:
    """The byte stream is out of step (no wrapper header where one must be): the association
    cannot be trusted any more and must be closed."""

    reason: str


MuxEvent = Delivered | Stray | StreamBroken


class GatewayMux:
    """Routes the frames of one concentrator association to the channels open on it (sans-IO:
    `receive_data(bytes)` gives the events those bytes completed)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._channels: set[ChannelKey] = set()
        self._broken: str | None = None

    @staticmethod
    def channel_of(gateway: Gateway, client_address: int) -> ChannelKey:
        return (gateway.network_id, gateway.physical_address, client_address)

    @property
    def channels(self) -> frozenset[ChannelKey]:
        return frozenset(self._channels)

    def open(self, channel: ChannelKey) -> None:
        if channel in self._channels:
            raise ValueError(f"channel {describe(channel)} is already open")
        self._channels.add(channel)

    def close(self, channel: ChannelKey) -> None:
        self._channels.discard(channel)

    def receive_data(self, data: bytes) -> list[MuxEvent]:
        if self._broken is not None:
            return [StreamBroken(self._broken)]
        self._buffer += data
        events: list[MuxEvent] = []
        while len(self._buffer) >= _WRAPPER.size:
            version, source, destination, length = _WRAPPER.unpack_from(self._buffer)
            if version != WRAPPER_VERSION:
                self._broken = (f"wrapper header {bytes(self._buffer[:_WRAPPER.size]).hex()} "
                                "is not version 1: the stream is out of step")
                self._buffer.clear()
                events.append(StreamBroken(self._broken))
                break
            end = _WRAPPER.size + length
            if len(self._buffer) < end:
                break
            frame = bytes(self._buffer[:end])
            del self._buffer[:end]
            events.append(self._route(destination, frame))
        return events

    def _route(self, client: int, frame: bytes) -> MuxEvent:
        try:
            network_id, address, _ = parse_gateway_apdu(frame[_WRAPPER.size:], GATEWAY_RESPONSE)
        except GatewayError as failure:
            return Stray(f"frame for wPort {client}: {failure}")
        channel = (network_id, address, client)
        if channel not in self._channels:
            return Stray(f"gateway-response for {describe(channel)}, which no session waits for")
        return Delivered(channel, frame)


def describe(channel: ChannelKey) -> str:
    network_id, address, client = channel
    return f"network {network_id} physical address {address.hex()} client wPort {client}"


def gateway_of(device: DeviceAddress) -> Gateway | None:
    """The gateway to `device` when it is behind a concentrator, else None."""
    if device.physical_address is None:
        return None
    return Gateway(device.network_id or 0, bytes.fromhex(device.physical_address))


@dataclass(frozen=True)
class ConcentratorRoute:
    """One data concentrator (an inventory route of kind "concentrator")."""

    name: str
    host: str
    port: int = 4059
    network_id: int = 0
    max_sessions: int = DEFAULT_MAX_SESSIONS

    def __post_init__(self) -> None:
        if not 0 <= self.network_id <= 255:
            raise ValueError(f"concentrator {self.name}: network_id {self.network_id} is not "
                             "0..255")
        if self.max_sessions < 1:
            raise ValueError(f"concentrator {self.name}: max_sessions must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"concentrator {self.name}: port {self.port} is not 1..65535")


__all__ = ["GATEWAY_REQUEST", "GATEWAY_RESPONSE", "DEFAULT_MAX_SESSIONS", "Gateway",
           "GatewayError", "GatewayMux", "Delivered", "Stray", "StreamBroken", "ChannelKey",
           "ConcentratorRoute", "gateway_of", "parse_gateway_apdu"]
