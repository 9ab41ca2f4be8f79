"""The ExecuteEndDeviceControls door: CIM control requests in, EndDeviceControlsResponseMessage out.

It translates and delegates: the codec decodes and validates, the engine's ControlService
(`head_end.controls`, engine/controls.py) runs each device's control as a durable job and reads
the result back from the meter, and this module turns the outcomes into the 61968-100 reply
(Result OK / PARTIAL / FAILED, one Error per failed or refused device with the device's mRID as
Error.ID). Before any device is touched the request passes, in order: the codec, the Header
limits, the asynchronous-reply check, the Admission (3.1 / 3.2), the resolution of its devices
and groups (2.4), and the rate limits (`head_end.control_gate`, engine/rate_limits.py: 3.2 per
refused device, audited). Who may ask is decided at the door before this: `roles_for`.

The same methods answer the AMQP request queue (`amqp_handler`), where the broker-verified AMQP
user must be a cimhes user holding the control's role.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from lxml import etree
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import reactor as default_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

from cimhes.cim.codec import CodecError, parse_xml
from cimhes.cim.codec import end_device_controls as codec
from cimhes.cim.end_device_controls import (
    ControlAction,
    EndDeviceControl,
    EndDeviceControlsResponse,
    UnknownControlType,
    action_for,
)
from cimhes.cim.header_limits import check_header
from cimhes.cim.message import (
    Error,
    ErrorCode,
    ErrorLevel,
    IdKind,
    ObjectId,
    Reply,
    ReplyResult,
    reply_header,
)
from cimhes.cim.meter_readings import DeviceRef
from cimhes.drivers.controls import (
    ControlCommand,
    ControlKind,
    ControlStatus,
    command_from_json,
    command_to_json,
)
from cimhes.drivers.errors import (
    ControlCancelled,
    ControlExpired,
    ControlNotConfirmed,
    UnknownDevice,
)
from cimhes.endpoints.arrival import ArrivalDesk, within_limit
from cimhes.endpoints.async_replies import ReplyAddressPolicy, ReplySender
from cimhes.endpoints.meter_readings import caller_of
from cimhes.endpoints.owed_replies import OwedReplies
from cimhes.endpoints.auth import SoapGuard
from cimhes.endpoints.soap_resource import CimFault, SoapResource, soap_application
from cimhes.engine import pending_replies, request_log
from cimhes.engine.admission import Admission
from cimhes.engine.control_batches import kinds_of_batch
from cimhes.engine.reading import DEVICE_ERROR_CODES, ReadOutcome
from cimhes.engine.store import StoreRunner
from cimhes.engine.usage_points import group_members, groups_of_devices
from cimhes.engine.users import Role

WSDL_NAME = "ExecuteEndDeviceControls"
WSDL_FILE = "ExecuteEndDeviceControls.wsdl"
REPLY_WSDL = "ReplyEndDeviceControls.wsdl"
REPLY_OPERATION = "ReplyEndDeviceControls"
SOURCE = "cimhes"

log = logging.getLogger(__name__)

# The role each action needs (engine/users.py Role; README "Users, roles and audit").
ROLE_OF: dict[ControlAction, Role] = {
    ControlAction.CONNECT: Role.SWITCH_OPERATOR,
    ControlAction.DISCONNECT: Role.SWITCH_OPERATOR,
    ControlAction.ARM: Role.SWITCH_OPERATOR,
    ControlAction.LOAD_LIMIT_SET: Role.LOAD_LIMIT_OPERATOR,
    ControlAction.LOAD_LIMIT_CLEAR: Role.LOAD_LIMIT_OPERATOR,
    ControlAction.CLOCK_SYNC: Role.CONFIGURATION_OPERATOR,
    ControlAction.TOU_ACTIVATE: Role.CONFIGURATION_OPERATOR,
}
# The name an action's rate limits use (engine/rate_limits.py ControlLimit.control): the action's
# own, except that setting and clearing a load limit share the limits of "load-limit".
RATE_LIMIT_NAME: dict[ControlAction, str] = {
    action: ("load-limit" if action in (ControlAction.LOAD_LIMIT_SET,
                                        ControlAction.LOAD_LIMIT_CLEAR) else action.value)
    for action in ControlAction
}


def roles_for(body: etree._Element) -> tuple[Role, ...]:
    """The roles a control request needs (the door's role rule, read before the request is
    validated): one per action its EndDeviceControlTypes name. A type the table does not know
    needs none here; the codec refuses it (5.2) without touching a device."""
    roles: list[Role] = []
    for node in body.iterfind(f".//{{{codec.NS_END_DEVICE_CONTROLS}}}EndDeviceControlType"):
        try:
            role = ROLE_OF[action_for(node.get("ref") or "")]
        except UnknownControlType:
            continue
        if role not in roles:
            roles.append(role)
    return tuple(roles)


@dataclass(frozen=True)
class ControlRequestLimits:
    """Bounds on EndDeviceControls requests (README, "Limits"). ``sync_time_limit``: seconds a
    synchronous answer may take; past it the reply is FAILED 4.1 while the controls go on (their
    outcomes are in the audit trail). How many devices one request may name and how many one
    caller may have pending are the Admission's (3.1, 3.2); rate limits the ControlGate's."""

    sync_time_limit: float = 120.0
    # Seconds between looks at the store while an asynchronous request waits for its
    # scheduled controls to run (the outcome is posted once all have).
    poll_interval: float = 5.0


@dataclass
class _Outcome:
    """What carrying out a request came to: the Errors, the controls made, the counts."""

    errors: list[Error]
    made: list[EndDeviceControl]
    done: int = 0       # devices whose control was carried out (or scheduled, or cancelled)
    failed: int = 0     # devices named whose control was not
    # (batch id, due time) of each control left to run at its time
    scheduled: list = field(default_factory=list)

    @property
    def result(self) -> ReplyResult:
        if self.failed == 0 and (self.done or not self.errors):
            return ReplyResult.OK
        return ReplyResult.PARTIAL if self.done else ReplyResult.FAILED


class EndDeviceControlsDoor:
    """Answers Create / Cancel EndDeviceControls (and Change, Close, Delete: not supported)."""

    def __init__(self, controls, gate, readings, store: StoreRunner, *, users=None,
                 audit=None, now: Callable[[], datetime] | None = None, reactor=None,
                 limits: ControlRequestLimits | None = None, admission: Admission | None = None,
                 replies: ReplySender | None = None,
                 reply_addresses: ReplyAddressPolicy | None = None,
                 owed: OwedReplies | None = None):
        """``controls``: engine/controls.py ControlService; ``gate``: the ControlGate;
        ``readings``: the MeterReadingService whose `resolve` finds devices the one way the
        engine does; ``users``/``audit``: who the AMQP door's callers are, and its audit;
        ``owed``: the process's owed replies (endpoints/owed_replies.py)."""
        self._controls = controls
        self._gate = gate
        self._readings = readings
        self._store = store
        self._users = users
        self._audit = audit
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._reactor = reactor or default_reactor
        self._limits = limits or ControlRequestLimits()
        self._admission = admission or Admission()
        self._replies = replies
        self._reply_addresses = reply_addresses or ReplyAddressPolicy()
        self._arrivals = ArrivalDesk(store, self._admission, replies, self._reply_addresses)
        self._owed_replies = owed or OwedReplies(self._reactor, store)
        self._owed_replies.register(codec.NOUN, self._resumed)

    # ------------------------------------------------------------------------- the operations

    def create(self, element, caller: str | None = None, user: str | None = None):
        """CreateEndDeviceControls. ``caller`` counts against the Admission (`caller_of`),
        ``user`` is who the rate limits and the audit name (the authenticated user)."""
        return self._answer(element, caller, user, codec.CREATE)

    def cancel(self, element, caller: str | None = None, user: str | None = None):
        """CancelEndDeviceControls: the still-waiting devices of each named scheduled control."""
        return self._answer(element, caller, user, codec.CANCEL)

    def not_supported(self, element, caller: str | None = None, user: str | None = None):
        """Change / Close / DeleteEndDeviceControls: FAILED 5.2, nothing done."""
        return self._answer(element, caller, user, None)

    # -------------------------------------------------------------------------------- common

    def _decoded(self, element, expected):
        try:
            operation, request = codec.decode_request(element)
            check_header(request.header)
        except CodecError as exc:
            raise CimFault("Client", exc.reason,
                           codec.encode_fault(Reply(ReplyResult.FAILED, errors=(exc.to_error(),))))
        if expected is not None and operation is not expected:
            error = Error(ErrorCode.SCHEMA_INVALID, reason=f"the operation {expected.name} takes "
                          f"a {expected.name} element, not {operation.name}")
            raise CimFault("Client", error.reason,
                           codec.encode_fault(Reply(ReplyResult.FAILED, errors=(error,))))
        return operation, request

    @inlineCallbacks
    def _answer(self, element, caller, user, expected):
        received_at = self._now()
        operation, request = self._decoded(element, expected)
        header = request.header
        who = user or caller or header.user_id or "anonymous"
        devices_asked = sum(len(c.end_devices) + len(c.end_device_groups)
                            for c in request.controls)
        unsupported = None if expected is not None else Error(
            ErrorCode.UNSUPPORTED_REQUEST, reason=f"{operation.name} is not carried out by "
            "this head-end: it creates controls (CreateEndDeviceControls) and cancels "
            "scheduled ones (CancelEndDeviceControls)")
        arrival = yield self._arrivals.arrive(
            header, noun=codec.NOUN, verb=header.verb.value, received_at=received_at,
            devices_asked=devices_asked, caller=caller or user, refusal=unsupported)
        logged, admitted = arrival.logged, arrival.admitted
        if arrival.refusal is not None:
            return (yield self._finish(request, logged,
                                       _Outcome(errors=[arrival.refusal], made=[]),
                                       devices_asked))
        if operation is codec.CANCEL:
            work = self._cancel(request, who)
        elif header.async_reply:
            # What is scheduled is stored before the acknowledgment, which names it (so it
            # can be cancelled before it runs); the rest runs after.
            # The reply owed is stored before the acknowledgment (engine/pending_replies.py):
            # a restart before the scheduled time carries it on (`_resumed`).
            try:
                outcome, pending = yield self._admit_and_schedule(request, who)
                progress = owed_progress(request, outcome, pending, who, devices_asked)
                reply_id = yield self._owed_replies.add(
                    noun=codec.NOUN, request_id=logged, reply_address=header.reply_address,
                    correlation_id=header.correlation_id or header.message_id,
                    request_xml=etree.tostring(element, encoding="unicode"), progress=progress)
            except BaseException:
                admitted.release()
                raise
            # Encoded before the outcome's own half starts changing `outcome`.
            ack = codec.encode_response(self._response(request, Reply(
                ReplyResult.OK, errors=(_ACK,) + tuple(
                    e for e in outcome.errors if e.code == ErrorCode.ACKNOWLEDGED),
                ids=_ids(outcome)), outcome.made))
            self._owed_replies.carry(
                reply_id, header.correlation_id or header.message_id,
                lambda: self._owed(reply_id, request, logged, outcome, progress, admitted))
            return ack
        else:
            work = self._carry_out(request, who)
        if header.async_reply:
            self._then_reply(work, request, logged, admitted, devices_asked).addErrback(
                lambda f: log.error("asynchronous control request failed: %s", f.getTraceback()))
            return codec.encode_response(self._response(request, Reply(ReplyResult.OK,
                                                                       errors=(_ACK,)), ()))
        outcome = yield within_limit(self._reactor, work, self._limits.sync_time_limit,
                                         admitted, "a control")
        if outcome is None:
            outcome = _Outcome(errors=[Error(
                ErrorCode.TIMED_OUT, reason=f"no answer within the synchronous time limit of "
                f"{self._limits.sync_time_limit:g} s; the controls are still being carried out "
                "and each device's outcome is recorded in the audit trail")], made=[],
                failed=devices_asked)
        return (yield self._finish(request, logged, outcome, devices_asked))

    @inlineCallbacks
    def _owed(self, reply_id: int, request, logged, outcome: _Outcome, progress: dict,
              admitted=None):
        """The asynchronous half of a Create, from where its `pending_reply` row stands: carry
        out the controls due at once (each stored as a batch in the row's own transaction, or
        already stored: then waited for), wait for the scheduled ones, post the outcome to the
        ReplyAddress; whether it took it (OwedReplies.carry settles the row). Run after the
        acknowledgment, and by `_resumed` for a row taken over (a restart, a retry round)."""
        header = request.header
        try:
            for position, item in enumerate(progress["immediate"]):
                control = request.controls[item["index"]]
                batch_id = item.get("batch_id")
                if batch_id is not None:  # stored by an earlier process: its jobs are durable
                    for _mrid, result in (yield self._settled(batch_id)):
                        self._count(result, outcome)
                else:
                    try:
                        batch = yield self._controls.execute(
                            item["mrids"], command_from_json(item["command"]),
                            user=progress["user"],
                            correlation_id=header.correlation_id or header.message_id,
                            on_stored=lambda session, batch_id, position=position:
                            pending_replies.record_batch(session, reply_id, position, batch_id))
                    except ValueError as exc:
                        self._unusable(control, item["mrids"], exc, outcome)
                        continue
                    batch_id = batch.batch_id
                    for result in batch.outcomes:
                        self._count(result, outcome)
                outcome.made.append(replace(control, mrid=batch_id, end_devices=tuple(
                    DeviceRef(mrid=m) for m in item["mrids"]), end_device_groups=()))
            yield self._scheduled_outcomes(outcome)
        finally:
            if admitted is not None:
                admitted.release()
        element = yield self._finish(request, logged, outcome, progress["devices_asked"])
        delivered = yield self._replies.send(header.reply_address, element,
                                             header.correlation_id or header.message_id)
        return delivered

    def _resumed(self, reply):
        """Carry on a Create's row taken over (OwedReplies.sweep): from its progress, without
        running again what its batches already hold (engine/controls.py jobs are durable)."""
        try:
            request, outcome = self._restored(reply)
        except (CodecError, KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"asynchronous reply {reply.id} to {reply.reply_address} cannot "
                             f"be carried on: {exc}") from exc
        return self._owed(reply.id, request, reply.request_id, outcome, reply.progress)

    def _restored(self, reply) -> tuple:
        _operation, request = codec.decode_request(parse_xml(reply.request_xml.encode()))
        progress = reply.progress
        made = [replace(request.controls[index], mrid=batch_id, end_devices=tuple(
            DeviceRef(mrid=m) for m in mrids), end_device_groups=())
            for index, batch_id, mrids in progress["made"]]
        return request, _Outcome(
            errors=[_error_from_json(e) for e in progress["errors"]], made=made,
            done=progress["done"], failed=progress["failed"],
            scheduled=[(batch_id, datetime.fromisoformat(at))
                       for batch_id, at in progress["scheduled"]])

    @inlineCallbacks
    def _then_reply(self, work: Deferred, request, logged, admitted, devices_asked):
        """The asynchronous half: once ``work`` has its outcome, post it to the ReplyAddress."""
        try:
            outcome = yield work
        finally:
            admitted.release()
        element = yield self._finish(request, logged, outcome, devices_asked)
        header = request.header
        yield self._replies.send(header.reply_address, element,
                                 header.correlation_id or header.message_id)

    @inlineCallbacks
    def _finish(self, request, logged, outcome: _Outcome, devices_asked):
        reply = Reply(outcome.result, errors=tuple(outcome.errors), ids=_ids(outcome))
        yield self._store.call(request_log.answered, self._store.store, logged,
                               replied_at=self._now(), result=reply.result.value,
                               devices_asked=devices_asked, devices_failed=outcome.failed)
        return codec.encode_response(self._response(request, reply, outcome.made))

    def _response(self, request, reply: Reply, made) -> EndDeviceControlsResponse:
        header = replace(reply_header(request.header, self._now(), source=SOURCE),
                         message_id=str(uuid.uuid4()))
        return EndDeviceControlsResponse(header=header, reply=reply, controls=tuple(made))

    # ------------------------------------------------------------------------------- create

    @inlineCallbacks
    def _devices(self, control: EndDeviceControl, outcome: _Outcome):
        """(mRIDs in asked order, each once; mRID -> the group it counts against)."""
        found = ReadOutcome()
        resolved = yield self._readings.resolve(list(control.end_devices), found)
        outcome.errors.extend(found.errors)
        outcome.failed += found.devices_failed
        order: dict[str, str | None] = {}
        for device in resolved:
            if device is not None:
                order.setdefault(device.mrid, None)
        if control.end_device_groups:
            keys = [g.mrid or g.names[0].name for g in control.end_device_groups]
            members = yield self._store.call(group_members, self._store.store, keys)
            for ref, key in zip(control.end_device_groups, keys):
                if key not in members:
                    outcome.errors.append(Error(
                        ErrorCode.UNKNOWN_GROUP, reason=f"EndDeviceGroup {key} is not known",
                        id=key, id_kind=IdKind.UUID if ref.mrid else IdKind.NAME,
                        object_type="EndDeviceGroup"))
                    outcome.failed += 1
                    continue
                for mrid in members[key]:
                    if order.get(mrid) is None:
                        order[mrid] = key
        alone = [m for m, group in order.items() if group is None]
        if alone:
            groups = yield self._store.call(groups_of_devices, self._store.store, alone)
            for mrid in alone:
                order[mrid] = (groups.get(mrid) or [None])[0]
        return order

    @inlineCallbacks
    def _carry_out(self, request, who: str):
        """Sync: every control carried out now or scheduled; the outcome."""
        outcome, pending = yield self._admit_and_schedule(request, who)
        yield self._execute(request, who, pending, outcome)
        return outcome

    @inlineCallbacks
    def _admit_and_schedule(self, request, who: str):
        """(outcome so far, [(control, admitted mRIDs, command)] to execute now): each
        control's devices resolved and rate-limited, the ones due later scheduled (fast: the
        jobs are stored), refusals as Errors."""
        outcome = _Outcome(errors=[], made=[])
        header = request.header
        correlation_id = header.correlation_id or header.message_id
        pending = []
        for control in request.controls:
            groups = yield self._devices(control, outcome)
            if not groups:
                continue
            admitted, refused = self._gate.admit(
                RATE_LIMIT_NAME[control.action], who, list(groups.items()), source=header.source,
                correlation_id=correlation_id)
            outcome.errors.extend(refused)
            outcome.failed += len(refused)
            if not admitted:
                continue
            command, at = self._command(control)
            if at is None:
                pending.append((control, admitted, command))
                continue
            try:
                batch_id = yield self._controls.schedule(
                    admitted, command, user=who, correlation_id=correlation_id, at=at)
            except ValueError as exc:  # a parameter the driver's check refuses
                self._unusable(control, admitted, exc, outcome)
                continue
            outcome.done += len(admitted)
            outcome.scheduled.append((batch_id, at))
            outcome.errors.append(Error(
                ErrorCode.ACKNOWLEDGED, level=ErrorLevel.INFORM,
                reason=f"{control.action.value} of {len(admitted)} device(s) scheduled for "
                       f"{at.isoformat()} as EndDeviceControl {batch_id}; "
                       "CancelEndDeviceControls naming that mRID cancels it",
                id=batch_id, id_kind=IdKind.TRANSACTION, object_type="EndDeviceControl"))
            outcome.made.append(replace(control, mrid=batch_id, end_devices=tuple(
                DeviceRef(mrid=m) for m in admitted), end_device_groups=()))
        return outcome, pending

    @inlineCallbacks
    def _execute(self, request, who: str, pending, outcome: _Outcome):
        """Carry out the controls due now, one after the other (in the order asked)."""
        header = request.header
        correlation_id = header.correlation_id or header.message_id
        for control, admitted, command in pending:
            try:
                batch = yield self._controls.execute(admitted, command, user=who,
                                                     correlation_id=correlation_id)
            except ValueError as exc:
                self._unusable(control, admitted, exc, outcome)
                continue
            for result in batch.outcomes:
                self._count(result, outcome)
            outcome.made.append(replace(control, mrid=batch.batch_id, end_devices=tuple(
                DeviceRef(mrid=m) for m in admitted), end_device_groups=()))

    @staticmethod
    def _unusable(control, admitted, exc: ValueError, outcome: _Outcome) -> None:
        outcome.failed += len(admitted)
        outcome.errors.append(Error(ErrorCode.INVALID_PARAMETER, reason=str(exc)[:500],
                                    id=control.control_type, object_type="EndDeviceControlType"))

    @inlineCallbacks
    def _scheduled_outcomes(self, outcome: _Outcome):
        """Wait for the scheduled controls of ``outcome`` to run (or be cancelled, or expire),
        polling the store every `ControlRequestLimits.poll_interval`; then their devices'
        outcomes replace the "scheduled" acknowledgments."""
        scheduled = {batch_id for batch_id, _at in outcome.scheduled}
        outcome.errors = [e for e in outcome.errors
                          if not (e.code == ErrorCode.ACKNOWLEDGED and e.id in scheduled)]
        for batch_id, _at in outcome.scheduled:
            results = yield self._settled(batch_id)
            outcome.done -= len(results)
            for _mrid, result in results:
                self._count(result, outcome)
        outcome.scheduled = []

    @inlineCallbacks
    def _settled(self, batch_id: str):
        """[(mRID, outcome)] of batch ``batch_id`` once every device's control has finished,
        looked up in the store every `ControlRequestLimits.poll_interval`."""
        while True:
            results = yield self._controls.batch(batch_id)
            if all(result is not None for _mrid, result in results):
                return results
            yield deferLater(self._reactor, self._limits.poll_interval, lambda: None)

    def _command(self, control: EndDeviceControl) -> tuple[ControlCommand, datetime | None]:
        """The driver's command for ``control`` and when to run it (None: now)."""
        parameters = control.parameters
        start = parameters.start
        at = start if start is not None and start > self._now() else None
        values: dict = {}
        if control.action is ControlAction.LOAD_LIMIT_SET:
            values["threshold_w"] = parameters.threshold_w
            if parameters.duration_s is not None:
                values["duration_s"] = parameters.duration_s
        elif control.action is ControlAction.TOU_ACTIVATE:
            # Written now; the meter activates the calendar itself at the given time (without
            # one, at once).
            values = {"calendar_name": parameters.calendar_name}
            if start is not None:
                values["activate_at"] = start
            at = None
        return ControlCommand(ControlKind(control.action.value), values), at

    @staticmethod
    def _count(result, outcome: _Outcome) -> None:
        """One device's outcome, counted and, unless done, an Error. (The engine audits each
        outcome through the ControlGate as it finishes.)"""
        if result.status is ControlStatus.DONE:
            outcome.done += 1
        else:
            outcome.failed += 1
            outcome.errors.append(device_error(result))

    # ------------------------------------------------------------------------------- cancel

    @inlineCallbacks
    def _cancel(self, request, who: str):
        outcome = _Outcome(errors=[], made=[])
        for control in request.controls:
            kinds = yield self._store.call(kinds_of_batch, self._store.store, control.mrid)
            if kinds is not None and kinds != {control.action.value}:
                # The role was checked for the type the request names: it must be the batch's.
                outcome.failed += 1
                outcome.errors.append(Error(
                    ErrorCode.INVALID_PARAMETER, reason=f"EndDeviceControl {control.mrid} is "
                    f"a {', '.join(sorted(kinds))} control, not {control.action.value} "
                    f"({control.control_type}); name its own EndDeviceControlType",
                    id=control.mrid, id_kind=IdKind.TRANSACTION, object_type="EndDeviceControl"))
                continue
            try:
                before = yield self._controls.batch(control.mrid)
                cancelled = yield self._controls.cancel(control.mrid, user=who)
            except KeyError:
                outcome.failed += 1
                outcome.errors.append(Error(
                    ErrorCode.UNKNOWN_CONTROL, reason=f"EndDeviceControl {control.mrid} is not "
                    "a control this head-end scheduled", id=control.mrid,
                    id_kind=IdKind.TRANSACTION, object_type="EndDeviceControl"))
                continue
            done = set(cancelled)
            outcome.done += len(cancelled)
            for mrid, _result in before:
                if mrid not in done:
                    outcome.failed += 1
                    outcome.errors.append(Error(
                        ErrorCode.CONTROL_NOT_CANCELLED, reason=f"the control of EndDevice "
                        f"{mrid} in EndDeviceControl {control.mrid} had already started or "
                        "finished", id=mrid, id_kind=IdKind.UUID, object_type="EndDevice"))
            outcome.made.append(replace(control, end_devices=tuple(
                DeviceRef(mrid=m) for m in cancelled)))
        return outcome

    # ---------------------------------------------------------------------------------- AMQP

    @inlineCallbacks
    def amqp_handler(self, element, caller: str | None = None):
        """The handler of the EndDeviceControls request queue (queue/requests.py): the same
        operations, by request element. ``caller`` is the consumer's ``amqp user <user_id>``:
        the user id RabbitMQ verified against the publisher's login; it must be a cimhes user,
        not disabled, holding every role the request's controls need (else 7.1 / 7.2)."""
        try:
            operation = codec.operation_of(element)
        except CodecError as exc:
            raise CimFault("Client", exc.reason,
                           codec.encode_fault(Reply(ReplyResult.FAILED, errors=(exc.to_error(),))))
        name = caller[len(AMQP_CALLER):] if caller and caller.startswith(AMQP_CALLER) else None
        yield self._authorise_amqp(name, element, operation)
        method = {codec.CREATE: self.create, codec.CANCEL: self.cancel}.get(
            operation, self.not_supported)
        return (yield method(element, caller, name))

    @inlineCallbacks
    def _authorise_amqp(self, name: str | None, element, operation) -> None:
        found = None
        if name and self._users is not None:
            found = yield self._store.call(self._users.credentials, name)
        refusal = None
        if found is None or found.disabled:
            refusal = Error(ErrorCode.NOT_AUTHENTICATED, reason="an AMQP control request needs "
                            "the AMQP user_id property naming an enabled cimhes user")
        else:
            missing = [r for r in roles_for(element) if r not in found.roles]
            if missing:
                refusal = Error(ErrorCode.NOT_AUTHORIZED, reason=f"user {name} may not "
                                f"{operation.name}: it needs the role "
                                + ", ".join(f"{r.value} ({r.meaning})" for r in missing))
        if refusal is None:
            return
        if self._audit is not None:
            self._audit.record(operation.name, "refused", actor=name, source="amqp",
                               correlation_id=_correlation(element), detail=refusal.reason[:1000])
        raise CimFault("Client.Security", refusal.reason,
                       codec.encode_fault(Reply(ReplyResult.FAILED, errors=(refusal,))))


