"""Readings and events published to subscribers (MDMs) through the store's transactional outbox.

:func:`enqueue` writes one outbox row per subscriber for a message (the encoded CIM event), in one
transaction; :func:`due` lists the rows whose next attempt has come; :func:`delivered` and
:func:`failed` record the outcome of an attempt, the latter pushing the next attempt back by an
exponential backoff. Nothing is ever deleted here: a row is pending until delivered, however
long the subscriber is down, and survives restarts, since it is in the database.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from cimhes.engine.store import OutboxMessage, Store

KIND_CREATED_METER_READINGS = "CreatedMeterReadings"
KIND_CREATED_END_DEVICE_EVENTS = "CreatedEndDeviceEvents"
FIRST_RETRY = timedelta(seconds=2)
MAX_RETRY = timedelta(minutes=10)


def destination(subscriber: str) -> str:
    """The outbox destination of a subscriber named ``subscriber``."""
    return f"mdm:{subscriber}"[:32]


def event_destination(subscriber: str) -> str:
    """The outbox destination of an event subscriber (ReceiveEndDeviceEvents) ``subscriber``."""
    return f"mdm-events:{subscriber}"[:32]


@dataclass(frozen=True)
class Pending:
    id: int
    destination: str
    kind: str
    correlation_id: str | None
    payload: str
    attempts: int


def backoff(attempts: int, first: timedelta = FIRST_RETRY) -> timedelta:
    """Wait before the next attempt after ``attempts`` failed ones: 2 s, 4 s, 8 s ... <= 10 min."""
    return min(first * (2 ** max(0, attempts - 1)), MAX_RETRY)


def enqueue(store: Store, subscribers: Sequence[str], kind: str, payload: str,
            correlation_id: str | None, now: datetime) -> int:
    """One pending row per subscriber; how many were written."""
    with store._session.begin() as session:  # noqa: SLF001 (a unit of work of the store)
        for name in subscribers:
            session.add(OutboxMessage(destination=destination(name), kind=kind,
                                      correlation_id=correlation_id, payload=payload,
                                      created_at=now, attempts=0, next_attempt_at=now))
    return len(subscribers)


def due(store: Store, destinations: Sequence[str], now: datetime, limit: int = 50) -> list[Pending]:
    """Undelivered rows for ``destinations`` whose next attempt is due, oldest first."""
    with store._session() as session:  # noqa: SLF001
        rows = session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.destination.in_(destinations),
                   OutboxMessage.published_at.is_(None),
                   OutboxMessage.next_attempt_at <= now)
            .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id).limit(limit))
        return [Pending(r.id, r.destination, r.kind, r.correlation_id, r.payload, r.attempts)
                for r in rows]


def delivered(store: Store, row_id: int, now: datetime) -> None:
    with store._session.begin() as session:  # noqa: SLF001
        session.execute(update(OutboxMessage).where(OutboxMessage.id == row_id).values(
            published_at=now, attempts=OutboxMessage.attempts + 1, last_error=None))


def failed(store: Store, row_id: int, attempts_before: int, error: str, now: datetime,
           first_retry: timedelta = FIRST_RETRY) -> None:
    attempts = attempts_before + 1
    with store._session.begin() as session:  # noqa: SLF001
        session.execute(update(OutboxMessage).where(OutboxMessage.id == row_id).values(
            attempts=attempts, next_attempt_at=now + backoff(attempts, first_retry), last_error=error[:1024]))


def pending_count(store: Store, destinations: Sequence[str]) -> int:
    with store._session() as session:  # noqa: SLF001
        return len(session.scalars(select(OutboxMessage.id).where(
            OutboxMessage.destination.in_(destinations),
            OutboxMessage.published_at.is_(None))).all())
