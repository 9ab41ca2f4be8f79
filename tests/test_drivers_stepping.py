"""cimhes.drivers.stepping: driver coroutines stepped without a Deferred per exchange behave as
under Deferred.fromCoroutine (results, errors, cancellation), for Answers and Deferreds alike."""
import asyncio

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed

from cimhes.drivers.errors import Timeout
from cimhes.drivers.stepping import Answer, run


def outcome(deferred: Deferred):
    got = []
    deferred.addBoth(got.append)
    assert got, "the Deferred has not fired"
    return got[0]


def test_answers_and_deferreds_are_awaited_in_turn():
    answers, later = [Answer(), Answer()], Deferred()

    async def work():
        first = await answers[0]
        middle = await later
        already = await succeed(5)
        return first, middle, already, await answers[1]

    done = run(work())
    assert not done.called
    answers[0].callback(1)
    later.callback(2)
    assert not done.called
    answers[1].callback(3)
    assert outcome(done) == (1, 2, 5, 3)


def test_an_error_is_raised_where_it_was_awaited_and_fails_the_whole():
    answer, failed = Answer(), Deferred()
    seen = []

    async def work():
        try:
            await answer
        except Timeout as error:
            seen.append(error)
        await failed

    done = run(work())
    answer.errback(Timeout("m1", "no answer"))
    assert [e.reason for e in seen] == ["no answer"]
    failed.errback(ValueError("bad"))
    assert outcome(done).check(ValueError)


def test_an_answer_settled_before_it_is_awaited_does_not_wait():
    answer = Answer()
    answer.callback("ready")

    async def work():
        return await answer

    assert outcome(run(work())) == "ready"


def test_cancelling_cancels_the_awaited_answer_and_cleanup_runs():
    cancelled, cleaned = [], []
    answer = Answer(canceller=cancelled.append)

    async def work():
        try:
            await answer
        finally:
            cleaned.append(True)

    done = run(work())
    done.cancel()
    assert cancelled == [answer] and cleaned == [True]
    assert outcome(done).check(CancelledError)


def test_cancelling_cancels_the_awaited_deferred():
    cancelled = []
    waiting = Deferred(cancelled.append)

    async def work():
        await waiting

    done = run(work())
    done.cancel()
    assert cancelled == [waiting]
    assert outcome(done).check(CancelledError)


def test_a_coroutine_still_busy_after_cancel_cannot_fire_twice():
    answer, cleanup = Answer(), Deferred()

    async def work():
        try:
            await answer
        finally:
            await cleanup  # e.g. recording a session's end in the store

    done = run(work())
    done.cancel()
    assert outcome(done).check(CancelledError)
    cleanup.callback(None)  # the coroutine ends now: no AlreadyCalledError


def test_awaiting_anything_else_is_a_type_error_in_the_coroutine():
    async def work():
        await asyncio.sleep(0)  # yields None: not a Twisted or stepping awaitable

    assert outcome(run(work())).check(TypeError)


def test_an_answer_under_twisted_stepping_is_refused_not_misread():
    async def work():
        return await Answer()

    assert outcome(Deferred.fromCoroutine(work())).check(RuntimeError)


def test_an_answer_is_settled_once():
    answer = Answer()
    answer.callback(1)
    with pytest.raises(Exception, match="settled already"):
        answer.errback(ValueError())