_ACK = Error(ErrorCode.ACKNOWLEDGED, level=ErrorLevel.INFORM,
             reason="request accepted; the outcome will be sent to the ReplyAddress with this "
                    "CorrelationID")


def _ids(outcome: _Outcome) -> tuple[ObjectId, ...]:
    """Reply.ID: the mRID of each control made (the batch id later requests name it by)."""
    return tuple(ObjectId(c.mrid, kind=IdKind.TRANSACTION, object_type="EndDeviceControl")
                 for c in outcome.made if c.mrid)


def owed_progress(request, outcome: _Outcome, pending, who: str, devices_asked: int) -> dict:
    """The `pending_reply` progress of an asynchronous Create just acknowledged (JSON): the
    outcome so far and the controls still to carry out at once, by their place in the request."""
    def index_of(control, start: int) -> int:
        for i in range(start, len(request.controls)):
            c = request.controls[i]
            if c is control or (c.control_type, c.parameters, c.reason) == (
                    control.control_type, control.parameters, control.reason):
                return i
        raise ValueError(f"control {control.control_type} is not in the request")

    made, start = [], 0
    for control in outcome.made:  # the scheduled ones, in the request's order
        start = index_of(control, start)
        made.append([start, control.mrid, [d.mrid for d in control.end_devices]])
        start += 1
    return {"user": who, "devices_asked": devices_asked, "done": outcome.done,
            "failed": outcome.failed, "errors": [_error_to_json(e) for e in outcome.errors],
            "made": made,
            "scheduled": [[batch_id, at.isoformat()] for batch_id, at in outcome.scheduled],
            "immediate": [{"index": index_of(control, 0), "mrids": list(mrids),
                           "command": command_to_json(command)}
                          for control, mrids, command in pending]}


