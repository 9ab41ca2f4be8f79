"""Sans-IO reception of DLMS pushes: TCP wrapper frames in, DataNotifications (plain or ciphered) out.

`PushReceiver.receive_data(data)` takes what arrived on a push connection and returns the APDUs
of the wrapper frames it completes; a frame longer than `max_apdu` or a broken header is a
`PushError` (the stream is out of step: the caller closes the connection). `decode(apdu, keys)`
turns one APDU into a `DataNotification` (Green Book: data-notification [15]
long-invoke-id-and-priority, date-time OCTET STRING (SIZE(0..12)), notification-body Data).
A general-glo-ciphering APDU (0xDB, the sender's system title inside) is opened first with the
keys `keys(system_title)` gives (None: an unknown sender); every failure is a `PushError` whose
`problem` says which kind ("malformed", "unknown device", "undecryptable") and whose text names
no key.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cimhes.drivers.axdr import AxdrError, decode_data
from cimhes.drivers.ciphering import (
    GENERAL_GLO_CIPHERING,
    CipheringError,
    GlobalCipher,
    SecurityKeys,
    split_ciphered,
)
from cimhes.drivers.dlms_session import cosem_datetime

DATA_NOTIFICATION = 0x0F
_WRAPPER = struct.Struct(">HHHH")
# A push is a few hundred octets; an alarm storm must not let one peer hold megabytes.
DEFAULT_MAX_APDU = 4096


class PushError(ValueError):
    """A push that cannot be taken: `problem` is "malformed", "unknown device" or
    "undecryptable"; `identity` is what identified the sender, if anything did."""

    def __init__(self, problem: str, reason: str, identity: str | None = None) -> None:
        super().__init__(reason)
        self.problem = problem
        self.reason = reason
        self.identity = identity


@dataclass(frozen=True)
class DataNotification:
    invoke_id: int
    at: datetime | None  # the notification's date-time, None when absent
    body: Any  # the notification-body, decoded as `cimhes.drivers.axdr` does
    system_title: bytes | None = None  # the sender's, when the push was ciphered
    counter: int | None = None  # its invocation counter, when ciphered


class PushReceiver:
    """Splits one push connection's byte stream into wrapper-framed APDUs."""

    def __init__(self, max_apdu: int = DEFAULT_MAX_APDU) -> None:
        self.max_apdu = max_apdu
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> list[bytes]:
        self._buffer += data
        apdus = []
        while len(self._buffer) >= _WRAPPER.size:
            version, _source, _destination, length = _WRAPPER.unpack_from(self._buffer)
            if version != 1:
                raise PushError("malformed", f"wrapper version {version}, expected 1")
            if length > self.max_apdu:
                raise PushError("malformed", f"push of {length} octets exceeds the limit of "
                                f"{self.max_apdu}")
            end = _WRAPPER.size + length
            if len(self._buffer) < end:
                break
            apdus.append(bytes(self._buffer[_WRAPPER.size:end]))
            del self._buffer[:end]
        return apdus


def decode(apdu: bytes, keys: Callable[[bytes], SecurityKeys | None]) -> DataNotification:
    """The DataNotification in `apdu`, opened with `keys(system_title)` when ciphered."""
    if not apdu:
        raise PushError("malformed", "empty APDU")
    title = counter = None
    if apdu[0] == GENERAL_GLO_CIPHERING:
        try:
            _tag, title, content = split_ciphered(apdu)
        except CipheringError as failure:
            raise PushError("malformed", f"general-glo-ciphering: {failure}") from None
        shown = title.hex() if title else None
        found = keys(title) if title and len(title) == 8 else None
        if found is None:
            raise PushError("unknown device", f"ciphered push from system title {shown}, "
                            "which no device of the inventory has", shown)
        try:
            counter, apdu = GlobalCipher(found).open(title, content)
        except CipheringError as failure:
            raise PushError("undecryptable", f"ciphered push from {shown}: {failure}",
                            shown) from None
    notification = _plain(apdu)
    return DataNotification(notification.invoke_id, notification.at, notification.body, title,
                            counter)


def _plain(apdu: bytes) -> DataNotification:
    if apdu[0] != DATA_NOTIFICATION:
        raise PushError("malformed", f"APDU tag 0x{apdu[0]:02x} is not a data-notification")
    if len(apdu) < 6:
        raise PushError("malformed", "data-notification truncated")
    invoke_id = int.from_bytes(apdu[1:5], "big")
    size = apdu[5]
    if size not in (0, 12) or len(apdu) < 6 + size:
        raise PushError("malformed", f"data-notification date-time of {size} octets")
    at = None
    if size:
        try:
            at = cosem_datetime(apdu[6:18])
        except ValueError as failure:
            raise PushError("malformed", f"data-notification date-time: {failure}") from None
    try:
        body = decode_data(apdu, 6 + size)
    except AxdrError as failure:
        raise PushError("malformed", f"notification-body: {failure}") from None
    return DataNotification(invoke_id, at, body)
