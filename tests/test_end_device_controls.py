"""ExecuteEndDeviceControls end to end: zeep clients built from the served WSDL and from the
standard's reference WSDL (address changed only) call every operation over HTTP; the head-end
carries the controls out over DLMS (TCP) on simulated meters and reads each back. A disconnect is
then read back through the meter in a second association of the test's own. Scheduled controls are
cancelled; asynchronous outcomes reach an MDM's ReplyEndDeviceControls in the test with the
CorrelationID; rate limits refuse with 3.2 and are audited; a user without the role gets 7.2.
Every reply is validated against the project's schema and the reference ones."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
import sqlalchemy
import zeep
from lxml import etree
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site
from zeep.plugins import HistoryPlugin
from zeep.transports import Transport

from cimhes.cim.codec import end_device_controls as codec
from cimhes.cim.end_device_controls import EndDeviceControlsResponse
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_association import in_association
from cimhes.drivers.limits import SessionLimits
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.engine.rate_limits import ControlLimit
from cimhes.engine.users import Role
from cimhes.fixtures.fleet import start_fleet

from .credentials import add_test_user, basic_session, zeep_client
from .schemas import assert_controls_valid_everywhere, reference

UTC = timezone.utc
FIRST_METER = 5335  # 127.0.22.1..: this file's loopback range
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
DISCONNECT, CONNECT = "3.31.0.23", "3.31.0.18"
SERVICE = "/cim/ExecuteEndDeviceControls"
REFERENCE_WSDL = ("connexo", "comu-outbound", "enddevicecontrols", "ExecuteEndDeviceControls.wsdl")
BINDING = "{http://iec.ch/TC57/2011/ExecuteEndDeviceControls}EndDeviceControls_Binding"


def now() -> datetime:
    return datetime.now(UTC)


class MdmReceiver:
    """The MDM's ReplyEndDeviceControls: takes each outcome posted to it, answers Result OK."""

    def __init__(self):
        self.received = []
        self.waiting = defer.Deferred()

    def take(self, element):
        assert_controls_valid_everywhere(element)
        self.received.append(element)
        if not self.waiting.called:
            self.waiting.callback(element)
        return codec.encode_response(EndDeviceControlsResponse(
            header=Header(verb=Verb.REPLY, noun="EndDeviceControls"), reply=Reply(ReplyResult.OK)))


@pytest.fixture(scope="module")
def mdm():
    receiver = MdmReceiver()

    class ReplyEndDeviceControlsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="EndDeviceControlsResponseMessage",
             _returns=AnyXml, _operation_name="ReplyEndDeviceControls")
        def ReplyEndDeviceControls(ctx, element):
            return receiver.take(element)

    root, folder = Resource(), Resource()
    root.putChild(b"mdm", folder)
    folder.putChild(b"ReplyEndDeviceControls", SoapResource(
        soap_application(ReplyEndDeviceControlsService,
                         tns=codec.NS_END_DEVICE_CONTROLS_MESSAGE, name="ReplyEndDeviceControls"),
        "ReplyEndDeviceControls.wsdl"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    receiver.base = f"http://127.0.0.1:{port.getHost().port}"
    yield receiver
    pytest_twisted.blockon(port.stopListening())


def _head_end(directory, fleet, mdm, control_limits):
    meters = fleet.inventory()["meters"]
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{directory / 'cimhes.sqlite'}", device_timeout=5.0,
        secret_key_file=str(directory / "secret.key"), reply_addresses=(f"{mdm.base}/mdm/",),
        control_limits=control_limits),
        [DeviceAddress.from_inventory(m) for m in meters],
        {"groups": [{"name": "feeder-7", "members": [m["mrid"] for m in meters]}]})
    add_test_user(head_end)
    add_test_user(head_end, "reader", "reader-password", (Role.READINGS_READER,))
    add_test_user(head_end, "switcher", "switcher-password", (Role.SWITCH_OPERATOR,))
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.base_url = f"http://127.0.0.1:{port.getHost().port}"
    head_end.meters = meters
    head_end.port = port
    return head_end


