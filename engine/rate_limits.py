"""Rate limits on controls: at most N controls of one kind per window, per user or per device group
(for example at most 10 disconnects a minute by one user, 100 a minute in one group), as
commercial head-ends offer to contain a mistaken or malicious mass disconnect.

`ControlRateLimiter` is the pure rule (a sliding window per limit and key, its memory bounded by
the limits' counts); `ControlGate` is the hook a control service calls before it starts any
device's control: it admits what the limits allow, turns the rest into 61968-100 Errors (3.2, one
per refused device, naming the limit) and audits every refusal, and it audits each device's
outcome once the control has run.
"""
from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cimhes.cim.message import Error, ErrorCode, IdKind

SCOPES = ("user", "group")
NO_GROUP = "(no group)"  # the key of devices that belong to no device group


@dataclass(frozen=True)
class ControlLimit:
    """At most ``count`` controls of kind ``control`` per ``window`` seconds, per ``scope``."""

    control: str
    scope: str
    count: int
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"a control limit's scope is one of {SCOPES}, not {self.scope!r}")
        if self.count < 1 or self.window <= 0:
            raise ValueError(f"a control limit needs count >= 1 and window > 0 ({self})")

    def __str__(self) -> str:
        return f"at most {self.count} {self.control} controls per {self.window:g} s per {self.scope}"

    _TEXT = re.compile(r"([a-z][a-z0-9-]*):(user|group):(\d+)/(\d+(?:\.\d+)?)")

    @classmethod
    def parse(cls, text: str) -> ControlLimit:
        """``KIND:SCOPE:COUNT/SECONDS``, e.g. ``disconnect:user:10/60``."""
        match = cls._TEXT.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"a control limit is KIND:user|group:COUNT/SECONDS "
                             f"(e.g. disconnect:user:10/60), not {text!r}")
        kind, scope, count, window = match.groups()
        return cls(kind, scope, int(count), float(window))

    @classmethod
    def from_config(cls, entry: dict) -> ControlLimit:
        unknown = set(entry) - {"control", "scope", "count", "window"}
        if unknown:
            raise ValueError(f"unknown keys in a control limit: {sorted(unknown)}")
        try:
            return cls(str(entry["control"]), str(entry["scope"]), int(entry["count"]),
                       float(entry.get("window", 60.0)))
        except KeyError as exc:
            raise ValueError(f"a control limit needs {exc.args[0]!r}") from None


# Documented defaults (README "Rate limits on controls"): generous for an operator, tight enough
# that a runaway script cannot disconnect a town in a minute.
DEFAULT_CONTROL_LIMITS = (
    ControlLimit("disconnect", "user", 60, 60.0),
    ControlLimit("disconnect", "group", 300, 60.0),
    ControlLimit("connect", "user", 60, 60.0),
    ControlLimit("connect", "group", 300, 60.0),
    ControlLimit("load-limit", "user", 60, 60.0),
)


@dataclass(frozen=True)
class Refusal:
    mrid: str
    limit: ControlLimit
    retry_after: float  # seconds until the limit would admit one more


class ControlRateLimiter:
    """Sliding-window counters: each (limit, key) keeps the times of its last ``count`` admitted
    controls, so memory is bounded by the limits' counts times the users and groups seen."""

    def __init__(self, limits: Iterable[ControlLimit], clock: Callable[[], float]):
        self.limits = tuple(limits)
        self._clock = clock
        self._admitted: dict[tuple[int, str], deque[float]] = {}

    def admit(self, control: str, user: str,
              devices: Sequence[tuple[str, str | None]]) -> tuple[list[str], list[Refusal]]:
        """Split ``devices`` ((mRID, group) pairs) into those admitted now (counted against every
        limit on ``control``) and those refused (with the first limit each would break)."""
        now = self._clock()
        applicable = [(i, limit) for i, limit in enumerate(self.limits)
                      if limit.control == control]
        admitted: list[str] = []
        refused: list[Refusal] = []
        for mrid, group in devices:
            windows = []
            refusal = None
            for index, limit in applicable:
                key = user if limit.scope == "user" else (group or NO_GROUP)
                window = self._admitted.setdefault((index, key), deque())
                while window and now - window[0] >= limit.window:
                    window.popleft()
                if len(window) >= limit.count:
                    refusal = Refusal(mrid, limit, limit.window - (now - window[0]))
                    break
                windows.append(window)
            if refusal is not None:
                refused.append(refusal)
                continue
            for window in windows:
                window.append(now)
            admitted.append(mrid)
        return admitted, refused


class ControlGate:
    """What a control service calls around each control request: `admit` before any device is
    touched, `record_outcome` for each device once its control has run. Both are audited."""

    def __init__(self, limiter: ControlRateLimiter, audit):
        self._limiter = limiter
        self._audit = audit  # cimhes.engine.users.AuditTrail

    def admit(self, control: str, user: str, devices: Sequence[tuple[str, str | None]], *,
              source: str | None = None,
              correlation_id: str | None = None) -> tuple[list[str], list[Error]]:
        """(mRIDs admitted, one 3.2 Error per refused device). Refusals are audited."""
        admitted, refused = self._limiter.admit(control, user, devices)
        errors = []
        for refusal in refused:
            reason = (f"{control} of EndDevice {refusal.mrid} refused: rate limit "
                      f"{refusal.limit} reached; retry in {refusal.retry_after:.0f} s")
            self._audit.record(f"control.{control}", "refused", actor=user, source=source,
                               correlation_id=correlation_id, subject=refusal.mrid,
                               detail=f"rate limit: {refusal.limit}")
            errors.append(Error(ErrorCode.CONTROL_RATE_LIMITED, reason=reason, id=refusal.mrid,
                                id_kind=IdKind.UUID, object_type="EndDevice"))
        return admitted, errors

    def record_outcome(self, control: str, user: str, mrid: str, outcome: str, *,
                       detail: str | None = None, source: str | None = None,
                       correlation_id: str | None = None):
        """Audit one device's control result (``outcome``: success or failure)."""
        return self._audit.record(f"control.{control}", outcome, actor=user, source=source,
                                  correlation_id=correlation_id, subject=mrid, detail=detail)
