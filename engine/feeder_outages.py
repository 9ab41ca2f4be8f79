"""Low-voltage network monitoring: a burst of outage alarms from one feeder becomes one summarised
feeder-outage EndDeviceEvent, and the burst of restorations that ends it one feeder-restored event.

Where the inventory says which transformer and feeder supply a meter (`"transformer"`,
`"feeder"` of a meter entry, engine/inventory.py), `Store.load_inventory` keeps them in
`network_position`. `FeederOutageDetector.detect` runs inside `EventStore.save_events`'
transaction, after the new events are inserted: when the events of that transaction include
power-down (EndDeviceEventType 3.26.38.85) or power-up (3.26.38.49) events of meters on a feeder,
it counts, in the store, the distinct meters of that feeder with such an event in the last
``window`` (by the events' own times) before the latest of them. At ``threshold`` meters or more:

- a feeder not already out gets a `feeder_event` row (kind ``outage``, its episode number, the
  first event's time, how many meters) and one outbox row: an EventMessage with one EndDeviceEvent
  of type 3.26.38.85 whose Assets mRID is the feeder's name, with EndDeviceEventDetails `feeder`,
  `transformers`, `meters`, `firstEvent`, `lastEvent`; routing key ``feeder-outage.critical.<feeder>``;
- a feeder that is out counts power-up events after its outage began, and at ``threshold``
  gets the ``restore`` row of the same episode, type 3.26.38.49, routing key
  ``feeder-restore.info.<feeder>``.

Stored once: the row's key is (feeder, kind, episode), inserted with ON CONFLICT DO NOTHING, and
the outbox row is written only when the insert took (two processes that race make one summary).
The meters' own events are stored and published as always; the summary comes in addition.
Defaults: ``threshold`` 5 meters, ``window`` 60 s (README, "Low-voltage network monitoring").
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint, delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column

from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.engine.store import Base, EndDeviceEventRecord, EpochMillis

POWER_DOWN, POWER_UP = "3.26.38.85", "3.26.38.49"
DEFAULT_THRESHOLD = 5
DEFAULT_WINDOW = timedelta(seconds=60)
NAME_LENGTH = 64


class NetworkPosition(Base):
    """Where a meter hangs on the low-voltage network (from the inventory)."""

    __tablename__ = "network_position"
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id"), primary_key=True)
    transformer: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    feeder: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)


class FeederEventRecord(Base):
    """One summarised feeder outage or restoration (episode n: the feeder's n-th outage)."""

    __tablename__ = "feeder_event"
    __table_args__ = (UniqueConstraint("feeder", "kind", "episode"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    feeder: Mapped[str] = mapped_column(String(NAME_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))  # "outage" or "restore"
    episode: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(EpochMillis())  # the burst's first event
    last_at: Mapped[datetime] = mapped_column(EpochMillis())  # the event that made the count
    meters: Mapped[int] = mapped_column(Integer)
    detected_at: Mapped[datetime] = mapped_column(EpochMillis())


@dataclass(frozen=True)
class FeederOutageSettings:
    threshold: int = DEFAULT_THRESHOLD  # distinct meters of one feeder within the window
    window: timedelta = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError("the feeder-outage threshold is at least 1 meter")
        if self.window <= timedelta(0):
            raise ValueError("the feeder-outage window is longer than 0 s")


def load_positions(session, devices: Iterable, rows: Sequence) -> None:
    """Keep each inventory device's transformer and feeder (``rows``: their Device rows, in the
    same order), replacing what an earlier inventory said; called by Store.load_inventory."""
    pairs = list(zip(devices, rows))
    if not pairs:
        return
    session.execute(delete(NetworkPosition).where(
        NetworkPosition.device_id.in_([row.id for _d, row in pairs])))
    session.add_all(NetworkPosition(device_id=row.id, transformer=device.transformer,
                                    feeder=device.feeder)
                    for device, row in pairs if device.feeder or device.transformer)


def routing_key(kind: str, feeder: str) -> str:
    word = re.sub(r"[^A-Za-z0-9_-]", "_", feeder)[:NAME_LENGTH]
    return f"feeder-outage.critical.{word}" if kind == "outage" else f"feeder-restore.info.{word}"


class FeederOutageDetector:
    def __init__(self, settings: FeederOutageSettings | None = None):
        self.settings = settings or FeederOutageSettings()

    def detect(self, session, inserted: Sequence[tuple[int, EndDeviceEvent]],
               now: datetime) -> list[EndDeviceEvent]:
        """Summaries the just-inserted ``(device id, event)`` pairs complete, each stored once
        with its outbox row in ``session``; returns the summaries made."""
        relevant = [(d, e) for d, e in inserted if e.event_type in (POWER_DOWN, POWER_UP)]
        if not relevant:
            return []
        feeders = dict(session.execute(select(NetworkPosition.device_id, NetworkPosition.feeder)
                                       .where(NetworkPosition.device_id.in_(
                                           {d for d, _e in relevant}),
                                           NetworkPosition.feeder.is_not(None))).all())
        latest: dict[tuple[str, str], datetime] = {}
        for device_id, event in relevant:
            feeder = feeders.get(device_id)
            if feeder is not None:
                key = (feeder, event.event_type)
                latest[key] = max(latest.get(key, event.created), event.created)
        made = []
        for feeder in sorted({f for f, _t in latest}):
            for kind, event_type in (("outage", POWER_DOWN), ("restore", POWER_UP)):
                if (feeder, event_type) in latest:
                    summary = self._check(session, feeder, kind, event_type,
                                          latest[(feeder, event_type)], now)
                    if summary is not None:
                        made.append(summary)
        return made

    def _check(self, session, feeder, kind, event_type, until, now):
        last = session.scalar(select(FeederEventRecord).where(FeederEventRecord.feeder == feeder)
                              .order_by(FeederEventRecord.id.desc()).limit(1))
        out = last is not None and last.kind == "outage"
        if (kind == "outage") == out:
            return None  # already out (outage), or not out (restore): nothing to summarise
        since = until - self.settings.window
        if last is not None and last.at > since:
            since = last.at  # only what came after the feeder's last change counts
        table = EndDeviceEventRecord
        meters = (select(table.device_id, func.min(table.created_at).label("first"))
                  .join(NetworkPosition, NetworkPosition.device_id == table.device_id)
                  .where(NetworkPosition.feeder == feeder, table.event_type == event_type,
                         table.created_at >= since, table.created_at <= until)
                  .group_by(table.device_id).subquery())
        count, first = session.execute(select(func.count(), func.min(meters.c.first))).one()
        if count < self.settings.threshold:
            return None
        episode = (last.episode if last is not None else 0) + (kind == "outage")
        insert = (postgresql_insert if session.bind.dialect.name == "postgresql"
                  else sqlite_insert)(FeederEventRecord.__table__)
        took = session.execute(insert.values(
            feeder=feeder, kind=kind, episode=episode, at=first, last_at=until, meters=count,
            detected_at=now).on_conflict_do_nothing(
                index_elements=["feeder", "kind", "episode"])).rowcount
        if not took:
            return None
        transformers = sorted(t for t in session.scalars(
            select(NetworkPosition.transformer).distinct().where(
                NetworkPosition.feeder == feeder, NetworkPosition.transformer.is_not(None))))
        word = "lost power" if kind == "outage" else "had power back"
        summary = EndDeviceEvent(
            feeder, first, event_type, f"feeder {kind} {episode}",
            f"feeder {feeder}: {count} meters {word} within "
            f"{self.settings.window.total_seconds():g} s",
            (("feeder", feeder), ("transformers", ",".join(transformers)),
             ("meters", str(count)), ("firstEvent", first.isoformat()),
             ("lastEvent", until.isoformat()), ("summary", f"feeder {kind}")))
        from cimhes.engine import event_outbox

        event_outbox.write(session, [summary], now, routing_key=routing_key(kind, feeder))
        return summary
