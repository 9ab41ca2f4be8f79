"""Which intervals a collection still lacks, and the window that re-reads exactly them.

Pure functions: the engine asks the store which interval timestamps it holds for a device,
reading type and window, and these work out the gaps. An interval reading is stamped with the
end of its interval, so a window (start, end] holds the boundaries b with start < b <= end on
the interval grid (multiples of the interval length since 1970, UTC), and a gap of missing
boundaries b1..bn is re-read with the window (b1 - interval, bn].
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from cimhes.cim.reading_type import ReadingType

# IEC 61968-9 TimeAttributeKind (ReadingType.measuringPeriod) -> interval length in seconds;
# only the fixed-length periods a profile is captured in.
MEASURING_PERIOD_SECONDS: dict[int, int] = {
    1: 600,     # tenMinute
    2: 900,     # fifteenMinute
    3: 60,      # oneMinute
    4: 86400,   # twentyfourHour
    5: 1800,    # thirtyMinute
    6: 300,     # fiveMinute
    7: 3600,    # sixtyMinute
    10: 120,    # twoMinute
    14: 180,    # threeMinute
    31: 1200,   # twentyMinute
}

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@functools.lru_cache(maxsize=1024)
def interval_length(reading_type: str) -> timedelta | None:
    """The interval of an interval reading type; None for a register (or an unknown period)."""
    seconds = MEASURING_PERIOD_SECONDS.get(ReadingType.parse(reading_type).measuring_period)
    return None if seconds is None else timedelta(seconds=seconds)


def expected_times(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    """The interval ends b on the grid with start < b <= end."""
    return list(_grid(start, end, step)[0])


@functools.lru_cache(maxsize=256)
def _grid(start: datetime, end: datetime, step: timedelta
          ) -> tuple[tuple[datetime, ...], frozenset[datetime]]:
    # A fleet's jobs share their windows: each grid is made once, not once per meter.
    first = _EPOCH + ((start - _EPOCH) // step + 1) * step
    times = []
    at = first
    while at <= end:
        times.append(at)
        at += step
    return tuple(times), frozenset(times)


def missing_ranges(start: datetime, end: datetime, step: timedelta,
                   present: Iterable[datetime]) -> list[tuple[datetime, datetime]]:
    """The gaps in (start, end] as re-read windows (b1 - step, bn], in time order."""
    expected, every = _grid(start, end, step)
    have = present if isinstance(present, (set, frozenset)) else set(present)
    if every <= have:
        return []  # the usual case, a complete read: one set comparison
    ranges: list[tuple[datetime, datetime]] = []
    for at in expected:
        if at in have:
            continue
        if ranges and ranges[-1][1] == at - step:
            ranges[-1] = (ranges[-1][0], at)
        else:
            ranges.append((at - step, at))
    return ranges


def span(missing: dict[str, list[tuple[datetime, datetime]]]) -> tuple[datetime, datetime] | None:
    """The one window covering every gap (a meter's profile is read in one range per session)."""
    ranges = [r for gaps in missing.values() for r in gaps]
    if not ranges:
        return None
    return min(s for s, _ in ranges), max(e for _, e in ranges)
