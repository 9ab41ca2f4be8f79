"""The reading catalogue of the IDIS meter driver: every CIM ReadingType it serves and where it lives.

`READING_TYPE_MAP` is the one table: ReadingType mRID (IEC 61968-9 ed.2, 18 parts) -> `CosemSource`
(COSEM class, object, attribute, the profile and column for interval data, how the value is
derived, and the source of the mapping). `docs/reading-types.md` prints the same table for
integrators and `GET /cim/reading-types` serves it; tests check both against this one.

Code parts used (IEC 61968-9 ed.2 Annex C enumerations; the 15-minute and daily deltaData codes
and the bulk +A code also appear, spelled out by name, in a third-party GetMeterReadings reply,
../shared/reference/iec61968-samples/connexo_GetMeterReadings_reply_*.xml):
macroPeriod 8 billingPeriod, 11 daily, 13 monthly; aggregate 8 maximum; measuringPeriod
2 fifteenMinute; accumulation 1 bulkQuantity, 4 deltaData, 6 indicating, 12 instantaneous;
flowDirection 1 forward, 19 reverse; commodity 1 electricitySecondaryMetered; measurementKind
4 current, 8 demand, 12 energy, 37 power, 43 switchPosition, 54 voltage; tou 1/2 = tariff;
phases 128 A, 64 B, 32 C, 129 AN, 65 BN, 33 CN; multiplier 3 = k; unit 5 A, 29 V, 38 W, 72 Wh.

COSEM objects (OBIS per DLMS UA Blue Book value groups and the IDIS companion specification, as
collected in ../shared/design/REFERENCE-FACTS.md "Common IDIS / COSEM objects"): energy registers
1.0.{1,2}.8.{0,1,2}.255 (class 3), instantaneous values C.7 (class 3), maximum demand 1.0.1.6.0.255
(class 4), disconnect control 0.0.96.3.10.255 (class 70), load profile 1 1.0.99.1.0.255 and load
profile 2 (daily) 1.0.99.2.0.255, billing profile 0.0.98.1.0.255 (class 7).

Not served: a power quality profile. IDIS specifies power quality through its power quality event
log (0.0.99.98.4.255) and the instantaneous values, not a profile of averages (the profile some
head-ends read, 0.1.94.31.6.255, is DSMR's, not IDIS's).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

REGISTER_CLASS = 3
EXTENDED_REGISTER_CLASS = 4
PROFILE_GENERIC_CLASS = 7
DISCONNECT_CONTROL_CLASS = 70

# DLMS unit enumeration (Blue Book, class 3 scaler_unit).
W, A, V, WH = 27, 33, 35, 30

LOAD_PROFILE = "1.0.99.1.0.255"
DAILY_PROFILE = "1.0.99.2.0.255"
BILLING_PROFILE = "0.0.98.1.0.255"
DISCONNECT_CONTROL = "0.0.96.3.10.255"


class Period(enum.Enum):
    """How often a profile captures a row (UTC; the project's meters keep UTC)."""

    QUARTER_HOUR = "15 minutes"
    DAY = "day, at 00:00"
    MONTH = "month, at 00:00 on the 1st"

    def floor(self, at: datetime) -> datetime:
        """The latest capture instant <= at."""
        at = at.astimezone(timezone.utc)
        if self is Period.QUARTER_HOUR:
            return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)
        if self is Period.DAY:
            return at.replace(hour=0, minute=0, second=0, microsecond=0)
        return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)

    def next(self, at: datetime) -> datetime:
        """The capture instant after capture instant `at`."""
        if self is Period.QUARTER_HOUR:
            return at + timedelta(minutes=15)
        if self is Period.DAY:
            return at + timedelta(days=1)
        return at.replace(year=at.year + 1, month=1) if at.month == 12 else at.replace(month=at.month + 1)

    def previous(self, at: datetime) -> datetime:
        """The capture instant before capture instant `at`."""
        if self is Period.MONTH:
            return self.floor(at - timedelta(days=1))
        return at - (timedelta(minutes=15) if self is Period.QUARTER_HOUR else timedelta(days=1))

    def instants(self, start: datetime, end: datetime, include_start: bool = False) -> list[datetime]:
        """Capture instants t with start < t <= end (start <= t with include_start)."""
        at = self.floor(start)
        if at < start or (at == start and not include_start):
            at = self.next(at)
        found = []
        while at <= end:
            found.append(at)
            at = self.next(at)
        return found


class Derivation(enum.Enum):
    """How the CIM value comes from the COSEM value."""

    VALUE = "the attribute's value, scaled by the object's scaler_unit"
    CUMULATIVE = "the column's value in each row, scaled: the register as captured"
    DELTA = "the column's value in a row minus that of the row before it (deltaData), scaled"
    STATE = "the enumerated value as it stands (no scaler)"


