"""The asynchronous replies this process owes, kept in `pending_reply` rows (engine/pending_replies.py)
and carried on until their ReplyAddress has taken them: one `OwedReplies` per process with doors.

An asynchronous request of any noun (MeterReadings, EndDeviceEvents, EndDeviceControls) has its
row written before the acknowledgment is sent, held by this process (`owner`) for a lease it
renews while it lives. The door then carries it on (`carry`): the work, the posts to the
ReplyAddress, and the row's settlement: sent, or a failed delivery round, after which the row is
released and retried later with backoff (`OwedReplySettings`), by whichever process takes it
first. Every `sweep_interval` each process with doors takes over (`pending_replies.claim_due`, an
atomic UPDATE ... WHERE the row is still free) the rows that are due and no live process holds:
a retry whose time has come, or a row whose holder died (SIGKILL, power loss) and whose lease has
run out; each noun's door says how to carry such a row on (`register`). So a reply is carried on
by one process at a time, and a restart (or another api process) carries on what a dead one owed.
Delivery is at least once: a reply posted but not yet marked sent when its process died is posted
again, with the same CorrelationID.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall

from cimhes.endpoints.async_replies import ReplyAddressPolicy
from cimhes.engine import pending_replies
from cimhes.engine.store import StoreRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OwedReplySettings:
    """How owed replies are held and retried (README, "Limits"; `serve --reply-*`)."""

    lease: float = 60.0           # s a process holds a reply between renewals (every lease/3)
    sweep_interval: float = 5.0   # s between looks for replies due that no live process holds
    first_retry: float = 30.0     # s after the first failed delivery round; doubled each round
    max_retry: float = 600.0      # s: the longest wait between rounds
    give_up_after: float = 86_400.0  # s after the acknowledgment: no further rounds (row kept)
    # A read request (GetMeterReadings, GetEndDeviceEvents) whose runs were interrupted this
    # many times (its process died each time) is answered FAILED 5.3 "interrupted", not re-run.
    max_interrupted: int = 2

    def __post_init__(self) -> None:
        for name in ("lease", "sweep_interval", "first_retry", "max_retry", "give_up_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"owed replies: {name} must be more than 0")
        if self.max_interrupted < 0:
            raise ValueError("owed replies: max_interrupted must be 0 or more")

    def backoff(self, attempts: int) -> float:
        """Seconds before the round after `attempts` failed ones: 30, 60, 120 ... <= max_retry."""
        return min(self.first_retry * 2 ** max(0, attempts - 1), self.max_retry)


def process_owner() -> str:
    """A name for this process as the holder of owed replies: host, pid and a random part (a
    restarted process is another holder, even with the same pid)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"[:64]


