"""GetEndDeviceEvents answered: the meters a request names, their stored events filtered by
EndDeviceEventType and period, optionally read from the meters' event logs first.

:class:`EventRequestService` is what the SOAP door calls:

1. expands the request's Meters (by mRID or name; an unknown one, or one whose mRID and Names
   name different devices, is an Error 2.4 naming it) and EndDeviceGroups (each into its
   members; an unknown group is 2.4 ``unknown-group``) into the inventory's devices;
2. with Request.Option ``DataSource=meter``, reads those devices' event logs over the period
   as the engine's on-demand "events" jobs (``engine/event_fetches.py`` EventFetchService: under
   the dispatcher's bounds, per-device Errors), which store what is new, each event once however
   it arrived (a log read and a push are one row);
3. answers from the store (``end_device_event``): the events of those devices with
   start <= createdDateTime <= end whose EndDeviceEventType matches one of the request's
   patterns (``*`` for any part), oldest first, counted first and fetched one message's worth at a
   time (:meth:`EventRequestService.page`), so an answer in many parts never holds them all.

Limits (``EventRequestLimits``): events per message (past it the answer is split into parts) and
events per request (past it the request is refused, 3.1, naming the count, before any part is
built).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from twisted.internet.defer import inlineCallbacks

from cimhes.cim.end_device_events import (
    EndDeviceEvent,
    EventSource,
    GetEndDeviceEvents,
    event_type_matches,
)
from cimhes.cim.message import Error, ErrorCode, ReplyResult
from cimhes.cim.meter_readings import DeviceRef
from cimhes.engine.event_fetches import EventFetchService
from cimhes.engine.events import event_of_record
from cimhes.engine.store import Device, EndDeviceEventRecord, Store, StoreRunner
from cimhes.engine.usage_points import group_members


@dataclass(frozen=True)
class EventRequestLimits:
    """Bounds on GetEndDeviceEvents (defaults documented in README, "Limits" and docs/events.md).

    ``max_events_per_message``: past it the answer is split into parts (Header.Property
    MessageIndex/MessageCount, Error 0.1; Request.Option Page=N asks for part N);
    ``max_events_per_request``: past it the request is refused with 3.1 (too many items);
    ``sync_time_limit``: seconds a synchronous answer may take (a DataSource=meter read); past
    it the reply is FAILED 4.1 while the logs are still read and stored."""

    max_events_per_message: int = 5_000
    max_events_per_request: int = 200_000
    sync_time_limit: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_events_per_message", "max_events_per_request", "sync_time_limit"):
            if not getattr(self, name) > 0:
                raise ValueError(f"event request limit {name} must be positive")


@dataclass(frozen=True)
class Selection:
    """Which stored events answer a request: devices (mRIDs), type patterns, period."""

    mrids: tuple[str, ...]
    event_types: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None


@dataclass
class EventOutcome:
    """What a request selected: the events' count (fetched per part by `page`), the Errors."""

    selection: Selection | None = None
    total: int = 0
    parts: int = 1
    errors: list[Error] = field(default_factory=list)
    devices_asked: int = 0
    devices_failed: int = 0
    logs_unread: int = 0  # devices of the selection whose logs could not be read

    @property
    def result(self) -> ReplyResult:
        """OK without Errors; PARTIAL when some device was served despite them; else FAILED."""
        if not self.errors:
            return ReplyResult.OK
        served = self.selection is not None and (
            self.total > 0 or len(self.selection.mrids) > self.logs_unread)
        return ReplyResult.PARTIAL if served else ReplyResult.FAILED


def _where(selection: Selection):
    table = EndDeviceEventRecord
    conditions = [Device.mrid.in_(selection.mrids)]
    if selection.start is not None:
        conditions.append(table.created_at >= selection.start)
    if selection.end is not None:
        conditions.append(table.created_at <= selection.end)
    patterns = [p for p in selection.event_types]
    if patterns and "*.*.*.*" not in patterns:
        # Every part of a code is a number, so '*' (one whole part) is LIKE's '%' between the
        # same three dots; exact codes compare equal.
        conditions.append(or_(*(table.event_type.like(p.replace("*", "%")) if "*" in p
                                else table.event_type == p for p in patterns)))
    return and_(*conditions)