@dataclass(frozen=True)
class CosemSource:
    """Where one CIM reading type comes from in an IDIS meter.

    class_id / obis / attribute: the COSEM attribute holding the value; for interval types, the
        attribute captured as a column of `profile_obis`, whose scaler_unit (attribute 3 of the
        same object) scales it.
    profile_obis / period: for interval types, the profile generic (class 7) read by range and how
        often it captures a row.
    derivation: see `Derivation`.
    unit: the DLMS unit the object's scaler_unit must report (None for a state: no scaler_unit).
    cim_multiplier: the reading type's power-of-ten multiplier, divided out.
    history_profile: for register types, the profile whose rows keep the register's past values;
        a window wholly before the meter's clock is answered from it (the billing values captured
        in the window), never with the present value.
    timestamp_attribute: an attribute of the same object giving the value's time (class 4
        capture_time); None: the meter's clock (registers) or the row's time (profiles).
    source: where the mapping comes from.
    """

    meaning: str
    class_id: int
    obis: str
    source: str
    attribute: int = 2
    profile_obis: str | None = None
    period: Period | None = None
    derivation: Derivation = Derivation.VALUE
    unit: int | None = WH
    cim_multiplier: int = 3
    history_profile: str | None = None
    timestamp_attribute: int | None = None

    @property
    def is_interval(self) -> bool:
        return self.profile_obis is not None


_ENERGY = "Blue Book OBIS C=1/2 (+A/-A), D=8 time integral 1, E tariff; IDIS CS energy registers"
_LP1 = "IDIS CS load profile 1 (1.0.99.1.0.255), 15-minute capture of 1.8.0 and 2.8.0"
_LP2 = "IDIS CS load profile 2 (1.0.99.2.0.255), daily capture of the energy registers"
_BILLING = "IDIS CS billing profile (0.0.98.1.0.255), monthly billing values"
_INSTANT = "Blue Book OBIS D=7 instantaneous value; C=32/52/72 U L1-L3, 31/51/71 I, 21/41/61 +P, 1 sum +P"


def _register(meaning: str, obis: str, history: str | None = DAILY_PROFILE) -> CosemSource:
    return CosemSource(meaning, REGISTER_CLASS, obis, _ENERGY, history_profile=history)


def _column(meaning: str, obis: str, profile: str, period: Period, derivation: Derivation,
            source: str) -> CosemSource:
    return CosemSource(meaning, REGISTER_CLASS, obis, source, profile_obis=profile, period=period,
                       derivation=derivation)


def _instant(meaning: str, obis: str, unit: int) -> CosemSource:
    return CosemSource(meaning, REGISTER_CLASS, obis, _INSTANT, unit=unit, cim_multiplier=0)


_Q, _D, _M = Period.QUARTER_HOUR, Period.DAY, Period.MONTH
_CUM, _DELTA = Derivation.CUMULATIVE, Derivation.DELTA