def _error_to_json(error: Error) -> dict:
    return {"code": error.code, "level": error.level.value, "reason": error.reason,
            "details": error.details, "xpath": error.xpath, "id": error.id,
            "id_kind": error.id_kind.value if error.id_kind is not None else None,
            "object_type": error.object_type}


def _error_from_json(data: dict) -> Error:
    return Error(data["code"], level=ErrorLevel(data["level"]), reason=data["reason"],
                 details=data["details"], xpath=data["xpath"], id=data["id"],
                 id_kind=IdKind(data["id_kind"]) if data["id_kind"] is not None else None,
                 object_type=data["object_type"])


# How queue/requests.py names an AMQP caller: by the user_id property RabbitMQ verified.
AMQP_CALLER = "amqp user "


def _correlation(element) -> str | None:
    header = element.find("{*}Header")
    value = None if header is None else (header.findtext("{*}CorrelationID")
                                          or header.findtext("{*}MessageID"))
    return value.strip()[:128] if value else None


# The Reply.Error code of each way a control can fail that is the controls' own; the others are
# the device failures every request shares (engine/reading.py DEVICE_ERROR_CODES).
CONTROL_ERROR_CODES = {
    UnknownDevice: ErrorCode.INVALID_METER,
    ControlNotConfirmed: ErrorCode.CONTROL_REFUSED,
    ControlCancelled: ErrorCode.CONTROL_CANCELLED,
    ControlExpired: ErrorCode.CONTROL_EXPIRED,
}