def _close(head_end, fleet):
    pytest_twisted.blockon(head_end.port.stopListening())
    head_end.store_runner.stop()
    head_end.store.close()
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture(scope="module")
def head_end(tmp_path_factory, mdm):
    """One head-end and fleet for the module's tests; each test switches meters of its own
    (by index) so none sees another's."""
    fleet = start_fleet(reactor, 10, clock=now, base_index=FIRST_METER, port=0)
    head_end = _head_end(tmp_path_factory.mktemp("controls"), fleet, mdm,
                         (ControlLimit("disconnect", "user", 1000, 60.0),))
    yield head_end
    _close(head_end, fleet)


@pytest.fixture
def limited(tmp_path, mdm):
    """A head-end of its own whose rate limit allows 3 disconnects a minute per user."""
    fleet = start_fleet(reactor, 3, clock=now, base_index=FIRST_METER + 20, port=0)
    head_end = _head_end(tmp_path, fleet, mdm,
                         (ControlLimit("disconnect", "user", 3, 60.0),
                          ControlLimit("disconnect", "group", 100, 60.0)))
    yield head_end
    _close(head_end, fleet)


def _served_client(base_url, history=None, **credentials):
    return zeep_client(f"{base_url}{SERVICE}?wsdl", plugins=[history] if history else [],
                       **credentials)


def _reference_client(base_url, history):
    """A client generated from the standard's WSDL, as an MDM vendor would have it: only the
    address changed."""
    client = zeep.Client(str(reference(*REFERENCE_WSDL)), plugins=[history],
                         transport=Transport(session=basic_session()))
    return client.create_service(BINDING, f"{base_url}{SERVICE}")


def _control(code, mrids, **fields):
    return {"EndDeviceControl": [{"EndDeviceControlType": {"ref": code},
                                  "EndDevices": [{"mRID": m} for m in mrids], **fields}]}


def _header(verb="create", **extra):
    return {"Verb": verb, "Noun": "EndDeviceControls", "MessageID": f"t-{verb}",
            "Source": "test-mdm", **extra}


def _last_body(history):
    body = history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0]
    assert_controls_valid_everywhere(body)
    return body


async def _output_state(device: DeviceAddress) -> bool:
    """The disconnector's output_state, read by the test in an association of its own."""
    async def work(conversation):
        return (await conversation.get(70, "0.0.96.3.10.255", 2)).value
    return await in_association(reactor, device, SessionLimits.of(5.0), None, work)


def _device(head_end, k=0) -> DeviceAddress:
    return DeviceAddress.from_inventory(head_end.meters[k])


def _errors(reply):
    return [(e.code, e.details.split(":")[0] if e.details else None, e.ID._value_1 if e.ID
             is not None else None) for e in (reply.Reply.Error or [])]


@pytest_twisted.ensureDeferred
async def test_a_disconnect_opens_the_relay_and_a_connect_closes_it(head_end):
    history = HistoryPlugin()
    client = await deferToThread(_served_client, head_end.base_url, history)
    meter = head_end.meters[0]["mrid"]
    reply = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                Payload={"EndDeviceControls": _control(DISCONNECT, [meter])})
    _last_body(history)
    assert reply.Reply.Result == "OK", reply.Reply
    assert reply.Header.CorrelationID == "t-create"
    (made,) = reply.Payload.EndDeviceControls.EndDeviceControl
    assert made.mRID and [d.mRID for d in made.EndDevices] == [meter]
    assert [i._value_1 for i in reply.Reply.ID] == [made.mRID]
    assert await _output_state(_device(head_end)) is False
    reply = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                Payload={"EndDeviceControls": _control(CONNECT, [meter])})
    assert reply.Reply.Result == "OK", reply.Reply
    assert await _output_state(_device(head_end)) is True
    audit = await deferToThread(head_end.users.audit_entries)
    assert [(a.action, a.outcome, a.subject) for a in audit
            if a.action.startswith("control.") and a.subject == meter] == [("control.disconnect", "success", meter), ("control.connect", "success", meter)]


@pytest_twisted.ensureDeferred
async def test_many_devices_get_one_outcome_each_unknown_ones_2_4(head_end):
    history = HistoryPlugin()
    client = await deferToThread(_served_client, head_end.base_url, history)
    meters = [m["mrid"] for m in head_end.meters[1:3]]
    reply = await deferToThread(
        client.service.CreateEndDeviceControls, Header=_header(),
        Payload={"EndDeviceControls": _control(DISCONNECT, [*meters, "no-such-meter"])})
    _last_body(history)
    assert reply.Reply.Result == "PARTIAL"
    assert _errors(reply) == [("2.4", None, "no-such-meter")]
    for k in (1, 2):
        assert await _output_state(_device(head_end, k)) is False
    assert await _output_state(_device(head_end, 8)) is True