class OwedReplies:
    """The owed replies of one process: written, carried on, settled, and taken over."""

    def __init__(self, reactor, runner: StoreRunner, settings: OwedReplySettings | None = None,
                 now: Callable[[], datetime] | None = None,
                 reply_addresses: ReplyAddressPolicy | None = None):
        """``reply_addresses``: the addresses allowed now; a row taken over whose ReplyAddress
        the operator no longer allows is never called (its retries stop at once)."""
        self._reactor = reactor
        self._reply_addresses = reply_addresses
        self._runner = runner
        self.settings = settings or OwedReplySettings()
        self._now = now or (lambda: datetime.now(timezone.utc))
        self.owner = process_owner()
        # noun -> carry a row taken over on: f(PendingReply) -> Deferred[bool delivered]
        self._resumers: dict[str, Callable] = {}
        self._carrying: set[int] = set()
        self._sweeps = LoopingCall(self.sweep)
        self._renewals = LoopingCall(self._renew)

    @property
    def _lease(self) -> timedelta:
        return timedelta(seconds=self.settings.lease)

    def register(self, noun: str, resume: Callable) -> None:
        """How a `noun` row taken over is carried on: ``resume(reply)``, a Deferred of whether
        the ReplyAddress took the outcome."""
        self._resumers[noun] = resume

    def start(self) -> None:
        """Look for owed replies now (what a previous process left) and every sweep_interval."""
        self._sweeps.start(self.settings.sweep_interval, now=True).addErrback(
            lambda f: log.error("looking for owed replies stopped: %s", f.getTraceback()))
        self._renewals.start(self.settings.lease / 3, now=False).addErrback(
            lambda f: log.error("renewing owed replies stopped: %s", f.getTraceback()))
        self._reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    def stop(self):
        """Stop looking; give back what this process holds, so another takes it at once (a
        shutdown waits for that at most 2 s; not at all once the store's thread has stopped)."""
        for loop in (self._sweeps, self._renewals):
            if loop.running:
                loop.stop()
        pool = getattr(self._runner, "_pool", None)  # noqa: SLF001 (the store's thread)
        if pool is not None and not pool.started:
            return None
        released = self._runner.call(pending_replies.release, self._runner.store, self.owner)
        released.addTimeout(2.0, self._reactor)
        released.addErrback(lambda f: log.warning("owed replies not given back: %s",
                                                  f.getErrorMessage()))
        return released

    def add(self, **row) -> Deferred:
        """Deferred[int]: a new row (pending_replies.add's arguments), held by this process."""
        return self._runner.call(pending_replies.add, self._runner.store, now=self._now(),
                                 owner=self.owner, lease=self._lease, **row)

    @inlineCallbacks
    def owe(self, noun: str, header, logged: int, admitted, request_xml: str,
            work: Callable[[], Deferred]):
        """An asynchronous request's reply, owed before it is acknowledged: its row is added
        (`admitted` released if that fails), `work` carried for it (a restart re-runs the
        request from `request_xml`), and the Deferred fires once the row is stored."""
        correlation_id = header.correlation_id or header.message_id
        try:
            reply_id = yield self.add(noun=noun, request_id=logged,
                                      reply_address=header.reply_address,
                                      correlation_id=correlation_id, request_xml=request_xml,
                                      progress={})
        except BaseException:
            admitted.release()
            raise
        self.carry(reply_id, correlation_id, work)

    def carry(self, reply_id: int, correlation_id: str | None, work: Callable[[], Deferred]):
        """Run ``work()`` (Deferred[bool]: the outcome built and posted, whether the
        ReplyAddress took it) for row `reply_id`, then settle the row: sent, or a failed round
        to retry. An exception in the work counts as a failed round (logged)."""
        self._carrying.add(reply_id)
        done = maybeDeferred(work)

        def failed(failure):
            log.error("asynchronous reply %s failed: %s", correlation_id, failure.getTraceback())
            return failure.getErrorMessage() or failure.type.__name__

        done.addCallbacks(lambda delivered: True if delivered else "not taken by the "
                          "ReplyAddress (every attempt of the round failed)", failed)
        done.addCallback(self._settle, reply_id, correlation_id)
        done.addErrback(lambda f: log.error("settling asynchronous reply %s failed: %s",
                                            correlation_id, f.getTraceback()))
        done.addBoth(lambda _: self._carrying.discard(reply_id))
        return done

    @inlineCallbacks
    def _settle(self, outcome, reply_id: int, correlation_id: str | None, stop: bool = False):
        now = self._now()
        if outcome is True:
            yield self._runner.call(pending_replies.mark_sent, self._runner.store, reply_id, now)
            return
        settings = self.settings
        attempts, created_at = yield self._runner.call(pending_replies.round_of,
                                                       self._runner.store, reply_id)
        attempts += 1
        give_up = stop or (created_at is not None and (
            now - created_at).total_seconds() >= settings.give_up_after)
        retry_at = now + timedelta(seconds=settings.backoff(attempts))
        yield self._runner.call(pending_replies.delivery_failed, self._runner.store, reply_id,
                                str(outcome), now, retry_at, give_up)
        if give_up:
            log.error("asynchronous reply %s: delivery round %d failed (%s); no further "
                      "rounds are made (the row stays in pending_reply)", correlation_id,
                      attempts, outcome)
        else:
            log.warning("asynchronous reply %s: delivery round %d failed (%s); next round at %s",
                        correlation_id, attempts, outcome, retry_at.isoformat())

    def _renew(self):
        return self._runner.call(pending_replies.renew, self._runner.store, self.owner,
                                 self._now(), self._lease)

    @inlineCallbacks
    def sweep(self):
        """Take over and carry on the rows due that no live process holds."""
        if not self._resumers:
            return 0
        taken = yield self._runner.call(pending_replies.claim_due, self._runner.store,
                                        self.owner, list(self._resumers), self._now(),
                                        self._lease)
        for reply in taken:
            if reply.id in self._carrying:  # cannot happen while this process holds it
                continue
            if self._reply_addresses is not None and not self._reply_addresses.allows(
                    reply.reply_address):
                self._settle(f"ReplyAddress {reply.reply_address[:200]!r} is no longer one "
                             "the operator allows; it is not called", reply.id,
                             reply.correlation_id, stop=True)
                continue
            log.info("carrying on the asynchronous reply %s to %s (run %d, %d delivery "
                     "round(s) failed before)", reply.correlation_id, reply.reply_address,
                     reply.runs, reply.attempts)
            self.carry(reply.id, reply.correlation_id,
                       lambda reply=reply: self._resumers[reply.noun](reply))
        return len(taken)


__all__ = ["OwedReplies", "OwedReplySettings", "process_owner"]