def device_error(result) -> Error:
    """The Reply.Error for one device whose control was not done (ID: the device's mRID)."""
    if result.status is ControlStatus.REFUSED:
        code = ErrorCode.CONTROL_REFUSED
    else:
        kind = type(result.error)
        code = CONTROL_ERROR_CODES.get(kind) or DEVICE_ERROR_CODES.get(
            kind, ErrorCode.DEVICE_PROTOCOL_ERROR)
    return Error(code, reason=result.reason or f"{result.kind.value} of EndDevice "
                 f"{result.device_mrid}: {result.status.value}", id=result.device_mrid,
                 id_kind=IdKind.UUID, object_type="EndDevice")


def end_device_controls_application(door: EndDeviceControlsDoor):
    """The spyne application for the ExecuteEndDeviceControls WSDL, bound to one door."""

    def user_of(ctx) -> str | None:
        return getattr(getattr(ctx, "udc", None), "name", None)

    class ExecuteEndDeviceControlsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="CreateEndDeviceControls",
             _returns=AnyXml, _operation_name="CreateEndDeviceControls")
        def CreateEndDeviceControls(ctx, element):
            return door.create(element, caller_of(ctx), user_of(ctx))

        @rpc(AnyXml, _body_style="bare", _in_message_name="CancelEndDeviceControls",
             _returns=AnyXml, _operation_name="CancelEndDeviceControls")
        def CancelEndDeviceControls(ctx, element):
            return door.cancel(element, caller_of(ctx), user_of(ctx))

        @rpc(AnyXml, _body_style="bare", _in_message_name="ChangeEndDeviceControls",
             _returns=AnyXml, _operation_name="ChangeEndDeviceControls")
        def ChangeEndDeviceControls(ctx, element):
            return door.not_supported(element, caller_of(ctx), user_of(ctx))

        @rpc(AnyXml, _body_style="bare", _in_message_name="CloseEndDeviceControls",
             _returns=AnyXml, _operation_name="CloseEndDeviceControls")
        def CloseEndDeviceControls(ctx, element):
            return door.not_supported(element, caller_of(ctx), user_of(ctx))

        @rpc(AnyXml, _body_style="bare", _in_message_name="DeleteEndDeviceControls",
             _returns=AnyXml, _operation_name="DeleteEndDeviceControls")
        def DeleteEndDeviceControls(ctx, element):
            return door.not_supported(element, caller_of(ctx), user_of(ctx))

    return soap_application(ExecuteEndDeviceControlsService,
                            tns=codec.NS_END_DEVICE_CONTROLS_MESSAGE, name=WSDL_NAME)


