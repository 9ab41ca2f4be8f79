"""Admission of CIM requests: how much one synchronous request, and one caller, may ask at once.

A synchronous request holds its caller's connection, the engine's sessions and its reply until
every device named has answered, so its size is bounded (`max_devices_per_request`): beyond it
the request is refused whole with the 61968-100 "too many items" Error (3.1), which tells the
caller to split it (or to ask asynchronously once the head-end offers it). A caller may have at
most `max_pending_per_caller` requests in progress; one more is refused with "too many pending
requests" (3.2) until an answer frees a place. Neither refusal reads any meter.

The caller is who the request comes from: the authenticated user when there is one, else the
Header's User.UserID, else the client's address (`caller_of` in the SOAP door decides).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cimhes.cim.message import Error, ErrorCode


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on requests (documented in README.md, "Limits")."""

    max_devices_per_request: int = 1000   # devices named by one synchronous request
    max_pending_per_caller: int = 8       # requests of one caller being worked on at once

    def __post_init__(self) -> None:
        for name in ("max_devices_per_request", "max_pending_per_caller"):
            if not getattr(self, name) > 0:
                raise ValueError(f"request limit {name} must be positive, "
                                 f"got {getattr(self, name)!r}")


class Refused(Exception):
    """A request refused before any work; ``error`` is the Reply.Error saying why."""

    def __init__(self, error: Error):
        super().__init__(error.reason)
        self.error = error


class Admission:
    """Admits requests within `RequestLimits` and counts each caller's pending ones."""

    def __init__(self, limits: RequestLimits | None = None):
        self.limits = limits or RequestLimits()
        self._pending: Counter[str] = Counter()

    def pending(self, caller: str) -> int:
        return self._pending[caller]

    def admit(self, caller: str, devices: int) -> Pass:
        """A pass for a request of `caller` naming `devices` devices; release it once answered.
        Raises Refused (3.1 or 3.2) when the request may not start."""
        limit = self.limits.max_devices_per_request
        if devices > limit:
            raise Refused(Error(
                code=ErrorCode.TOO_MANY_OBJECTS,
                reason=f"the request names {devices} devices; a synchronous request may name at "
                       f"most {limit}: split it into requests of at most {limit} devices (or ask "
                       "asynchronously, AsyncReplyFlag, where the head-end offers it)",
                details=f"devices={devices} limit={limit}"))
        limit = self.limits.max_pending_per_caller
        if self._pending[caller] >= limit:
            raise Refused(Error(
                code=ErrorCode.TOO_MANY_PENDING,
                reason=f"{self._pending[caller]} requests from {caller} are still being "
                       f"answered; at most {limit} may be pending at once: wait for an answer "
                       "before sending another",
                details=f"pending={self._pending[caller]} limit={limit}"))
        self._pending[caller] += 1
        return Pass(self, caller)

    def _release(self, caller: str) -> None:
        self._pending[caller] -= 1
        if self._pending[caller] <= 0:
            del self._pending[caller]


class Pass:
    """An admitted request's place in its caller's count; `release` gives it back (once)."""

    def __init__(self, admission: Admission, caller: str):
        self._admission = admission
        self.caller = caller
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self.caller)
