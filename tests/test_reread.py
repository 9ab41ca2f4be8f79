"""The gaps of a read window on its interval grid (engine/reread.py), which decide whether a
job is done or re-read: a complete read, a partial one, times off the grid, a window not on it."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cimhes.engine.reread import expected_times, missing_ranges

UTC = timezone.utc
Q = timedelta(minutes=15)
START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
END = START + 8 * Q


def test_a_complete_read_has_no_gap_whatever_else_it_holds():
    grid = expected_times(START, END, Q)
    assert grid == [START + n * Q for n in range(1, 9)]
    assert missing_ranges(START, END, Q, grid) == []
    assert missing_ranges(START, END, Q, set(grid) | {START + 7 * Q / 2}) == []  # off the grid
    assert missing_ranges(START, END, Q, iter(grid)) == []


def test_gaps_become_re_read_windows_in_time_order():
    present = [START + n * Q for n in (1, 2, 5, 8)]
    expected = [(START + 2 * Q, START + 4 * Q), (START + 5 * Q, START + 7 * Q)]
    assert missing_ranges(START, END, Q, present) == expected
    assert missing_ranges(START, END, Q, set(present)) == expected
    assert missing_ranges(START, END, Q, frozenset()) == [(START, END)]
    # Times off the grid do not fill a gap.
    assert missing_ranges(START, END, Q, [t + timedelta(minutes=1) for t in present]) == \
        [(START, END)]


def test_a_window_off_the_grid_covers_the_boundaries_inside_it():
    start = START + timedelta(minutes=7)
    assert expected_times(start, END, Q)[0] == START + Q
    assert missing_ranges(start, START + 2 * Q + timedelta(minutes=1), Q, [START + Q]) == \
        [(START + Q, START + 2 * Q)]
    # The cached grid is not changed by its users.
    expected_times(START, END, Q).clear()
    assert len(expected_times(START, END, Q)) == 8
