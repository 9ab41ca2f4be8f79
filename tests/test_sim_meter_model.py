"""The simulated meter's values follow the formulas of meter_model's docstring."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from cimhes.fixtures import meter_model
from cimhes.fixtures.meter_model import (
    EPOCH,
    EXPORT_TOTAL,
    IMPORT_T1,
    IMPORT_T2,
    IMPORT_TOTAL,
    meter_identity,
    profile_rows,
    register_raw,
)

UTC = timezone.utc


def brute_force_wh(k: int, at: datetime) -> tuple[int, int, int]:
    """(tariff-1 Wh, tariff-2 Wh, export Wh) by walking every interval since EPOCH: an oracle
    written from the docstring, independent of the closed form."""
    t1 = 2_000_000 + (7919 * k) % 3_000_000
    t2 = 1_000_000 + (6007 * k) % 1_500_000
    export = 10 * ((3571 * k) % 200_000)
    start = EPOCH
    while start < at:
        i = (start.hour * 60 + start.minute) // 15
        imp = 30 + (7 * k + 11 * i) % 40 + (40 if 24 <= i < 36 else 0) + (90 if 68 <= i < 88 else 0)
        exp = ((k % 5) + 1) * max(0, 400 - (i - 52) ** 2) // 8
        seconds = min(900, int((at - start).total_seconds()))
        part_imp, part_exp = imp * seconds // 900, exp * seconds // 900
        if 6 <= start.hour < 22:
            t1 += part_imp
        else:
            t2 += part_imp
        export += part_exp
        start += timedelta(minutes=15)
    return t1, t2, export


@pytest.mark.parametrize("k", [1, 2, 7, 1000])
@pytest.mark.parametrize("at", [EPOCH, datetime(2024, 1, 1, 6, 0, tzinfo=UTC),
                                datetime(2024, 1, 2, 13, 7, 41, tzinfo=UTC),
                                datetime(2024, 1, 3, 23, 59, 59, tzinfo=UTC)])
def test_registers_match_the_documented_formula(k, at):
    serial = meter_identity(k).serial
    t1, t2, export = brute_force_wh(k, at)
    assert register_raw(serial, IMPORT_T1, at) == t1
    assert register_raw(serial, IMPORT_T2, at) == t2
    assert register_raw(serial, IMPORT_TOTAL, at) == t1 + t2
    assert register_raw(serial, EXPORT_TOTAL, at) == export // 10


def test_total_is_exactly_the_sum_of_tariffs_at_any_second():
    serial = meter_identity(42).serial
    at = datetime(2025, 3, 9, 5, 59, 1, tzinfo=UTC)
    for step in range(0, 7200, 37):
        t = at + timedelta(seconds=step)
        assert register_raw(serial, IMPORT_TOTAL, t) == (
            register_raw(serial, IMPORT_T1, t) + register_raw(serial, IMPORT_T2, t))


def test_tariff_2_does_not_move_during_tariff_1_hours():
    serial = meter_identity(3).serial
    morning, evening = datetime(2024, 5, 1, 6, 0, tzinfo=UTC), datetime(2024, 5, 1, 22, 0, tzinfo=UTC)
    assert register_raw(serial, IMPORT_T2, morning) == register_raw(serial, IMPORT_T2, evening)
    assert register_raw(serial, IMPORT_T1, morning) < register_raw(serial, IMPORT_T1, evening)


def test_values_are_realistic_household_figures():
    serial = meter_identity(5).serial
    day = datetime(2024, 5, 1, tzinfo=UTC)
    used = register_raw(serial, IMPORT_TOTAL, day + timedelta(days=1)) - register_raw(serial, IMPORT_TOTAL, day)
    assert 3_000 < used < 15_000  # Wh per day
    assert 1_000_000 < register_raw(serial, IMPORT_TOTAL, day) < 2**32


def test_scaler_unit_table():
    assert meter_model.SCALER_UNIT == {
        "1.0.1.8.0.255": (0, 30), "1.0.2.8.0.255": (1, 30),
        "1.0.1.8.1.255": (0, 30), "1.0.1.8.2.255": (0, 30),
        # instantaneous: W (27), 0.1 V (35), mA (33)
        "1.0.1.7.0.255": (0, 27),
        "1.0.21.7.0.255": (0, 27), "1.0.41.7.0.255": (0, 27), "1.0.61.7.0.255": (0, 27),
        "1.0.32.7.0.255": (-1, 35), "1.0.52.7.0.255": (-1, 35), "1.0.72.7.0.255": (-1, 35),
        "1.0.31.7.0.255": (-3, 33), "1.0.51.7.0.255": (-3, 33), "1.0.71.7.0.255": (-3, 33),
    }
    assert meter_model.EXTENDED_SCALER_UNIT == {"1.0.1.6.0.255": (0, 27)}


def test_profile_rows_are_register_values_at_each_boundary():
    serial = meter_identity(9).serial
    start = datetime(2024, 2, 28, 23, 50, tzinfo=UTC)
    rows = profile_rows(serial, start, start + timedelta(hours=24))
    assert len(rows) == 96
    assert rows[0][0] == datetime(2024, 2, 29, 0, 0, tzinfo=UTC)
    for at, imported, exported in rows:
        assert imported == register_raw(serial, IMPORT_TOTAL, at)
        assert exported == register_raw(serial, EXPORT_TOTAL, at)
    assert meter_model.boundary_count(start, start + timedelta(hours=24)) == 96


def test_profile_range_is_inclusive_and_starts_at_epoch():
    serial = meter_identity(1).serial
    day = datetime(2024, 3, 1, tzinfo=UTC)
    assert len(profile_rows(serial, day, day + timedelta(days=1))) == 97
    assert profile_rows(serial, EPOCH - timedelta(days=1), EPOCH)[0][0] == EPOCH
    assert profile_rows(serial, day, day - timedelta(minutes=1)) == []


def test_meter_identity_follows_the_contract():
    meter = meter_identity(255)
    assert meter.serial == "CIMHES000255"
    assert meter.host == "127.0.2.1"
    assert meter_identity(254).host == "127.0.1.254"
    assert meter.mrid == str(uuid.uuid5(uuid.UUID("6f1e0d2c-9a53-4c1e-8f7b-4d3c2b1a0f99"), "CIMHES000255"))
    assert (meter.port, meter.password) == (4059, "12345678")


@pytest.mark.parametrize("serial", ["CIMHES000000", "CIMHES12345", "XIMHES000001", "CIMHES00000a"])
def test_unknown_serials_are_refused(serial):
    with pytest.raises(ValueError):
        register_raw(serial, IMPORT_TOTAL, datetime(2024, 5, 1, tzinfo=UTC))


def test_time_before_epoch_is_refused():
    with pytest.raises(ValueError, match="before the simulation epoch"):
        register_raw("CIMHES000001", IMPORT_TOTAL, EPOCH - timedelta(seconds=1))


def oracle_import_wh(k, i):
    return 30 + (7 * k + 11 * i) % 40 + (40 if 24 <= i < 36 else 0) + (90 if 68 <= i < 88 else 0)


@pytest.mark.parametrize("at", [datetime(2024, 3, 1, 12, 7, 30, tzinfo=UTC),
                                datetime(2024, 7, 9, 23, 59, 59, tzinfo=UTC), EPOCH])
@pytest.mark.parametrize("k", [1, 5, 333])
def test_instantaneous_values_follow_the_docstring(k, at):
    serial = meter_identity(k).serial
    n = (at.hour * 60 + at.minute) // 15
    total = 4 * oracle_import_wh(k, n)
    assert register_raw(serial, "1.0.1.7.0.255", at) == total
    phases = [register_raw(serial, obis, at) for obis in ("1.0.21.7.0.255", "1.0.41.7.0.255", "1.0.61.7.0.255")]
    assert sum(phases) == total and phases[1] == phases[2] == total // 3
    for p, (u, i, power) in enumerate(zip(("1.0.32.7.0.255", "1.0.52.7.0.255", "1.0.72.7.0.255"),
                                          ("1.0.31.7.0.255", "1.0.51.7.0.255", "1.0.71.7.0.255"), phases), 1):
        volts = register_raw(serial, u, at)
        assert volts == 2300 + (13 * k + 7 * p + 3 * n) % 41 - 20
        assert 2280 <= volts <= 2320
        assert register_raw(serial, i, at) == power * 10000 // volts


@pytest.mark.parametrize("at", [datetime(2024, 3, 1, 0, 10, tzinfo=UTC),   # nothing complete yet
                                datetime(2024, 3, 1, 2, 0, tzinfo=UTC),    # a few intervals
                                datetime(2024, 3, 1, 19, 31, tzinfo=UTC),  # past the evening peak
                                datetime(2024, 3, 17, 5, 0, tzinfo=UTC)])  # days into the month
def test_max_demand_is_the_largest_completed_interval_of_the_month(at):
    k = 4
    month = at.replace(day=1, hour=0, minute=0, second=0)
    best, when = 0, month
    cursor = month
    while cursor + timedelta(minutes=15) <= at:  # walk every completed interval: the oracle
        i = (cursor.hour * 60 + cursor.minute) // 15
        demand = 4 * oracle_import_wh(k, i)
        if demand > best:
            best, when = demand, cursor + timedelta(minutes=15)
        cursor += timedelta(minutes=15)
    assert meter_model.max_demand(meter_identity(k).serial, at) == (best, when)


def test_daily_and_billing_rows_are_register_values_at_midnights_and_month_starts():
    serial = meter_identity(6).serial
    end = datetime(2024, 5, 3, 12, 0, tzinfo=UTC)
    daily = meter_model.daily_rows(serial, datetime(2024, 4, 29, 0, 0, 1, tzinfo=UTC), end)
    assert [row[0].day for row in daily] == [30, 1, 2, 3]
    monthly = meter_model.billing_rows(serial, datetime(2023, 6, 1, tzinfo=UTC), end)
    assert [row[0].month for row in monthly] == [1, 2, 3, 4, 5]  # nothing before EPOCH
    for at, *values in daily + monthly:
        assert at.hour == at.minute == 0
        assert values == [register_raw(serial, obis, at) for obis in meter_model.BILLING_REGISTERS]