@pytest_twisted.ensureDeferred
async def test_load_limit_clock_and_tou_are_carried_out_and_read_back(head_end):
    history = HistoryPlugin()
    client = await deferToThread(_served_client, head_end.base_url, history)
    meter = head_end.meters[3]["mrid"]
    at = (now() + timedelta(days=2)).replace(microsecond=0)
    for code, fields in (
            ("3.15.0.54", {"priceSignal": 5000, "primaryDeviceTiming": {"duration": 1.5}}),
            ("3.15.0.55", {}),
            ("3.36.116.13", {}),
            ("3.20.121.13", {"issuerTrackingID": "winter",
                             "primaryDeviceTiming": {"interval": {"start": at}}}),
            ("3.31.0.5", {})):
        reply = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                    Payload={"EndDeviceControls": _control(code, [meter],
                                                                           **fields)})
        _last_body(history)
        assert (code, reply.Reply.Result, _errors(reply)) == (code, "OK", []), reply.Reply


def _served_service(base_url, history):
    return _served_client(base_url, history).service


@pytest.mark.parametrize("make_service, k", [(_reference_client, 4), (_served_service, 8)],
                         ids=["reference-wsdl", "served-wsdl"])
@pytest_twisted.ensureDeferred
async def test_a_client_of_either_wsdl_calls_every_operation(head_end, make_service, k):
    history = HistoryPlugin()
    service = await deferToThread(make_service, head_end.base_url, history)
    meter = head_end.meters[k]["mrid"]
    later = (now() + timedelta(hours=1)).replace(microsecond=0)
    reply = await deferToThread(service.CreateEndDeviceControls, Header=_header(), Payload={
        "EndDeviceControls": _control(DISCONNECT, [meter], primaryDeviceTiming={
            "interval": {"start": later}})})
    _last_body(history)
    assert reply.Reply.Result == "OK", reply.Reply
    (ack,) = reply.Reply.Error
    (made,) = reply.Payload.EndDeviceControls.EndDeviceControl
    assert (ack.code, ack.level, ack.ID._value_1) == ("0.3", "INFORM", made.mRID)
    # A cancel is authorised by the type it names, which must be the control's own.
    reply = await deferToThread(service.CancelEndDeviceControls, Header=_header("cancel"),
                                Payload={"EndDeviceControls": {"EndDeviceControl": [{
                                    "mRID": made.mRID,
                                    "EndDeviceControlType": {"ref": "3.15.0.55"}}]}})
    assert _errors(reply) == [("1.8", "unusable-value", made.mRID)]
    reply = await deferToThread(service.CancelEndDeviceControls, Header=_header("cancel"),
                                Payload={"EndDeviceControls": {"EndDeviceControl": [{
                                    "mRID": made.mRID,
                                    "EndDeviceControlType": {"ref": DISCONNECT}}]}})
    _last_body(history)
    assert reply.Reply.Result == "OK", reply.Reply
    assert [d.mRID for d in reply.Payload.EndDeviceControls.EndDeviceControl[0].EndDevices] \
        == [meter]
    # Cancelled again: nothing left to cancel, the device is named.
    reply = await deferToThread(service.CancelEndDeviceControls, Header=_header("cancel"),
                                Payload={"EndDeviceControls": {"EndDeviceControl": [{
                                    "mRID": "no-such-control",
                                    "EndDeviceControlType": {"ref": DISCONNECT}}]}})
    _last_body(history)
    assert reply.Reply.Result == "FAILED"
    assert _errors(reply) == [("1.8", "unknown-control", "no-such-control")]
    for operation, verb in (("ChangeEndDeviceControls", "change"),
                            ("CloseEndDeviceControls", "close"),
                            ("DeleteEndDeviceControls", "delete")):
        reply = await deferToThread(getattr(service, operation), Header=_header(verb),
                                    Payload={"EndDeviceControls": _control(DISCONNECT, [meter])})
        _last_body(history)
        assert (operation, reply.Reply.Result, [e.code for e in reply.Reply.Error]) == (
            operation, "FAILED", ["5.2"])
    assert await _output_state(_device(head_end, k)) is True


