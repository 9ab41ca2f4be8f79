"""The IDIS driver's fast paths for the usual profile answer (drivers/idis.py `_consecutive`,
drivers/idis_association.py `timed_rows`) give exactly what the general path gives, and leave
every unusual answer to it (gaps, rows out of order or past the window, odd values)."""
import random
from datetime import datetime, timedelta, timezone

import pytest

from cimhes.drivers import idis, idis_association
from cimhes.drivers.errors import ProtocolError
from cimhes.drivers.idis import READING_TYPE_MAP, _Answers, _interval_values
from cimhes.fixtures.cosem_objects import date_time

UTC = timezone.utc
STEP = timedelta(minutes=15)
START = datetime(2026, 11, 20, 8, 45, tzinfo=UTC)
END = START + 96 * STEP
CUMULATIVE = READING_TYPE_MAP["0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"]
DELTA = READING_TYPE_MAP["0.0.2.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0"]


def rows_from(times, values=None):
    values = values or [1000 + 7 * n for n in range(len(times))]
    return [(at, [date_time(at)[2:], value, 3]) for at, value in zip(times, values)]


def usual():
    return [START + n * STEP for n in range(97)]  # the capture before the window, then 96


def variants():
    rnd = random.Random(5)
    yield "usual", rows_from(usual())
    yield "window only", rows_from(usual()[1:])
    yield "a gap", rows_from(usual()[:40] + usual()[41:])
    shuffled = usual()
    rnd.shuffle(shuffled)
    yield "out of order", rows_from(shuffled)
    yield "one past the end", rows_from(usual() + [END + STEP])
    yield "one before", rows_from([START - STEP] + usual())
    yield "a repeated row", rows_from(usual()[:10] + usual()[9:])
    yield "a bool", rows_from(usual(), [True] + [5] * 96)
    yield "a text", rows_from(usual(), [5] * 50 + ["x"] + [5] * 46)
    yield "empty", []


def outcome(source, rows, meter_time):
    answers = _Answers(meter_time, (START, END))
    try:
        return _interval_values("m1", source.profile_obis, source, rows, 1, answers)
    except ProtocolError as error:
        return "refused", error.reason


@pytest.mark.parametrize("source", [CUMULATIVE, DELTA], ids=["cumulative", "delta"])
@pytest.mark.parametrize("meter_time", [END + timedelta(minutes=3), END - 10 * STEP],
                         ids=["clock after the window", "clock inside it"])
def test_interval_values_as_the_general_path_gives_them(source, meter_time, monkeypatch):
    taken = []
    fast_path = idis._consecutive
    monkeypatch.setattr(idis, "_consecutive",
                        lambda *args: taken.append(fast_path(*args)) or taken[-1])
    for name, rows in variants():
        fast = outcome(source, rows, meter_time)
        with monkeypatch.context() as general:
            general.setattr(idis, "_consecutive", lambda *args: None)
            assert fast == outcome(source, rows, meter_time), name
    if meter_time > END:
        assert taken[0] is not None  # the usual answer did take the fast path


def test_timed_rows_as_the_general_path_gives_them():
    captures = [[8, bytes((0, 0, 1, 0, 0, 255)), 2, 0], [3, bytes((1, 0, 1, 8, 0, 255)), 2, 0],
                [3, bytes((1, 0, 2, 8, 0, 255)), 2, 0]]
    rows = [row for _, row in rows_from(usual())]
    idis_association._ROW_TIMES.clear()
    cold = idis_association.timed_rows("m1", "1.0.99.1.0.255", captures, rows)  # general path
    warm = idis_association.timed_rows("m1", "1.0.99.1.0.255", captures, rows)  # fast path
    assert cold == warm and [at for at, _ in warm[1]] == usual()
    with pytest.raises(ProtocolError, match="does not have 3 columns"):
        idis_association.timed_rows("m1", "1.0.99.1.0.255", captures, rows + [[b"x", 1]])
    with pytest.raises(ProtocolError, match="row time"):
        idis_association.timed_rows("m1", "1.0.99.1.0.255", captures,
                                    rows + [[[1, 2], 1, 2]])
