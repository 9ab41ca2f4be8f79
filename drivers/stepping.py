"""Driver coroutines stepped without a Deferred per exchange.

A meter read is one coroutine that awaits ~10 answers. Under `Deferred.fromCoroutine` each
answer is a Deferred, and each resumption goes through Twisted's `_inlineCallbacks` (callback
list, Failure handling, a contextvars run): about 15 us per exchange, several times what the
session's own decoding of the answer costs. `run(coroutine)` steps a driver coroutine itself:
it awaits `Answer`s, which the transport fills (`DlmsConnection.ask`), and ordinary Deferreds
(connects, the pacer, store calls), and gives one Deferred for the whole operation.

Semantics as `Deferred.fromCoroutine`: the Deferred fires with the coroutine's return value or
fails with what it raised; cancelling it cancels what the coroutine is waiting for (an Answer's
canceller aborts the connection, and the coroutine sees CancelledError there), and it fails
with CancelledError. The coroutine runs in the caller's contextvars context (the drivers use
none).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import AlreadyCalledError, CancelledError, Deferred
from twisted.python.failure import Failure


class Answer:
    """One request's outcome, awaitable by a coroutine that `run` steps: `callback(result)`
    or `errback(error)` once; `cancel()` calls the canceller (which may settle it) and else
    fails it with CancelledError. The same methods as a Deferred, for the transport."""

    __slots__ = ("called", "_result", "_error", "_resume", "_canceller")

    def __init__(self, canceller: Callable[[Answer], None] | None = None) -> None:
        self.called = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._resume: Callable[[], None] | None = None
        self._canceller = canceller

    def callback(self, result: Any) -> None:
        self._settle(result, None)

    def errback(self, error: BaseException | Failure) -> None:
        self._settle(None, error.value if isinstance(error, Failure) else error)

    def cancel(self) -> None:
        if self.called:
            return
        if self._canceller is not None:
            self._canceller(self)
        if not self.called:
            self.errback(CancelledError())

    def _settle(self, result: Any, error: BaseException | None) -> None:
        if self.called:
            raise AlreadyCalledError(f"{self!r} was settled already")
        self.called = True
        self._result, self._error = result, error
        resume, self._resume = self._resume, None
        if resume is not None:
            resume()

    def __await__(self):
        if not self.called:
            yield self
            if not self.called:
                raise RuntimeError("an Answer was resumed before it was settled: await it "
                                   "only in a coroutine stepped by cimhes.drivers.stepping.run")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._result


def run(coroutine: Coroutine[Any, Any, Any]) -> Deferred:
    """Deferred of `coroutine`'s result, the coroutine stepped here (see the module doc)."""
    return _Stepper(coroutine).done


class _Stepper:
    __slots__ = ("_coroutine", "_waiting", "done")

    def __init__(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self._coroutine = coroutine
        self._waiting: Answer | Deferred | None = None
        self.done = Deferred(self._cancel)
        self._step()

    def _step(self, value: Any = None, error: BaseException | None = None) -> None:
        while True:
            self._waiting = None
            try:
                if error is None:
                    awaited = self._coroutine.send(value)
                else:
                    awaited = self._coroutine.throw(error)
            except StopIteration as stop:
                self._end(stop.value, None)
                return
            except BaseException:
                self._end(None, Failure())
                return
            self._waiting = awaited
            if type(awaited) is Answer:
                awaited._resume = self._step
                return
            if isinstance(awaited, Deferred):
                # As Twisted steps it: the result sent in (or its error thrown in) from inside
                # the Deferred's callback; the Deferred then holds None.
                awaited.addBoth(self._resumed)
                return
            value, error = None, TypeError(f"a stepped coroutine awaited {awaited!r}, neither an Answer nor "
                              "a Deferred")

    def _resumed(self, result: Any) -> None:
        if isinstance(result, Failure):
            error = result.value
            self._step(None, error if result.tb is None else error.with_traceback(result.tb))
        else:
            self._step(result)

    def _end(self, result: Any, failure: Failure | None) -> None:
        if self.done.called:
            return  # cancelled meanwhile: the Deferred failed with CancelledError already
        if failure is not None:
            self.done.errback(failure)
        else:
            self.done.callback(result)

    def _cancel(self, _: Deferred) -> None:
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()
