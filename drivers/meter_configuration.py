"""What the head-end remembers of each meter's configuration between reads: scaler_units and
capture objects.

A full read asks a meter for the scaler_unit (attribute 3) of every register and the
capture_objects (attribute 3) of every profile it reads: 5 of a full read's 15 exchanges, whose
answers only change when the meter is reprogrammed. `ConfigurationCache` keeps them per meter
(by mRID), so later reads skip those exchanges. A meter's entry is dropped, and the next read
asks again, when:

- a read of the meter fails, or gives any error for a reading type (unit mismatch, an object
  refused, a profile that no longer captures a column): whatever went wrong may be the cache;
- a profile's rows do not match the cached capture objects (width): re-read in the same
  association (`cimhes.drivers.idis`);
- the meter says its configuration changed: an event 17/18 (firmware ready for activation /
  activated), 47 (parameters changed) or 254 (load profile cleared) of its standard event log
  reaches the store (`note_events`, called by `engine/events.py`), by push or by event-log read;
- the entry is older than `max_age` (default 24 h): a reprogramming that keeps every profile's
  width and every register's unit and raises no event is noticed within a day.
  `max_age` 0 turns the cache off (every read asks, as before).

Bounded: at most `max_meters` entries (default 100,000, a few hundred bytes each); past it the
oldest entry goes. Only well-formed answers are kept (a refused or malformed one is asked again).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_AGE = 24 * 3600.0
DEFAULT_MAX_METERS = 100_000

STANDARD_EVENT_LOG = "0.0.99.98.0.255"
# IDIS standard event log codes after which a meter's scaler_units or capture objects may differ.
CONFIGURATION_EVENTS = frozenset({17, 18, 47, 254})


@dataclass
class MeterConfiguration:
    """One meter's remembered configuration (filled as a read learns it)."""

    since: float
    scaler_units: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    captures: dict[str, list] = field(default_factory=dict)


class ConfigurationCache:
    """Per-meter scaler_units and capture objects, see the module docstring."""

    def __init__(self, max_age: float = DEFAULT_MAX_AGE, max_meters: int = DEFAULT_MAX_METERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_age < 0 or max_meters < 1:
            raise ValueError("max_age must be >= 0 and max_meters >= 1")
        self.max_age = max_age
        self.max_meters = max_meters
        self._clock = clock
        self._meters: dict[str, MeterConfiguration] = {}

    def __len__(self) -> int:
        return len(self._meters)

    def of(self, mrid: str) -> MeterConfiguration:
        """The meter's entry to read from and fill; a new, empty one when there is none, it is
        too old, or the cache is off (then it is not kept)."""
        now = self._clock()
        entry = self._meters.get(mrid)
        if entry is not None and now - entry.since < self.max_age:
            return entry
        entry = MeterConfiguration(now)
        if self.max_age > 0:
            self._meters.pop(mrid, None)
            while len(self._meters) >= self.max_meters:
                self._meters.pop(next(iter(self._meters)))
            self._meters[mrid] = entry
        return entry

    def forget(self, mrid: str) -> None:
        self._meters.pop(mrid, None)

    def clear(self) -> None:
        self._meters.clear()


def changes_configuration(device_code: str) -> bool:
    """Whether an event's device code ("<event log OBIS>:<code>") says the meter's
    configuration may have changed."""
    log_name, _, code = device_code.rpartition(":")
    return log_name == STANDARD_EVENT_LOG and code.isdigit() and int(code) in CONFIGURATION_EVENTS


# The one cache of this process (the IDIS driver reads through it).
CONFIGURATIONS = ConfigurationCache()


def note_events(events: Iterable[Any]) -> None:
    """Forget the configuration of every meter whose events say it changed (events with
    `device_mrid` and `device_code`, as `cimhes.cim.end_device_events.EndDeviceEvent`)."""
    for event in events:
        if changes_configuration(event.device_code):
            CONFIGURATIONS.forget(event.device_mrid)
