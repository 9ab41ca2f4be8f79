"""Where a device is and who it is: one inventory entry, as the drivers need it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class DeviceAddress:
    """One entry of the inventory file's "meters" list (see the inventory format)."""

    mrid: str
    name: str
    device_type: str
    host: str
    port: int = 4059
    client_address: int = 16
    server_address: int = 1
    authentication: str = "none"  # "none" (public client, SAP 16) or "low" (LLS, SAP 1)
    password: str | None = None

    @classmethod
    def from_inventory(cls, entry: Mapping[str, Any]) -> "DeviceAddress":
        """Build from one inventory JSON object; an unknown key is an error, not ignored."""
        known = {field.name for field in fields(cls)}
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"inventory entry has unknown keys {sorted(unknown)}")
        return cls(**entry)

    def __repr__(self) -> str:
        # The password stays out of logs and tracebacks.
        return (f"DeviceAddress(mrid={self.mrid!r}, name={self.name!r}, "
                f"device_type={self.device_type!r}, host={self.host!r}, port={self.port}, "
                f"client_address={self.client_address}, server_address={self.server_address}, "
                f"authentication={self.authentication!r})")
