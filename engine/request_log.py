"""The request log across a crash: a request is written when it arrives and completed when it is
answered, so a process killed mid-request leaves a visible row, which the next start marks
"interrupted".

Rows live in the store's `request` table (engine/store.py: RequestRecord): `result` and
`replied_at` stay empty while a request is in flight. At start, `mark_interrupted` gives every
synchronous row still in flight (no ReplyAddress: its caller's connection died with the old
process) the result "interrupted"; asynchronous ones are left to whatever resumes them. The
functions block; the reactor reaches them through `StoreRunner.call`.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from cimhes.engine.store import RequestRecord, Store, batched_unit

INTERRUPTED = "interrupted"


def _row(*, message_id: str | None, correlation_id: str | None, noun: str, verb: str,
         source: str | None, received_at: datetime, devices_asked: int) -> RequestRecord:
    return RequestRecord(message_id=message_id, correlation_id=correlation_id, noun=noun,
                         verb=verb, source=source, received_at=received_at,
                         devices_asked=devices_asked)


def _outcome(*, replied_at: datetime, result: str, devices_asked: int,
             devices_failed: int) -> dict:
    return {"replied_at": replied_at, "result": result, "devices_asked": devices_asked,
            "devices_failed": devices_failed}


def _arrived_many(units: list[tuple[tuple, dict]]) -> list[int]:
    """`arrived` for several requests queued together (StoreRunner's group commit): one
    transaction, one multi-row INSERT."""
    (store,), _ = units[0]
    rows = [_row(**fields) for (unit_store,), fields in units if unit_store is store]
    if len(rows) != len(units):
        raise ValueError("a batch of request-log rows spans two stores")
    with Session(store.engine) as session, session.begin():
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def _answered_many(units: list[tuple[tuple, dict]]) -> list[None]:
    """`answered` for several requests queued together: one transaction."""
    (store, _), _ = units[0]
    if any(unit_store is not store for (unit_store, _), _ in units):
        raise ValueError("a batch of request-log rows spans two stores")
    with Session(store.engine) as session, session.begin():
        for (_, request_id), fields in units:
            session.execute(update(RequestRecord).where(RequestRecord.id == request_id)
                            .values(**_outcome(**fields)))
    return [None] * len(units)


@batched_unit(_arrived_many)
def arrived(store: Store, **fields) -> int:
    """Write a request as in flight (message_id, correlation_id, noun, verb, source,
    received_at, devices_asked); returns its row id for `answered`. Arrivals queued together
    are written in one transaction (`batched_unit`)."""
    return _arrived_many([((store,), fields)])[0]


@batched_unit(_answered_many)
def answered(store: Store, request_id: int, **fields) -> None:
    """Complete a request's row (replied_at, result, devices_asked, devices_failed)."""
    _answered_many([((store, request_id), fields)])


def mark_interrupted(store: Store) -> int:
    """Mark the synchronous requests a previous process left in flight; returns how many."""
    with Session(store.engine) as session, session.begin():
        marked = session.execute(update(RequestRecord).where(
            RequestRecord.result.is_(None), RequestRecord.reply_address.is_(None)
        ).values(result=INTERRUPTED))
        return marked.rowcount
