"""Where a device is and who it is: one inventory entry, as the drivers need it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from cimhes.drivers.ciphering import KEY_SIZE, SYSTEM_TITLE_SIZE, SecurityKeys

# security -> what it means (the inventory's "security" values).
SECURITIES = {
    "none": "no authentication: the public client (SAP 16)",
    "low": "low level security (LLS): a password, SAP 1",
    "hls-gmac": "high level security with GMAC (mechanism 5), APDUs authenticated and "
                "encrypted with AES-GCM-128 (security suite 0), SAP 1",
}


@dataclass(frozen=True)
class DeviceAddress:
    """One entry of the inventory file's "meters" list (see the inventory format).

    `security` says how the head-end associates; "hls-gmac" needs the meter's `system_title`
    (8 octets), `encryption_key` (the global unicast key) and `authentication_key` (16 octets
    each), all hex. Neither keys nor password ever show in a repr.

    A meter behind a data concentrator has `physical_address` (its address on the
    concentrator's network, hex) and `network_id`; `host` and `port` are then the
    concentrator's, and every APDU goes through it in the gateway protocol
    (`cimhes.drivers.concentrator`).
    """

    mrid: str
    name: str
    device_type: str
    host: str
    port: int = 4059
    client_address: int = 16
    server_address: int = 1
    security: str = "none"
    password: str | None = None
    system_title: str | None = None
    encryption_key: str | None = None
    authentication_key: str | None = None
    physical_address: str | None = None
    network_id: int | None = None

    def __post_init__(self) -> None:
        if self.physical_address is not None:
            try:
                octets = bytes.fromhex(self.physical_address)
            except (TypeError, ValueError):
                octets = b""
            if not 1 <= len(octets) <= 64:
                raise ValueError(f"device {self.mrid}: physical_address must be 1..64 octets "
                                 "as hex digits")
        if self.network_id is not None and (self.physical_address is None
                                            or not 0 <= self.network_id <= 255):
            raise ValueError(f"device {self.mrid}: network_id is 0..255, and only for a "
                             "device with a physical_address (behind a concentrator)")
        if self.security not in SECURITIES:
            raise ValueError(f"device {self.mrid}: security {self.security!r} is not one of "
                             f"{sorted(SECURITIES)}")
        if self.security == "low" and not self.password:
            raise ValueError(f"device {self.mrid}: security 'low' needs a password")
        hls = self.security == "hls-gmac"
        for name, size in (("system_title", SYSTEM_TITLE_SIZE), ("encryption_key", KEY_SIZE),
                           ("authentication_key", KEY_SIZE)):
            value = getattr(self, name)
            if value is None:
                if hls:
                    raise ValueError(f"device {self.mrid}: security 'hls-gmac' needs {name}")
                continue
            if not hls:
                raise ValueError(f"device {self.mrid}: {name} is given but security is "
                                 f"{self.security!r}, not 'hls-gmac'")
            try:
                raw = bytes.fromhex(value) if isinstance(value, str) else None
            except ValueError:
                raw = None
            # The value itself stays out of the message: it may be a key.
            if raw is None:
                raise ValueError(f"device {self.mrid}: {name} is not a hex string")
            if len(raw) != size:
                raise ValueError(f"device {self.mrid}: {name} must be {size} octets "
                                 f"({2 * size} hex digits), got {len(raw)}")

    @classmethod
    def from_inventory(cls, entry: Mapping[str, Any]) -> "DeviceAddress":
        """Build from one inventory JSON object; an unknown key is an error, not ignored."""
        known = {field.name for field in fields(cls)}
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"inventory entry has unknown keys {sorted(unknown)}")
        return cls(**entry)

    def security_keys(self) -> SecurityKeys:
        """The meter's keys as bytes (HLS-GMAC only)."""
        return SecurityKeys(bytes.fromhex(self.encryption_key),
                            bytes.fromhex(self.authentication_key))

    def __repr__(self) -> str:
        # The password and the keys stay out of logs and tracebacks.
        title = f", system_title={self.system_title!r}" if self.system_title else ""
        if self.physical_address is not None:
            title += (f", physical_address={self.physical_address!r}, "
                      f"network_id={self.network_id or 0}")
        return (f"DeviceAddress(mrid={self.mrid!r}, name={self.name!r}, "
                f"device_type={self.device_type!r}, host={self.host!r}, port={self.port}, "
                f"client_address={self.client_address}, server_address={self.server_address}, "
                f"security={self.security!r}{title})")
