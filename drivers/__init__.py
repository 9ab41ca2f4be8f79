"""cimhes.drivers: the device gateway, one driver per device type.

`DeviceAddress` is one inventory entry (how to reach a device and who it is); `driver_for`
returns the driver registered for a device type. A driver's `read` reads a device in one
session and gives a `MeterReadResult`: the CIM `MeterReading` (`cimhes.cim.meter_readings`) and
one `DeviceError` per reading type it could not serve; or it fails with a `DeviceError` naming
the device (`cimhes.drivers.errors`).

New device support = a new driver class, registered in `DRIVERS` under its device type.
"""

from __future__ import annotations

from cimhes.drivers.address import DeviceAddress
from cimhes.drivers.idis import IdisMeterDriver, MeterReadResult

# Device type (the inventory's "device_type") -> driver. Drivers hold no per-read state.
DRIVERS = {
    "idis-meter": IdisMeterDriver(),
}


def needs_window(reading_type: str) -> bool | None:
    """Whether a driver serving `reading_type` reads it as interval data over a time window;
    None when no registered driver serves it (the caller then judges by the code's parts)."""
    for driver in DRIVERS.values():
        if driver.serves(reading_type):
            return driver.needs_window(reading_type)
    return None


def driver_for(device_type: str) -> IdisMeterDriver:
    """The driver for `device_type`; KeyError naming the known types if there is none."""
    try:
        return DRIVERS[device_type]
    except KeyError:
        raise KeyError(f"no driver for device type {device_type!r}; known: "
                       f"{sorted(DRIVERS)}") from None


__all__ = ["DeviceAddress", "DRIVERS", "driver_for", "needs_window", "IdisMeterDriver", "MeterReadResult"]
