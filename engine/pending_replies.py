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
from datetime import datetime, timedelta

from sqlalchemy import JSON, Integer, String, Text, or_, select, update
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
    # The process carrying it on (its `OwedReplies.owner`), until `lease_until`: another
    # process takes it over only once the lease has run out (the owner renews it while alive).
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(EpochMillis())
    # Times carried on (1: by the process that acknowledged it), and delivery rounds failed.
    runs: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(EpochMillis())
    last_error: Mapped[str | None] = mapped_column(String(1024))
    given_up_at: Mapped[datetime | None] = mapped_column(EpochMillis())  # retries stopped


@dataclass(frozen=True)
class PendingReply:
    id: int
    request_id: int | None
    reply_address: str
    correlation_id: str | None
    request_xml: str
    progress: dict
    noun: str = ""
    runs: int = 1          # times carried on, this one included
    attempts: int = 0      # delivery rounds that failed before
    created_at: datetime | None = None

    @property
    def interrupted(self) -> int:
        """How many earlier runs ended neither delivered nor failed: their process stopped."""
        return max(0, self.runs - 1 - self.attempts)


def _of(row: PendingReplyRecord) -> PendingReply:
    return PendingReply(row.id, row.request_id, row.reply_address, row.correlation_id,
                        row.request_xml, dict(row.progress), row.noun, row.runs, row.attempts,
                        row.created_at)


def add(store: Store, *, noun: str, request_id: int | None, reply_address: str,
        correlation_id: str | None, request_xml: str, progress: dict,
        now: datetime, owner: str | None = None, lease: timedelta | None = None) -> int:
    """Keep a reply owed, held by `owner` for `lease`; returns its id."""
    with Session(store.engine) as session, session.begin():
        row = PendingReplyRecord(noun=noun, request_id=request_id, reply_address=reply_address,
                                 correlation_id=correlation_id, request_xml=request_xml,
                                 progress=progress, created_at=now, owner=owner,
                                 lease_until=now + lease if owner and lease else None,
                                 runs=1, attempts=0)
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
        return [_of(r) for r in rows]


def _free(now: datetime):
    """Rows no live process holds: never held, released, or whose holder's lease ran out."""
    return or_(PendingReplyRecord.owner.is_(None), PendingReplyRecord.lease_until.is_(None),
               PendingReplyRecord.lease_until < now)


def claim_due(store: Store, owner: str, nouns, now: datetime, lease: timedelta,
              limit: int = 20) -> list[PendingReply]:
    """Take over the owed replies of `nouns` due now that no live process holds (a previous
    process's, a released one whose retry has come), for `owner` until `now + lease`. Each row
    is taken by one atomic UPDATE ... WHERE it is still free, so of several processes sharing
    the database exactly one gets it. Counts the run (`runs`)."""
    taken = []
    with Session(store.engine) as session:
        ids = session.scalars(select(PendingReplyRecord.id).where(
            PendingReplyRecord.noun.in_(list(nouns)), PendingReplyRecord.sent_at.is_(None),
            PendingReplyRecord.given_up_at.is_(None), _free(now),
            or_(PendingReplyRecord.next_attempt_at.is_(None),
                PendingReplyRecord.next_attempt_at <= now))
            .order_by(PendingReplyRecord.id).limit(limit)).all()
    for reply_id in ids:
        with Session(store.engine) as session, session.begin():
            claimed = session.execute(
                update(PendingReplyRecord)
                .where(PendingReplyRecord.id == reply_id, PendingReplyRecord.sent_at.is_(None),
                       PendingReplyRecord.given_up_at.is_(None), _free(now))
                .values(owner=owner, lease_until=now + lease,
                        runs=PendingReplyRecord.runs + 1)
                .execution_options(synchronize_session=False)).rowcount
            if claimed == 1:
                taken.append(_of(session.get(PendingReplyRecord, reply_id)))
    return taken


def renew(store: Store, owner: str, now: datetime, lease: timedelta) -> int:
    """Extend the lease of every unsent reply `owner` holds; how many."""
    with Session(store.engine) as session, session.begin():
        return session.execute(update(PendingReplyRecord).where(
            PendingReplyRecord.owner == owner, PendingReplyRecord.sent_at.is_(None))
            .values(lease_until=now + lease)
            .execution_options(synchronize_session=False)).rowcount


def mark_sent(store: Store, reply_id: int, now: datetime) -> None:
    with Session(store.engine) as session, session.begin():
        session.execute(update(PendingReplyRecord).where(PendingReplyRecord.id == reply_id)
                        .values(sent_at=now, owner=None, lease_until=None))


def delivery_failed(store: Store, reply_id: int, error: str, now: datetime,
                    retry_at: datetime, give_up: bool) -> None:
    """A delivery round failed: released, to be taken again (by any process) at `retry_at`;
    with `give_up`, retries stop (the row stays, with its last error)."""
    with Session(store.engine) as session, session.begin():
        session.execute(update(PendingReplyRecord).where(PendingReplyRecord.id == reply_id)
                        .values(owner=None, lease_until=None,
                                attempts=PendingReplyRecord.attempts + 1,
                                next_attempt_at=retry_at, last_error=error[:1024],
                                given_up_at=now if give_up else None))


def round_of(store: Store, reply_id: int) -> tuple[int, datetime]:
    """(delivery rounds failed so far, when the reply became owed) of row `reply_id`."""
    with Session(store.engine) as session:
        row = session.get(PendingReplyRecord, reply_id)
        return row.attempts, row.created_at


def release(store: Store, owner: str) -> int:
    """Give back every unsent reply `owner` holds (a process stopping cleanly), so another
    takes them at once rather than when the lease runs out."""
    with Session(store.engine) as session, session.begin():
        return session.execute(update(PendingReplyRecord).where(
            PendingReplyRecord.owner == owner, PendingReplyRecord.sent_at.is_(None))
            .values(owner=None, lease_until=None)
            .execution_options(synchronize_session=False)).rowcount


__all__ = ["PendingReply", "PendingReplyRecord", "add", "claim_due", "delivery_failed",
           "mark_sent", "record_batch", "release", "renew", "round_of", "unsent"]