# The operations and the roles each needs, for the SOAP door's guard (endpoints/auth.py).
OPERATION_ROLES = {op.name: roles_for for op in codec.OPERATIONS}


def mount(head_end, reactor, settings, cim) -> EndDeviceControlsDoor:
    """Build the door on ``head_end``'s engine (its ControlService, ControlGate, readings,
    users, admission) and serve it at ``cim``/ExecuteEndDeviceControls; returns the door (its
    `amqp_handler` serves the EndDeviceControls request queue)."""
    door = EndDeviceControlsDoor(
        head_end.controls, head_end.control_gate, head_end.readings, head_end.store_runner,
        users=head_end.users, audit=head_end.audit, reactor=reactor,
        admission=head_end.admission, limits=settings.control_requests,
        replies=ReplySender(reactor, head_end.callback_session, wsdl_file=REPLY_WSDL,
                            operation=REPLY_OPERATION),
        reply_addresses=ReplyAddressPolicy(settings.reply_addresses),
        owed=head_end.owed_replies)
    cim.putChild(WSDL_NAME.encode(), SoapResource(
        end_device_controls_application(door), WSDL_FILE,
        SoapGuard(head_end.doorkeeper, OPERATION_ROLES, codec.encode_fault),
        public_base_url=settings.public_base_url, observer=head_end.operations.requests))
    return door