@pytest_twisted.ensureDeferred
async def test_an_asynchronous_disconnect_reports_to_the_reply_address(head_end, mdm):
    client = await deferToThread(_served_client, head_end.base_url)
    meter = head_end.meters[5]["mrid"]
    ack = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(
        AsyncReplyFlag=True, ReplyAddress=f"{mdm.base}/mdm/ReplyEndDeviceControls",
        CorrelationID="corr-77"), Payload={"EndDeviceControls": _control(DISCONNECT, [meter])})
    assert ack.Reply.Result == "OK"
    assert [(e.code, e.level) for e in ack.Reply.Error] == [("0.3", "INFORM")]
    element = await mdm.waiting
    outcome = codec.decode_response(element)
    assert outcome.header.correlation_id == "corr-77"
    assert outcome.reply.result is ReplyResult.OK, outcome.reply
    assert [d.mrid for d in outcome.controls[0].end_devices] == [meter]
    assert await _output_state(_device(head_end, 5)) is False


@pytest_twisted.ensureDeferred
async def test_a_disconnect_beyond_the_rate_limit_is_refused_3_2_and_audited(limited):
    history = HistoryPlugin()
    client = await deferToThread(_served_client, limited.base_url, history)
    meters = [m["mrid"] for m in limited.meters]
    # The limit: 3 disconnects a minute per user. Two now, then two more: one passes, one not.
    reply = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                Payload={"EndDeviceControls": _control(DISCONNECT, meters[:2])})
    assert reply.Reply.Result == "OK", reply.Reply
    reply = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                Payload={"EndDeviceControls": _control(DISCONNECT, meters[1:])})
    _last_body(history)
    assert reply.Reply.Result == "PARTIAL"
    assert _errors(reply) == [("3.2", "control-rate-limited", meters[2])]
    assert await _output_state(_device(limited, 2)) is True
    audit = await deferToThread(limited.users.audit_entries)
    refused = [a for a in audit if a.outcome == "refused" and a.action == "control.disconnect"]
    assert [(a.actor, a.subject) for a in refused] == [("mdm-test", meters[2])]
    assert "rate limit" in refused[0].detail


@pytest_twisted.ensureDeferred
async def test_a_user_without_the_role_is_refused_7_2_and_audited(head_end):
    meter = head_end.meters[6]["mrid"]
    for name, password, code in (("reader", "reader-password", DISCONNECT),
                                 ("switcher", "switcher-password", "3.15.0.55")):
        history = HistoryPlugin()
        client = await deferToThread(_served_client, head_end.base_url, history, name=name,
                                     password=password)
        with pytest.raises(zeep.exceptions.Fault) as caught:
            await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                Payload={"EndDeviceControls": _control(code, [meter])})
        assert caught.value.code.endswith("Client.Security")
        (fault_message,) = caught.value.detail
        assert_controls_valid_everywhere(fault_message)
        reply = codec.decode_fault(fault_message)
        assert [e.code for e in reply.errors] == ["7.2"]
    assert await _output_state(_device(head_end, 6)) is True
    audit = await deferToThread(head_end.users.audit_entries)
    assert [(a.actor, a.outcome) for a in audit if a.action == "CreateEndDeviceControls"
                                 and a.actor in ("reader", "switcher")] == [
        ("reader", "refused"), ("switcher", "refused")]


@pytest_twisted.ensureDeferred
async def test_an_unknown_control_type_is_refused_with_the_type_as_its_object(head_end):
    history = HistoryPlugin()
    client = await deferToThread(_served_client, head_end.base_url, history)
    with pytest.raises(zeep.exceptions.Fault) as caught:
        await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                            Payload={"EndDeviceControls": _control(
                                "3.31.0.99", [head_end.meters[6]["mrid"]])})
    (fault_message,) = caught.value.detail
    assert_controls_valid_everywhere(fault_message)
    (error,) = codec.decode_fault(fault_message).errors
    assert (error.code, error.id, error.object_type) == ("5.2", "3.31.0.99",
                                                         "EndDeviceControlType")
    assert error.details.startswith("unknown-control-type")