READING_TYPE_MAP: dict[str, CosemSource] = {
    # Registers: the value now; a window wholly in the past gives the daily billing values in it.
    "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": _register("+A active energy import total, kWh", "1.0.1.8.0.255"),
    "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": _register("-A active energy export total, kWh", "1.0.2.8.0.255"),
    "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0": _register("+A import tariff 1, kWh", "1.0.1.8.1.255"),
    "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0": _register("+A import tariff 2, kWh", "1.0.1.8.2.255"),
    # 15-minute load profile: the register at each quarter hour, and the energy of each interval.
    "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "+A, 15-minute load profile, register value at each interval end, kWh", "1.0.1.8.0.255",
        LOAD_PROFILE, _Q, _CUM, _LP1),
    "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "-A, 15-minute load profile, register value at each interval end, kWh", "1.0.2.8.0.255",
        LOAD_PROFILE, _Q, _CUM, _LP1),
    "0.0.2.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "+A energy per 15-minute interval (deltaData), kWh", "1.0.1.8.0.255",
        LOAD_PROFILE, _Q, _DELTA, _LP1),
    "0.0.2.4.19.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "-A energy per 15-minute interval (deltaData), kWh", "1.0.2.8.0.255",
        LOAD_PROFILE, _Q, _DELTA, _LP1),
    # Daily billing values (load profile 2), captured at 00:00.
    "11.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "+A daily billing value (register at 00:00), kWh", "1.0.1.8.0.255", DAILY_PROFILE, _D, _CUM, _LP2),
    "11.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0": _column(
        "+A tariff 1 daily billing value, kWh", "1.0.1.8.1.255", DAILY_PROFILE, _D, _CUM, _LP2),
    "11.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0": _column(
        "+A tariff 2 daily billing value, kWh", "1.0.1.8.2.255", DAILY_PROFILE, _D, _CUM, _LP2),
    "11.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "-A daily billing value, kWh", "1.0.2.8.0.255", DAILY_PROFILE, _D, _CUM, _LP2),
    "11.0.0.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "+A energy per day (deltaData), kWh", "1.0.1.8.0.255", DAILY_PROFILE, _D, _DELTA, _LP2),
    "11.0.0.4.19.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "-A energy per day (deltaData), kWh", "1.0.2.8.0.255", DAILY_PROFILE, _D, _DELTA, _LP2),
    # Monthly billing values (billing profile), captured at 00:00 on the 1st.
    "13.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "+A monthly billing value, kWh", "1.0.1.8.0.255", BILLING_PROFILE, _M, _CUM, _BILLING),
    "13.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0": _column(
        "+A tariff 1 monthly billing value, kWh", "1.0.1.8.1.255", BILLING_PROFILE, _M, _CUM, _BILLING),
    "13.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0": _column(
        "+A tariff 2 monthly billing value, kWh", "1.0.1.8.2.255", BILLING_PROFILE, _M, _CUM, _BILLING),
    "13.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "-A monthly billing value, kWh", "1.0.2.8.0.255", BILLING_PROFILE, _M, _CUM, _BILLING),
    "13.0.0.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0": _column(
        "+A energy per month (deltaData), kWh", "1.0.1.8.0.255", BILLING_PROFILE, _M, _DELTA, _BILLING),
    # Maximum demand of the billing period, stamped with the time it was reached.
    "8.8.2.6.1.1.8.0.0.0.0.0.0.0.0.3.38.0": CosemSource(
        "+A maximum 15-minute demand of the billing period, kW, at its capture_time",
        EXTENDED_REGISTER_CLASS, "1.0.1.6.0.255",
        "Blue Book OBIS C=1 D=6 maximum demand, class 4 extended register (capture_time attr 5)",
        unit=W, timestamp_attribute=5),
    # Instantaneous values per phase.
    "0.0.0.12.0.1.54.0.0.0.0.0.0.0.129.0.29.0": _instant("voltage L1-N, V", "1.0.32.7.0.255", V),
    "0.0.0.12.0.1.54.0.0.0.0.0.0.0.65.0.29.0": _instant("voltage L2-N, V", "1.0.52.7.0.255", V),
    "0.0.0.12.0.1.54.0.0.0.0.0.0.0.33.0.29.0": _instant("voltage L3-N, V", "1.0.72.7.0.255", V),
    "0.0.0.12.0.1.4.0.0.0.0.0.0.0.128.0.5.0": _instant("current L1, A", "1.0.31.7.0.255", A),
    "0.0.0.12.0.1.4.0.0.0.0.0.0.0.64.0.5.0": _instant("current L2, A", "1.0.51.7.0.255", A),
    "0.0.0.12.0.1.4.0.0.0.0.0.0.0.32.0.5.0": _instant("current L3, A", "1.0.71.7.0.255", A),
    "0.0.0.12.1.1.37.0.0.0.0.0.0.0.128.0.38.0": _instant("active power import L1, W", "1.0.21.7.0.255", W),
    "0.0.0.12.1.1.37.0.0.0.0.0.0.0.64.0.38.0": _instant("active power import L2, W", "1.0.41.7.0.255", W),
    "0.0.0.12.1.1.37.0.0.0.0.0.0.0.32.0.38.0": _instant("active power import L3, W", "1.0.61.7.0.255", W),
    "0.0.0.12.1.1.37.0.0.0.0.0.0.0.0.0.38.0": _instant("active power import, all phases, W", "1.0.1.7.0.255", W),
    # The disconnector: control_state 0 disconnected, 1 connected, 2 ready for reconnection.
    "0.0.0.6.0.1.43.0.0.0.0.0.0.0.0.0.0.0": CosemSource(
        "disconnector control_state (0 disconnected, 1 connected, 2 ready for reconnection)",
        DISCONNECT_CONTROL_CLASS, DISCONNECT_CONTROL,
        "Blue Book disconnect control class 70 attribute 3; REFERENCE-FACTS.md 0.0.96.3.10.255",
        attribute=3, derivation=Derivation.STATE, unit=None, cim_multiplier=0),
}

# What an empty ReadingType list asks for (GetMeterReadings with no ReadingType): the energy
# registers and the 15-minute profile, as the head-end has always served by default.
DEFAULT_READING_TYPES: tuple[str, ...] = (
    "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0",
    "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0",
    "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0",
    "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0",
    "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0",
    "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0",
)

# The period of each profile the table reads.
PROFILE_PERIODS: dict[str, Period] = {LOAD_PROFILE: Period.QUARTER_HOUR, DAILY_PROFILE: Period.DAY,
                                      BILLING_PROFILE: Period.MONTH}
