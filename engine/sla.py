"""SLA figures for a day or a month: how complete each device group's data was by the deadline,
how many intervals are still missing, and how the IEC interface's requests were answered.

What counts as "the scheduled data" is, until the engine schedules collection itself, one
interval reading type per meter, grouped by the store's device groups (EndDeviceGroup) (default: the 15-minute +A load profile, 96 intervals a UTC day);
a meter-day is complete by the deadline when every interval of that day was stored no later than
``deadline_hours`` after the day's end. Missing intervals are those not stored at all when the
report is made. Requests are those recorded in the request log (every CIM request the doors
answered), in time when answered within ``answer_seconds``; latency percentiles use the nearest
rank. Devices marked broken (engine/device_status.py) can be left out.

Everything here blocks on the database and runs on the store's thread.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import BigInteger, case, func, select, type_coerce
from sqlalchemy.orm import sessionmaker

from cimhes.engine.store import Device, ReadingRecord, RequestRecord, Store

DAY_MS = 86_400_000
DEFAULT_GROUP = "(no group)"  # where a device that belongs to no device group is counted
PROFILE_PLUS_A = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


@dataclass(frozen=True)
class SlaSettings:
    reading_type: str = PROFILE_PLUS_A
    interval_minutes: int = 15
    deadline_hours: float = 6.0
    answer_seconds: float = 60.0

    @property
    def intervals_per_day(self) -> int:
        return 1440 // self.interval_minutes


@dataclass
class GroupFigures:
    group: str
    meters: int = 0
    excluded: int = 0
    meter_days: int = 0
    complete_by_deadline: int = 0
    intervals_expected: int = 0
    intervals_missing: int = 0

    @property
    def share_complete(self) -> float | None:
        return self.complete_by_deadline / self.meter_days if self.meter_days else None


@dataclass
class RequestFigures:
    noun: str
    verb: str
    received: int = 0
    in_time: int = 0
    late: int = 0
    failed: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None


@dataclass
class DayFigures:
    day: date
    meter_days: int = 0
    complete_by_deadline: int = 0

    @property
    def share_complete(self) -> float | None:
        return self.complete_by_deadline / self.meter_days if self.meter_days else None


@dataclass
class SlaReport:
    label: str  # "2026-11-20" or "2026-11"
    start: datetime
    days: int
    settings: SlaSettings
    excluded_broken: bool
    groups: list[GroupFigures] = field(default_factory=list)
    requests: list[RequestFigures] = field(default_factory=list)
    daily: list[DayFigures] = field(default_factory=list)


def day_period(day: date) -> tuple[str, datetime, int]:
    return day.isoformat(), datetime.combine(day, time(), timezone.utc), 1


def month_period(year: int, month: int) -> tuple[str, datetime, int]:
    start = date(year, month, 1)
    following = date(year + month // 12, month % 12 + 1, 1)
    return f"{year:04d}-{month:02d}", datetime.combine(start, time(), timezone.utc), \
        (following - start).days


def nearest_rank(sorted_values: list[float], percentile: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percentile / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class SlaCalculator:
    def __init__(self, store: Store):
        self._session = sessionmaker(store.engine, expire_on_commit=False)

    def report(self, label: str, start: datetime, days: int, settings: SlaSettings,
               groups: Mapping[str, str | Sequence[str]], exclude: set[str],
               now: datetime) -> SlaReport:
        """Figures for the ``days`` UTC days from ``start``; only days already begun at ``now``
        count. ``groups`` maps mRIDs to their device group(s) (a device in two groups counts in
        both; one in none, in DEFAULT_GROUP); ``exclude`` lists mRIDs left out."""
        report = SlaReport(label, start, days, settings, excluded_broken=bool(exclude))
        start_ms = _millis(start)
        begun = max(0, min(days, math.ceil((_millis(now) - start_ms) / DAY_MS)))
        end_ms = start_ms + begun * DAY_MS
        deadline_ms = int(settings.deadline_hours * 3_600_000)
        expected = settings.intervals_per_day
        with self._session() as session:
            devices = dict(session.execute(select(Device.id, Device.mrid)).all())
            stamp = type_coerce(ReadingRecord.timestamp, BigInteger)
            read_at = type_coerce(ReadingRecord.read_at, BigInteger)
            # Interval readings are stamped with their end: a day holds (00:00, 24:00].
            bucket = (stamp - start_ms - 1) // DAY_MS
            in_time = case((read_at <= start_ms + (bucket + 1) * DAY_MS + deadline_ms, 1),
                           else_=0)
            rows = session.execute(
                select(ReadingRecord.device_id, bucket, func.count(), func.sum(in_time))
                .where(ReadingRecord.reading_type == settings.reading_type,
                       stamp > start_ms, stamp <= end_ms)
                .group_by(ReadingRecord.device_id, bucket)).all()
            stored: dict[tuple[int, int], tuple[int, int]] = {
                (device_id, int(b)): (count, int(timely or 0))
                for device_id, b, count, timely in rows}

            figures: dict[str, GroupFigures] = {}
            daily = [DayFigures(start.date() + timedelta(days=d)) for d in range(begun)]
            for device_id, mrid in sorted(devices.items(), key=lambda item: item[1]):
                names = groups.get(mrid) or (DEFAULT_GROUP,)
                names = (names,) if isinstance(names, str) else tuple(names)
                for group_index, group in enumerate(names):
                    g = figures.setdefault(group, GroupFigures(group))
                    if mrid in exclude:
                        g.excluded += 1
                        continue
                    g.meters += 1
                    for d in range(begun):
                        count, timely = stored.get((device_id, d), (0, 0))
                        g.meter_days += 1
                        g.intervals_expected += expected
                        g.intervals_missing += max(0, expected - count)
                        if group_index == 0:  # the daily line counts each meter once
                            daily[d].meter_days += 1
                        if timely >= expected:
                            g.complete_by_deadline += 1
                            if group_index == 0:
                                daily[d].complete_by_deadline += 1
            report.groups = [figures[name] for name in sorted(figures)]
            report.daily = daily
            report.requests = self._requests(session, start, start + timedelta(days=days),
                                             settings)
        return report

    @staticmethod
    def _requests(session, start: datetime, end: datetime,
                  settings: SlaSettings) -> list[RequestFigures]:
        latencies: dict[tuple[str, str], list[float]] = defaultdict(list)
        figures: dict[tuple[str, str], RequestFigures] = {}
        query = (select(RequestRecord.noun, RequestRecord.verb, RequestRecord.received_at,
                        RequestRecord.replied_at, RequestRecord.result)
                 .where(RequestRecord.received_at >= start, RequestRecord.received_at < end))
        for noun, verb, received_at, replied_at, result in session.execute(query):
            key = (noun, verb)
            f = figures.setdefault(key, RequestFigures(noun, verb))
            seconds = (replied_at - received_at).total_seconds()
            f.received += 1
            if seconds <= settings.answer_seconds:
                f.in_time += 1
            else:
                f.late += 1
            if result == "FAILED":
                f.failed += 1
            latencies[key].append(seconds * 1000)
        for key, f in figures.items():
            values = sorted(latencies[key])
            f.p50_ms, f.p90_ms, f.p99_ms = (nearest_rank(values, p) for p in (50, 90, 99))
        return [figures[key] for key in sorted(figures)]


def _millis(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 1000)
