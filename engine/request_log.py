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

from cimhes.engine.store import RequestRecord, Store

INTERRUPTED = "interrupted"


def arrived(store: Store, *, message_id: str | None, correlation_id: str | None, noun: str,
            verb: str, source: str | None, received_at: datetime, devices_asked: int) -> int:
    """Write a request as in flight; returns its row id for `answered`."""
    with Session(store.engine) as session, session.begin():
        row = RequestRecord(message_id=message_id, correlation_id=correlation_id, noun=noun,
                            verb=verb, source=source, received_at=received_at,
                            devices_asked=devices_asked)
        session.add(row)
        session.flush()
        return row.id


def answered(store: Store, request_id: int, *, replied_at: datetime, result: str,
             devices_asked: int, devices_failed: int) -> None:
    with Session(store.engine) as session, session.begin():
        session.execute(update(RequestRecord).where(RequestRecord.id == request_id).values(
            replied_at=replied_at, result=result, devices_asked=devices_asked,
            devices_failed=devices_failed))


def mark_interrupted(store: Store) -> int:
    """Mark the synchronous requests a previous process left in flight; returns how many."""
    with Session(store.engine) as session, session.begin():
        marked = session.execute(update(RequestRecord).where(
            RequestRecord.result.is_(None), RequestRecord.reply_address.is_(None)
        ).values(result=INTERRUPTED))
        return marked.rowcount
