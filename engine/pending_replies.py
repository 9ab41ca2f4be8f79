"""Asynchronous replies still owed, kept in the store so that a restart does not lose them.

An asynchronous request (Header.AsyncReplyFlag) is acknowledged at once and its outcome posted to
its ReplyAddress later: for an ExecuteEndDeviceControls request with a scheduled control, hours
later. What the door needs to build and post that outcome is a `pending_reply` row, written
before the acknowledgment is sent:

- the request element as it came (``request_xml``: the Header the reply echoes, the controls);
- ``progress`` (JSON): the outcome so far (Reply.Errors: refusals and each scheduled control's
  0.3 acknowledgment; the controls made, by their place in the request and the batch each
  became; the counts done / failed), the scheduled batches (id, due time), and the controls to
  carry out at once, each with the batch the engine stored it as once it has one (written in
  the same transaction as the batch's jobs, so a control is never stored twice);
- ``sent_at``: empty until the ReplyAddress took the outcome.

The request-log row of the request gets its ``reply_address`` in the same transaction, so a start
after a crash leaves it to the resumed reply instead of marking it "interrupted". A process that
starts finds the rows without ``sent_at`` (`unsent`) and carries each on where it stood: the
engine's control jobs are durable (engine/controls.py), so it waits for their outcomes and posts
the reply once. A reply posted but not yet marked sent when the process died is posted again by
the next (at least once; the CorrelationID is the same). The functions block: run them on the
store's thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import JSON, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from cimhes.engine.store import Base, EpochMillis, RequestRecord, Store


class PendingReplyRecord(Base):
    """One asynchronous outcome owed to a ReplyAddress."""

    __tablename__ = "pending_reply"
    id: Mapped[int] = mapped_column(primary_key=True)
    noun: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[int | None] = mapped_column(Integer)  # its `request` row (request log)
    reply_address: Mapped[str] = mapped_column(String(1024))
    correlation_id: Mapped[str | None] = mapped_column(String(256))
    request_xml: Mapped[str] = mapped_column(Text)
    progress: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(EpochMillis())
    sent_at: Mapped[datetime | None] = mapped_column(EpochMillis())


@dataclass(frozen=True)
class PendingReply:
    id: int
    request_id: int | None
    reply_address: str
    correlation_id: str | None
    request_xml: str
    progress: dict


def add(store: Store, *, noun: str, request_id: int | None, reply_address: str,
        correlation_id: str | None, request_xml: str, progress: dict,
        now: datetime) -> int:
    """Keep a reply owed; returns its id."""
    with Session(store.engine) as session, session.begin():
        row = PendingReplyRecord(noun=noun, request_id=request_id, reply_address=reply_address,
                                 correlation_id=correlation_id, request_xml=request_xml,
                                 progress=progress, created_at=now)
        session.add(row)
        if request_id is not None:
            session.execute(update(RequestRecord).where(RequestRecord.id == request_id)
                            .values(reply_address=reply_address[:1024]))
        session.flush()
        return row.id


def record_batch(session: Session, reply_id: int, index: int, batch_id: str) -> None:
    """In the transaction that stores batch `batch_id` (ControlService.execute's ``on_stored``):
    the control to carry out at once number `index` of the reply's progress is that batch."""
    row = session.get(PendingReplyRecord, reply_id)
    progress = dict(row.progress)
    immediate = [dict(item) for item in progress["immediate"]]
    immediate[index]["batch_id"] = batch_id
    progress["immediate"] = immediate
    row.progress = progress


def unsent(store: Store, noun: str) -> list[PendingReply]:
    with Session(store.engine) as session:
        rows = session.scalars(select(PendingReplyRecord).where(
            PendingReplyRecord.noun == noun, PendingReplyRecord.sent_at.is_(None))
            .order_by(PendingReplyRecord.id)).all()
        return [PendingReply(r.id, r.request_id, r.reply_address, r.correlation_id,
                             r.request_xml, dict(r.progress)) for r in rows]


def mark_sent(store: Store, reply_id: int, now: datetime) -> None:
    with Session(store.engine) as session, session.begin():
        session.execute(update(PendingReplyRecord).where(PendingReplyRecord.id == reply_id)
                        .values(sent_at=now))


__all__ = ["PendingReply", "PendingReplyRecord", "add", "mark_sent", "record_batch", "unsent"]
