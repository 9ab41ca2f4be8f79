"""CIM ReadingType: the IEC 61968-9 ed.2 18-part reading type code, parsed into named fields and printed back.

A reading type code such as ``0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0`` is eighteen dot-separated integers,
in this order (ed.2): macroPeriod, aggregate, measuringPeriod, accumulation, flowDirection, commodity,
measurementKind, interharmonic numerator, interharmonic denominator, argument numerator, argument
denominator, tou, cpp, consumptionTier, phases, multiplier, unit, currency. The code is also the reading
type's mRID.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

__all__ = ["ReadingType", "CIM_FIELD_NAMES"]

# The CIM attribute name of each part, in code order. The Python field names are the snake_case forms,
# in the same order, so that ``dataclasses.fields(ReadingType)[i]`` is part ``i``.
CIM_FIELD_NAMES: tuple[str, ...] = (
    "macroPeriod",
    "aggregate",
    "measuringPeriod",
    "accumulation",
    "flowDirection",
    "commodity",
    "measurementKind",
    "interharmonic.numerator",
    "interharmonic.denominator",
    "argument.numerator",
    "argument.denominator",
    "tou",
    "cpp",
    "consumptionTier",
    "phases",
    "multiplier",
    "unit",
    "currency",
)

# One part: an integer, optionally negative (multiplier is a power of ten, e.g. -3 for milli).
_PART = re.compile(r"-?[0-9]+")


# Length of an interval for the measuringPeriod part (IEC 61968-9 TimeAttributeKind enumeration:
# 1 tenMinute, 2 fifteenMinute, 3 oneMinute, 5 thirtyMinute, 6 fiveMinute, 7 sixtyMinute). Only
# these fixed lengths; other kinds (present, previous, fixed blocks ...) have no one length.
MEASURING_PERIOD_MINUTES: dict[int, int] = {1: 10, 2: 15, 3: 1, 5: 30, 6: 5, 7: 60}


@dataclass(frozen=True)
class ReadingType:
    """One reading type, its eighteen code parts as integers (0 = not applicable)."""

    macro_period: int = 0
    aggregate: int = 0
    measuring_period: int = 0
    accumulation: int = 0
    flow_direction: int = 0
    commodity: int = 0
    measurement_kind: int = 0
    interharmonic_numerator: int = 0
    interharmonic_denominator: int = 0
    argument_numerator: int = 0
    argument_denominator: int = 0
    tou: int = 0
    cpp: int = 0
    consumption_tier: int = 0
    phases: int = 0
    multiplier: int = 0
    unit: int = 0
    currency: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # bool is an int subclass; True as a code part is a bug in the caller, not a 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ReadingType.{field.name} must be an int, not {value!r}")

    @classmethod
    def parse(cls, code: str) -> ReadingType:
        """The reading type whose 18-part code is ``code``; ValueError saying what is wrong otherwise."""
        if not isinstance(code, str):
            raise ValueError(f"a reading type code is a string, not {type(code).__name__}")
        parts = code.split(".")
        if len(parts) != len(CIM_FIELD_NAMES):
            raise ValueError(
                f"reading type code {code!r} has {len(parts)} parts; an IEC 61968-9 ed.2 code has "
                f"{len(CIM_FIELD_NAMES)} dot-separated integers "
                f"({'.'.join(CIM_FIELD_NAMES)})"
            )
        values = []
        for position, (part, cim_name) in enumerate(zip(parts, CIM_FIELD_NAMES), start=1):
            if not _PART.fullmatch(part):
                raise ValueError(
                    f"reading type code {code!r}: part {position} ({cim_name}) is {part!r}, not an integer"
                )
            values.append(int(part))
        return cls(*values)

    @property
    def is_interval(self) -> bool:
        """Interval data (a profile), as opposed to a register's value at an instant."""
        return bool(self.measuring_period or self.macro_period)

    @property
    def interval_minutes(self) -> int | None:
        """Length of one interval in minutes, when the code fixes one (MEASURING_PERIOD_MINUTES)."""
        if self.macro_period:
            return None
        return MEASURING_PERIOD_MINUTES.get(self.measuring_period)

    @property
    def mrid(self) -> str:
        """The code, which is also the reading type's mRID."""
        return ".".join(str(getattr(self, field.name)) for field in dataclasses.fields(self))

    def __str__(self) -> str:
        return self.mrid
