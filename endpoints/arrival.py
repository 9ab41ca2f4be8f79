"""The arrival step every CIM door takes once a request is decoded: log it, then admit it.

The request is written to the request log first (`engine/request_log.py: arrived`), so a crash
before the answer leaves it "interrupted" at the next start, also when it is refused. Then it
is refused or admitted, in this order: a refusal the door already has (an operation it does not
carry out), an asynchronous request cimhes cannot honour (`async_refusal`), and the Admission's
bounds (`engine/admission.py`: devices per synchronous request, 3.1; pending requests per
caller, 3.2). An asynchronous request holds no connection, so only the caller's pending count
bounds it, not the synchronous size limit.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from cimhes.cim.message import Error
from cimhes.endpoints.async_replies import ReplyAddressPolicy, ReplySender, async_refusal
from cimhes.engine import request_log
from cimhes.engine.admission import Admission, Pass, Refused
from cimhes.engine.store import StoreRunner

log = logging.getLogger(__name__)


def within_limit(reactor, work: Deferred, seconds: float, admitted: Pass, what: str,
                 late: Callable[[], Any] = lambda: None) -> Deferred:
    """Deferred of `work`'s result, or of `late()` once `seconds` pass first (a synchronous
    request's time limit): the work goes on either way, and a failure it ends with after the
    answer was given is logged as "`what` answered late failed". The admission's pass is
    released when the work ends, not when the caller is answered."""
    answer = Deferred()

    def done(result):
        admitted.release()
        if not answer.called:
            timer.cancel()
            answer.errback(result) if isinstance(result, Failure) else answer.callback(result)
        elif isinstance(result, Failure):
            log.error("%s answered late failed: %s", what, result.getTraceback())

    timer = reactor.callLater(seconds, lambda: answer.called or answer.callback(late()))
    work.addBoth(done)
    return answer


@dataclass(frozen=True)
class Arrival:
    """A logged request: its request-log row, and either its admission's pass (release it once
    answered) or the Error refusing it."""

    logged: int
    admitted: Pass | None
    refusal: Error | None


@dataclass(frozen=True)
class ArrivalDesk:
    """What a door needs for the arrival step: the store (the request log), the Admission, and
    what decides whether an asynchronous request can be answered."""

    store: StoreRunner
    admission: Admission
    replies: ReplySender | None
    reply_addresses: ReplyAddressPolicy

    @inlineCallbacks
    def arrive(self, header, *, noun: str, verb: str, received_at: datetime,
               devices_asked: int, caller: str | None, refusal: Error | None = None):
        """Deferred[Arrival] for a request with `header`, naming `devices_asked` devices, from
        `caller` (None: the Header's UserID counts, else "anonymous"). `refusal`: the door's
        own reason to refuse it; it is still logged, and nothing is admitted."""
        logged = yield self.store.call(
            request_log.arrived, self.store.store, message_id=header.message_id,
            correlation_id=header.correlation_id, noun=noun, verb=verb, source=header.source,
            received_at=received_at, devices_asked=devices_asked)
        if refusal is None:
            refusal = async_refusal(header, self.replies, self.reply_addresses)
        if refusal is not None:
            return Arrival(logged, None, refusal)
        try:
            admitted = self.admission.admit(caller or header.user_id or "anonymous",
                                            0 if header.async_reply else devices_asked)
        except Refused as refused:
            return Arrival(logged, None, refused.error)
        return Arrival(logged, admitted, None)
