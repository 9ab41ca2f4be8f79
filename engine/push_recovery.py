"""What the push journal cannot hold, caught up from the meters' event logs after an unclean stop.

The kernel accepts a push (TCP) before the process reads it; a process killed then takes those
bytes with it, and a meter never repeats a DataNotification it delivered. So when the push
journal says the previous process did not stop cleanly (engine/push_journal.py, its last record
is not the close mark), the head-end reads the power events back from the meters:

- T, the last committed push: the time of the journal's last done mark (else of its last entry);
- the meters: those whose pushed events were committed in the ``lookback`` (default 10 min)
  before T, most recent first, and the other meters of their feeders (inventory ``feeder``),
  at most ``max_meters`` (default 2,000; the rest are skipped, logged);
- the logs: standard (power down, power up) and power failure; the window: event times from
  T - ``lookback`` to the start of this process (the meters' clocks are the head-end's own time,
  which it sets);
- an event read is stored (``EventStore.save_events``, received by "log": once, and published
  through the outbox like any event) unless the store already holds one of the same meter, time
  and EndDeviceEventType: the power up a meter pushed and the one its log keeps are one alarm.

The reads run beside the listener, at most ``concurrency`` sessions at once (default 20, so a
storm still in progress keeps most of the process); an unreadable meter is logged by name and
counted. They go to the meters directly, not through the engine's event-fetch jobs
(engine/event_fetches.py): a concentrator's route limit does not apply to them, and a read cut by
another stop is not resumed (moving them onto ``EventFetchService.submit`` needs the same-meter,
time and type rule above where that service stores). Not covered: a meter with no committed push in the lookback and no feeder mate that
pushed (its pushes were all in the lost bytes); a push of an event that reaches the head-end
after its log copy was stored (only a meter's own retry could do that) is a second row.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import select
from twisted.internet.defer import DeferredList, DeferredSemaphore, inlineCallbacks

from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_events import read_events
from cimhes.engine.events import EventStore
from cimhes.engine.feeder_outages import NetworkPosition
from cimhes.engine.store import Device, EndDeviceEventRecord, Store, StoreRunner

log = logging.getLogger(__name__)

DEFAULT_LOOKBACK = timedelta(minutes=10)
DEFAULT_MAX_METERS = 2000
DEFAULT_CONCURRENCY = 20
LOGS = ["standard", "power failure"]


@dataclass
class RecoveryPlan:
    """Which meters are read, over which window; `skipped` past ``max_meters``."""

    mrids: list[str]
    since: datetime
    until: datetime
    skipped: int = 0


@dataclass
class RecoveryOutcome:
    meters: int = 0
    read: int = 0  # events read from the logs
    stored: int = 0  # of which new (stored and published)
    known: int = 0  # already stored under the same meter, time and type
    unreadable: list[str] = field(default_factory=list)


def plan(store: Store, last_commit: datetime, until: datetime, *,
         lookback: timedelta = DEFAULT_LOOKBACK, max_meters: int = DEFAULT_MAX_METERS) -> RecoveryPlan:
    """The meters to read (blocking: at start, or on the store thread)."""
    since = last_commit - lookback
    table = EndDeviceEventRecord
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(Device.mrid, table.details, table.read_at).join(Device, Device.id == table.device_id)
            .where(table.read_at >= since).order_by(table.read_at.desc())).all()
        latest: dict[str, None] = {}
        for mrid, details, _at in rows:
            if (details or {}).get("receivedBy") == "push":
                latest.setdefault(mrid, None)
        feeders = {feeder for (feeder,) in connection.execute(
            select(NetworkPosition.feeder).join(Device, Device.id == NetworkPosition.device_id)
            .where(Device.mrid.in_(latest), NetworkPosition.feeder.is_not(None)).distinct())}
        mates = [mrid for (mrid,) in connection.execute(
            select(Device.mrid).join(NetworkPosition, NetworkPosition.device_id == Device.id)
            .where(NetworkPosition.feeder.in_(feeders)).order_by(Device.mrid))] if feeders else []
    chosen = list(dict.fromkeys([*latest, *mates]))
    return RecoveryPlan(chosen[:max_meters], since, until, max(0, len(chosen) - max_meters))


def store_unknown(events: EventStore, store: Store, read, recorded_at: datetime) -> tuple[int, int]:
    """Store the events ``read`` that the store does not hold under the same meter, time and
    type; (stored, already known). Blocking: on the store thread, so no push batch interleaves."""
    new = without_stored(store, read)
    return events.save_events(new, "log", recorded_at) if new else 0, len(read) - len(new)


def without_stored(store: Store, read: list) -> list:
    """The events of ``read`` of which the store holds none of the same meter, time and type
    (blocking: the store thread's, before it stores them in the same serial order)."""
    if not read:
        return []
    table = EndDeviceEventRecord
    with store.engine.connect() as connection:
        held = {(mrid, at.astimezone(timezone.utc), kind) for mrid, at, kind in connection.execute(
            select(Device.mrid, table.created_at, table.event_type)
            .join(Device, Device.id == table.device_id)
            .where(Device.mrid.in_({e.device_mrid for e in read}),
                   table.created_at >= min(e.created for e in read),
                   table.created_at <= max(e.created for e in read)))}
    return [e for e in read if (e.device_mrid, e.created.astimezone(timezone.utc), e.event_type)
            not in held]


class PushRecovery:
    def __init__(self, reactor, runner: StoreRunner, events: EventStore,
                 devices: Sequence[DeviceAddress], *, limits=20.0, security=None,
                 concurrency: int = DEFAULT_CONCURRENCY, now=None):
        self._reactor = reactor
        self._runner = runner
        self._events = events
        self._devices = {d.mrid: d for d in devices}
        self._limits = limits
        self._security = security
        self._sessions = DeferredSemaphore(concurrency)
        self._now = now or (lambda: datetime.now(timezone.utc))
        self.outcome = RecoveryOutcome()
        self.counts: Counter[str] = Counter()

    @inlineCallbacks
    def run(self, chosen: RecoveryPlan):
        """Deferred[RecoveryOutcome]: the plan's meters read and their unknown events stored."""
        outcome = self.outcome
        devices = [self._devices[m] for m in chosen.mrids if m in self._devices]
        outcome.meters = len(devices)
        reads = [self._sessions.run(self._read_one, device, chosen) for device in devices]
        yield DeferredList(reads, consumeErrors=True)
        log.warning("push recovery: read %d meters' event logs for %s..%s: %d events, %d new "
                    "(stored and published), %d already stored, %d meters unreadable%s",
                    outcome.meters, chosen.since.isoformat(), chosen.until.isoformat(),
                    outcome.read, outcome.stored, outcome.known, len(outcome.unreadable),
                    f" ({', '.join(outcome.unreadable[:10])})" if outcome.unreadable else "")
        return outcome

    @inlineCallbacks
    def _read_one(self, device: DeviceAddress, chosen: RecoveryPlan):
        try:
            result = yield read_events(self._reactor, device, chosen.since, chosen.until,
                                       self._limits, None, LOGS, self._security)
        except Exception as failure:  # noqa: BLE001 (a meter that does not answer: named, logged)
            self.outcome.unreadable.append(device.mrid)
            log.warning("push recovery: %s's event logs could not be read: %s", device.mrid,
                        failure)
            return
        self.outcome.read += len(result.events)
        stored, known = yield self._runner.call(store_unknown, self._events, self._runner.store,
                                                list(result.events), self._now())
        self.outcome.stored += stored
        self.outcome.known += known