def count_events(store: Store, selection: Selection) -> int:
    """How many stored events the selection holds (blocking; on the store's thread)."""
    table = EndDeviceEventRecord
    with store._session() as session:  # noqa: SLF001 (a unit of work on the store's thread)
        return session.scalar(select(func.count(table.id))
                              .join(Device, Device.id == table.device_id)
                              .where(_where(selection)))


def stored_events(store: Store, selection: Selection, offset: int, limit: int,
                  ) -> list[EndDeviceEvent]:
    """The selection's events ``offset`` .. ``offset + limit``, oldest first (by time, then as
    stored), each of the device it belongs to."""
    table = EndDeviceEventRecord
    with store._session() as session:  # noqa: SLF001
        rows = session.execute(
            select(table, Device.mrid).join(Device, Device.id == table.device_id)
            .where(_where(selection)).order_by(table.created_at, table.id)
            .offset(offset).limit(limit)).all()
        events = [event_of_record(record, mrid)[0] for record, mrid in rows]
    # LIKE's '%' is checked exactly here (a defence; every stored code has four numeric parts).
    return [e for e in events if not selection.event_types
            or any(event_type_matches(p, e.event_type) for p in selection.event_types)]


class EventRequestService:
    """Serves GetEndDeviceEvents: expands meters and groups, reads logs on request, counts and
    pages the stored answer."""

    def __init__(self, runner: StoreRunner, reader: EventFetchService,
                 resolve: Callable, limits: EventRequestLimits | None = None):
        """``resolve(refs, outcome)``: the inventory's device per DeviceRef, with a 2.4 Error in
        the outcome per unknown or contradictory one (MeterReadingService.resolve)."""
        self._runner = runner
        self._reader = reader
        self._resolve = resolve
        self.limits = limits or EventRequestLimits()

    @inlineCallbacks
    def select(self, request: GetEndDeviceEvents):
        """Deferred[EventOutcome] of ``request`` (logs read first with DataSource=meter)."""
        outcome = EventOutcome()
        refs = list(request.meters)
        if request.end_device_groups:
            keys = [g.mrid or g.names[0].name for g in request.end_device_groups]
            members = yield self._runner.call(group_members, self._runner.store, keys)
            for ref, key in zip(request.end_device_groups, keys):
                if key not in members:
                    outcome.errors.append(Error(
                        code=ErrorCode.UNKNOWN_GROUP, reason=f"EndDeviceGroup {key} is not known",
                        id=key, id_kind="uuid" if ref.mrid else "name",
                        object_type="EndDeviceGroup"))
                refs.extend(DeviceRef(mrid=mrid) for mrid in members.get(key, ()))
        found = yield self._resolve(refs, outcome)
        devices, seen = [], set()
        for device in found:
            if device is not None and device.mrid not in seen:
                seen.add(device.mrid)
                devices.append(device)
        outcome.devices_asked = len(devices) + outcome.devices_failed
        if request.source is EventSource.METER and devices:
            if request.start is None:
                outcome.errors.append(Error(
                    code=ErrorCode.TIME_WINDOW_MISSING,
                    reason="DataSource=meter reads the meters' event logs over a period: give "
                           "Request StartTime or TimeSchedule/scheduleInterval/start"))
                return outcome
            read = yield self._reader.read(devices, request.start, request.end)
            outcome.logs_unread = len({e.id for e in read.errors})
            outcome.devices_failed += outcome.logs_unread
            outcome.errors.extend(read.errors)
        outcome.selection = Selection(tuple(d.mrid for d in devices), request.event_types,
                                      request.start, request.end)
        if not devices:
            return outcome
        outcome.total = yield self._runner.call(count_events, self._runner.store,
                                                outcome.selection)
        if outcome.total > self.limits.max_events_per_request:
            outcome.errors.append(Error(
                code=ErrorCode.TOO_MANY_ITEMS,
                reason=f"the request selects {outcome.total} events, more than the "
                       f"{self.limits.max_events_per_request} one request may return; narrow "
                       "the period, the meters or the EndDeviceEventTypes"))
            outcome.selection, outcome.total = None, 0
            return outcome
        per = self.limits.max_events_per_message
        outcome.parts = max(1, -(-outcome.total // per))
        return outcome

    def page(self, selection: Selection, index: int):
        """Deferred[list[EndDeviceEvent]]: part ``index`` (1, 2, ...) of the selection's events."""
        per = self.limits.max_events_per_message
        return self._runner.call(stored_events, self._runner.store, selection,
                                 (index - 1) * per, per)