@pytest_twisted.ensureDeferred
async def test_a_scheduled_disconnect_runs_at_its_time(head_end):
    client = await deferToThread(_served_client, head_end.base_url)
    meter = head_end.meters[7]["mrid"]
    soon = now() + timedelta(seconds=2)
    reply = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(), Payload={
        "EndDeviceControls": _control(DISCONNECT, [meter], primaryDeviceTiming={
            "interval": {"start": soon}})})
    assert [e.code for e in reply.Reply.Error] == ["0.3"]
    assert await _output_state(_device(head_end, 7)) is True  # not yet
    (made,) = reply.Payload.EndDeviceControls.EndDeviceControl
    for _ in range(40):
        results = await head_end.controls.batch(made.mRID)
        if all(outcome is not None for _mrid, outcome in results):
            break
        await deferLater(reactor, 0.5, lambda: None)
    assert [(m, o.status.value) for m, o in results] == [(meter, "done")]
    assert await _output_state(_device(head_end, 7)) is False


@pytest_twisted.ensureDeferred
async def test_an_async_request_with_a_control_now_and_one_later_replies_once_with_both(
        head_end, mdm):
    """Its reply owed is kept in the store (engine/pending_replies.py): the control due now is
    recorded as its batch when stored, the reply marked sent once the MDM took it."""
    client = await deferToThread(_served_client, head_end.base_url)
    meter = head_end.meters[9]["mrid"]
    later = now() + timedelta(seconds=2)
    received = len(mdm.received)
    ack = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(
        AsyncReplyFlag=True, ReplyAddress=f"{mdm.base}/mdm/ReplyEndDeviceControls",
        CorrelationID="corr-both"), Payload={"EndDeviceControls": {"EndDeviceControl": [
            {"EndDeviceControlType": {"ref": DISCONNECT}, "EndDevices": [{"mRID": meter}]},
            {"EndDeviceControlType": {"ref": CONNECT}, "EndDevices": [{"mRID": meter}],
             "primaryDeviceTiming": {"interval": {"start": later}}}]}})
    assert ack.Reply.Result == "OK"
    assert [e.code for e in ack.Reply.Error] == ["0.3", "0.3"]  # accepted; the later one
    (scheduled,) = ack.Payload.EndDeviceControls.EndDeviceControl
    for _ in range(60):
        if len(mdm.received) > received:
            break
        await deferLater(reactor, 0.5, lambda: None)
    (element,) = [e for e in mdm.received[received:]]
    outcome = codec.decode_response(element)
    assert outcome.header.correlation_id == "corr-both"
    assert outcome.reply.result is ReplyResult.OK, outcome.reply
    assert [(c.control_type, [d.mrid for d in c.end_devices]) for c in outcome.controls] == [
        (CONNECT, [meter]), (DISCONNECT, [meter])]
    assert outcome.controls[0].mrid == scheduled.mRID
    assert await _output_state(_device(head_end, 9)) is True  # disconnected, then connected
    from cimhes.engine import pending_replies

    for _ in range(20):
        (owed,) = [r for r in (await head_end.store_runner.call(
            pending_replies.unsent, head_end.store, "EndDeviceControls"))
            if r.correlation_id == "corr-both"] or [None]
        if owed is None:
            break
        await deferLater(reactor, 0.25, lambda: None)
    assert owed is None  # marked sent
    with head_end.store.engine.connect() as connection:
        progress = connection.execute(sqlalchemy.select(
            pending_replies.PendingReplyRecord.progress).where(
            pending_replies.PendingReplyRecord.correlation_id == "corr-both")).scalar_one()
    assert [item["batch_id"] for item in progress["immediate"]] == [outcome.controls[1].mrid]


def test_every_control_action_has_a_role_and_a_mixed_request_needs_each():
    from cimhes.cim.end_device_controls import ControlAction
    from cimhes.endpoints.end_device_controls import ROLE_OF, roles_for

    assert set(ROLE_OF) == set(ControlAction)
    body = etree.fromstring(
        f'<r xmlns:c="{codec.NS_END_DEVICE_CONTROLS}"><c:EndDeviceControlType ref="3.31.0.23"/>'
        '<c:EndDeviceControlType ref="0.15.0.55"/><c:EndDeviceControlType ref="3.31.0.18"/>'
        '<c:EndDeviceControlType ref="9.9.9.9"/></r>')
    assert roles_for(body) == (Role.SWITCH_OPERATOR, Role.LOAD_LIMIT_OPERATOR)
