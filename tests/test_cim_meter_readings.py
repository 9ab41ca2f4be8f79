"""cim.meter_readings.interval_readings: the drivers' fast way to make IntervalReadings gives
the very objects the constructor gives, and checks what the constructor checks."""
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from cimhes.cim.meter_readings import IntervalReading, interval_readings

UTC = timezone.utc


def test_the_same_objects_as_the_constructor():
    start = datetime(2026, 11, 20, 8, 45, tzinfo=UTC)
    pairs = [(start + timedelta(minutes=15 * n), Decimal(n * 7 - 20).scaleb(-3)) for n in range(96)]
    made = interval_readings(iter(pairs))
    expected = [IntervalReading(at, value) for at, value in pairs]
    assert made == expected
    assert [hash(r) for r in made] == [hash(r) for r in expected]
    assert [vars(r) for r in made] == [vars(r) for r in expected]
    assert all(type(r) is IntervalReading and r.qualities == () for r in made)
    with pytest.raises(AttributeError):  # still frozen
        made[0].value = Decimal(1)


def test_other_zones_take_the_constructor_and_its_check():
    plus_one = timezone(timedelta(hours=1))
    at = datetime(2026, 11, 20, 9, 45, tzinfo=plus_one)
    made = interval_readings([(at, Decimal("1.5"))])
    assert made == [IntervalReading(at, Decimal("1.5"))]
    with pytest.raises(ValueError, match="timezone-aware"):
        interval_readings([(datetime(2026, 11, 20, 9, 45), Decimal(1))])
