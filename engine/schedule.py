"""Read schedules: cron expressions on device groups, each firing one durable collection run.

A schedules file (JSON, read by `cimhes serve --schedules` and `cimhes collect`) names
schedules on device groups:

    {"schedules": [
       {"name": "daily-billing", "cron": "0 1 * * *", "group": "all",
        "reading_types": ["0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"], "window": "none",
        "deadline_hours": 6},
       {"name": "nightly-profile", "cron": "30 0 * * *", "group": "all",
        "reading_types": ["0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"], "window": "previous-day",
        "deadline_hours": 20}]}

A schedule reads `reading_types`, fetches the meters' event logs (`event_logs`: a list of log
names of drivers/idis_events.py EVENT_LOGS, or "all"; the fetches are "events" jobs,
engine/event_fetches.py), or both (one job of each kind per meter, in one run):

       {"name": "hourly-events", "cron": "5 * * * *", "group": "all", "event_logs": "all",
        "window": "previous-hour", "deadline_hours": 1}

A schedule's `group` is an EndDeviceGroup of the inventory (its name, or its mRID when it has
no name; `Store.load_inventory` keeps them in `device_group`), read from the store when a run is
made: the inventory is the one source of groups, and a meter added to a group is in its next
run. The group "all" is every device in the store. (A schedules file with its own "groups" is
refused, saying so.) `window` says what a run reads: "none"
(registers, at the meter's clock), "previous-day" (the UTC day before the fire time: yesterday's
profile) or "previous-hour". A run's deadline (fire time + `deadline_hours`) bounds its retries
and re-reads. Cron expressions are five fields, UTC, evaluated by croniter.

A run is the job request "schedule:<name>:<fire time>", created once however often it is asked
for (two engines, a restart), so `Scheduler` can simply create the latest due run of every
schedule whose deadline has not passed, on start and then every `check_interval` seconds.
In CIM terms a schedule is a MeterReadSchedule (IEC 61968-9; the draft's EndDeviceGroup,
ReadingType and TimeSchedule.recurrencePattern); docs/read-schedules.md gives the mapping
and says why schedules are configuration, not that noun.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall

from cimhes.cim.reading_type import ReadingType
from cimhes.engine.event_fetches import JOB_KIND as EVENTS_JOB
from cimhes.engine.event_fetches import checked_logs
from cimhes.engine.jobs import NewJob, Priority
from cimhes.engine.store import Device, DeviceGroup, DeviceGroupMember, Route, Store

log = logging.getLogger(__name__)

WINDOWS = ("none", "previous-day", "previous-hour")
ALL_DEVICES = "all"


@dataclass(frozen=True)
class ReadSchedule:
    name: str
    cron: str
    group: str
    reading_types: tuple[str, ...] = ()
    window: str = "none"
    deadline_hours: float = 6.0
    # Event logs to fetch over the window (their names; () = every log); None: no fetch.
    event_logs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.cron):
            raise ValueError(f"schedule {self.name}: {self.cron!r} is not a cron expression "
                             "(five fields: minute hour day month weekday)")
        if self.window not in WINDOWS:
            raise ValueError(f"schedule {self.name}: window {self.window!r} is not one of "
                             f"{list(WINDOWS)}")
        if not self.reading_types and self.event_logs is None:
            raise ValueError(f"schedule {self.name}: no reading_types and no event_logs")
        if self.event_logs is not None:
            try:
                checked_logs(self.event_logs)
            except ValueError as exc:
                raise ValueError(f"schedule {self.name}: {exc}") from None
            if self.window == "none":
                raise ValueError(f"schedule {self.name}: event_logs are fetched over a window: "
                                 'give "window": "previous-hour" or "previous-day"')
        for code in self.reading_types:
            try:
                ReadingType.parse(code)
            except ValueError as exc:
                raise ValueError(f"schedule {self.name}: {exc}") from None
        if self.deadline_hours <= 0:
            raise ValueError(f"schedule {self.name}: deadline_hours must be positive")

    def latest_fire(self, at: datetime) -> datetime:
        """The last fire time at or before `at` (UTC)."""
        after = at + timedelta(microseconds=1)
        return croniter(self.cron, after.astimezone(timezone.utc)).get_prev(datetime)

    def next_fire(self, at: datetime) -> datetime:
        return croniter(self.cron, at.astimezone(timezone.utc)).get_next(datetime)

    def window_for(self, fire: datetime) -> tuple[datetime | None, datetime | None]:
        if self.window == "previous-day":
            end = fire.replace(hour=0, minute=0, second=0, microsecond=0)
            return end - timedelta(days=1), end
        if self.window == "previous-hour":
            end = fire.replace(minute=0, second=0, microsecond=0)
            return end - timedelta(hours=1), end
        return None, None

    def deadline_for(self, fire: datetime) -> datetime:
        return fire + timedelta(hours=self.deadline_hours)

    def run_key(self, fire: datetime) -> str:
        return f"schedule:{self.name}:{fire.strftime('%Y-%m-%dT%H:%MZ')}"


@dataclass(frozen=True)
class ScheduleConfig:
    schedules: dict[str, ReadSchedule] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> ScheduleConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict) -> ScheduleConfig:
        if isinstance(data, dict) and "groups" in data:
            raise ValueError('device groups are the inventory\'s (its "groups", and each '
                             'meter\'s "groups"); a schedules file names them, it does not '
                             'define them: remove "groups"')
        if not isinstance(data, dict) or set(data) - {"schedules"}:
            raise ValueError('a schedules file is {"schedules": [...]}; '
                             f"unknown keys {sorted(set(data) - {'schedules'})}"
                             if isinstance(data, dict) else "not an object")
        known = {"name", "cron", "group", "reading_types", "window", "deadline_hours",
                 "event_logs"}
        schedules: dict[str, ReadSchedule] = {}
        for entry in data.get("schedules", []):
            unknown = set(entry) - known
            if unknown:
                raise ValueError(f"schedule {entry.get('name')!r} has unknown keys "
                                 f"{sorted(unknown)}")
            logs = entry.get("event_logs")
            if logs is not None:
                logs = () if logs == "all" else tuple(logs) if isinstance(logs, list) else logs
                if not isinstance(logs, tuple):
                    raise ValueError(f"schedule {entry.get('name')!r}: event_logs is a list of "
                                     'event log names or "all"')
            try:
                schedule = ReadSchedule(**{**entry,
                                           "reading_types": tuple(entry.get("reading_types", ())),
                                           "event_logs": logs})
            except (KeyError, TypeError) as exc:
                raise ValueError(f"schedule {entry.get('name')!r}: missing or bad {exc}") \
                    from None
            if schedule.name in schedules:
                raise ValueError(f"schedule {schedule.name} is defined twice")
            schedules[schedule.name] = schedule
        return cls(schedules)

    def schedule(self, name: str) -> ReadSchedule:
        try:
            return self.schedules[name]
        except KeyError:
            raise ValueError(f"no schedule {name!r}; known: {sorted(self.schedules)}") from None


class GroupMembers:
    """Blocking: the devices (mRID, route name or None) of an inventory group, from the store;
    ValueError for a group the inventory does not have."""

    def __init__(self, store: Store):
        self._session = sessionmaker(store.engine)

    def __call__(self, group: str) -> list[tuple[str, str | None]]:
        with self._session() as session:
            query = (select(Device.mrid, Route.name)
                     .outerjoin(Route, Route.id == Device.route_id).order_by(Device.id))
            if group != ALL_DEVICES:
                group_id = session.scalar(select(DeviceGroup.id).where(
                    (DeviceGroup.name == group) | (DeviceGroup.mrid == group)))
                if group_id is None:
                    raise ValueError(f"no EndDeviceGroup {group!r} in the inventory")
                query = query.join(DeviceGroupMember, DeviceGroupMember.device_id == Device.id
                                   ).where(DeviceGroupMember.group_id == group_id)
            return [(mrid, route) for mrid, route in session.execute(query)]


class Scheduler:
    """Creates every schedule's runs as they fall due, on the store's thread, idempotently."""

    def __init__(self, reactor, runner, dispatcher, config: ScheduleConfig, *,
                 now: Callable[[], datetime] | None = None, check_interval: float = 30.0):
        self._runner = runner
        self._dispatcher = dispatcher
        self.config = config
        self._members = GroupMembers(runner.store)
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._loop = LoopingCall(self.check)
        self._check_interval = check_interval
        self._created: set[str] = set()

    def start(self) -> None:
        self._loop.start(self._check_interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> Deferred:
        """Create the latest run of each schedule that is due and not past its deadline."""
        now = self._now()
        runs = []
        for schedule in self.config.schedules.values():
            fire = schedule.latest_fire(now)
            if schedule.deadline_for(fire) > now and schedule.run_key(fire) not in self._created:
                runs.append(self.create_run(schedule, fire))
        return gatherResults(runs, consumeErrors=True).addErrback(
            lambda failure: log.error("creating schedule runs failed: %s",
                                      failure.value.subFailure.getErrorMessage()))

    def create_run(self, schedule: ReadSchedule, fire: datetime) -> Deferred:
        """Deferred[(run key, job ids, created now)]."""
        key = schedule.run_key(fire)
        start, end = schedule.window_for(fire)
        settings = self._dispatcher.settings

        def create():
            members = self._members(schedule.group)
            jobs = [NewJob(mrid, schedule.reading_types, start, end, route=route)
                    for mrid, route in members] if schedule.reading_types else []
            # What meters pushed (or an earlier read brought) is not read again.
            jobs = self._dispatcher.jobs.narrowed_to_missing(jobs)
            if schedule.event_logs is not None:
                jobs += [NewJob(mrid, schedule.event_logs, start, end, route=route,
                                kind=EVENTS_JOB) for mrid, route in members]
            return self._dispatcher.jobs.create_request(
                key, "schedule", jobs, priority=Priority.SCHEDULED,
                max_attempts=settings.max_attempts, now=self._now(),
                deadline=schedule.deadline_for(fire), schedule=schedule.name)

        def created(result):
            ids, new = result
            self._created.add(key)
            if new:
                log.info("schedule %s: run %s created, %d jobs", schedule.name, key, len(ids))
            self._dispatcher.submitted(ids)
            return key, ids, new
        return self._runner.call(create).addCallback(created)
