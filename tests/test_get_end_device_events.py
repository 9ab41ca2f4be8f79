"""GetEndDeviceEvents through zeep (clients from the served WSDL and from the reference one),
SOAP and DLMS to simulated meters whose event logs hold known events: from the meters' logs on
request, from the store by meter, group, EndDeviceEventType (wildcards) and period, the
standard's errors, parts, the asynchronous pattern; every reply valid against the project's
schema and the reference one."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
import zeep
from lxml import etree
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site
from zeep.exceptions import Fault
from zeep.plugins import HistoryPlugin

from cimhes import xsd
from cimhes.cim.codec.end_device_events import (
    decode_end_device_events_response,
    encode_end_device_events_response,
)
from cimhes.cim.end_device_event_types import IDIS_EVENT_TYPES
from cimhes.cim.end_device_events import (
    EndDeviceEvent,
    EndDeviceEventsResponse,
    event_type_matches,
)
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_events import EVENT_LOGS
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.engine.event_queries import EventRequestLimits

from .brokers import amqp_vhost, ask  # noqa: F401 (fixture)
from .credentials import add_test_user, basic_session, zeep_client
from .schemas import _compiled, reference

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
UTC = timezone.utc
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=UTC)
START = NOW - timedelta(days=20)
FIRST_METER = 281
STANDARD_LOG = EVENT_LOGS["standard"].obis
FRAUD_LOG = EVENT_LOGS["fraud"].obis
# Events the meters logged besides their documented history.
POWER_DOWN_AT = NOW - timedelta(hours=5, seconds=7)
COVER_AT = NOW - timedelta(days=2, minutes=3)
GET_MESSAGE = ("connexo", "comu-outbound", "getenddeviceevents", "xsd",
               "GetEndDeviceEventsMessage.xsd")


def assert_valid_everywhere(element) -> None:
    xsd.schema("GetEndDeviceEventsMessage.xsd").assertValid(element)
    _compiled(reference(*GET_MESSAGE)).assertValid(element)


@pytest.fixture
def fleet():
    from cimhes.fixtures.fleet import start_fleet
    fleet = start_fleet(reactor, 3, clock=lambda: NOW, base_index=FIRST_METER, port=0)
    fleet.state(FIRST_METER).record(STANDARD_LOG, POWER_DOWN_AT, 1)
    fleet.state(FIRST_METER + 1).record(FRAUD_LOG, COVER_AT, 40)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


class ReplyReceiver:
    """The MDM's ReplyEndDeviceEvents: takes each posted part, answers Result OK."""

    def __init__(self):
        self.received = []
        self.all_parts = defer.Deferred()
        self.expected = 1

    def take(self, element):
        self.received.append(element)
        if len(self.received) >= self.expected and not self.all_parts.called:
            self.all_parts.callback(self.received)
        return encode_end_device_events_response(EndDeviceEventsResponse(
            header=Header(verb=Verb.REPLY, noun="EndDeviceEvents"), reply=Reply(ReplyResult.OK)))


@pytest.fixture
def mdm():
    receiver = ReplyReceiver()

    class ReplyEndDeviceEventsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="EndDeviceEventsResponseMessage",
             _returns=AnyXml, _operation_name="ReplyEndDeviceEvents")
        def ReplyEndDeviceEvents(ctx, element):
            return receiver.take(element)

    root, folder = Resource(), Resource()
    root.putChild(b"mdm", folder)
    folder.putChild(b"ReplyEndDeviceEvents", SoapResource(
        soap_application(ReplyEndDeviceEventsService,
                         tns="http://iec.ch/TC57/2011/GetEndDeviceEventsMessage",
                         name="ReplyEndDeviceEvents"), "ReplyEndDeviceEvents.wsdl"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    receiver.base = f"http://127.0.0.1:{port.getHost().port}"
    yield receiver
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def make_head_end(tmp_path, fleet, mdm):
    made = []

    def make(**settings):
        meters = fleet.inventory()["meters"]
        head_end = HeadEnd(reactor, HeadEndSettings(
            database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
            secret_key_file=str(tmp_path / "secret.key"), reply_addresses=(f"{mdm.base}/mdm/",),
            **settings),
            [DeviceAddress.from_inventory(m) for m in meters],
            links={"groups": [{"mrid": "G-1", "name": "feeder 7",
                               "members": [meters[0]["mrid"], meters[2]["mrid"]]}]})
        add_test_user(head_end)
        port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
        head_end.base_url = f"http://127.0.0.1:{port.getHost().port}"
        made.append((head_end, port))
        return head_end

    yield make
    for head_end, port in made:
        pytest_twisted.blockon(port.stopListening())
        head_end.store_runner.stop()
        head_end.store.close()


@pytest.fixture
def head_end(make_head_end):
    return make_head_end()


def _ask(base_url, selection, *, start=START, end=NOW, source=None, page=None, header=None,
         client=None):
    """GetEndDeviceEvents through a zeep client of the served WSDL; (reply, the reply element)."""
    history = HistoryPlugin()
    if client is None:
        client = zeep_client(f"{base_url}/cim/GetEndDeviceEvents?wsdl", plugins=[history])
    else:
        client.plugins.append(history)
    request = {"GetEndDeviceEvents": dict(selection)}
    if start is not None or end is not None:
        request["GetEndDeviceEvents"]["TimeSchedule"] = [
            {"scheduleInterval": {"start": start, "end": end}}]
    options = [("DataSource", source), ("Page", page)]
    request["Option"] = [{"name": n, "value": str(v)} for n, v in options if v is not None]
    service = client.service if not hasattr(client, "bound") else client.bound
    reply = service.GetEndDeviceEvents(
        Header=header or {"Verb": "get", "Noun": "EndDeviceEvents", "MessageID": "mdm-1"},
        Request=request)
    element = history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0]
    assert_valid_everywhere(element)
    return reply, element


def _events(element) -> list[EndDeviceEvent]:
    return list(decode_end_device_events_response(element).events)


def _logged(fleet, index, start=START, end=NOW) -> Counter:
    """What meter ``index``'s logs hold in [start, end]: (log OBIS, time) counted."""
    state = fleet.state(index)
    return Counter((log.obis, at) for log in EVENT_LOGS.values()
                   for at, _ in state.events(log.obis, start, end))


def _keys(events) -> Counter:
    return Counter((e.device_code.rsplit(":", 1)[0], e.created) for e in events)


@pytest_twisted.inlineCallbacks
def test_from_the_meters_logs_then_from_the_store_by_type_and_period(head_end, fleet):
    a, b, c = (m["mrid"] for m in fleet.inventory()["meters"])
    # The meter's power down also arrived by push before: read from the log it stays one event.
    pushed = EndDeviceEvent(a, POWER_DOWN_AT, IDIS_EVENT_TYPES[1].event_type, f"{STANDARD_LOG}:1",
                            "power down")
    assert (yield head_end.store_runner.call(head_end.events.save_events, [pushed], "push", NOW)) == 1

    reply, element = yield deferToThread(
        _ask, head_end.base_url, {"Meter": [{"mRID": a}, {"Names": [{"name": fleet.inventory()[
            "meters"][1]["name"]}]}]}, source="meter")
    assert reply.Reply.Result == "OK", reply.Reply
    events = _events(element)
    assert _keys(e for e in events if e.device_mrid == a) == _logged(fleet, FIRST_METER)
    assert _keys(e for e in events if e.device_mrid == b) == _logged(fleet, FIRST_METER + 1)
    assert sum(1 for e in events if e.created == POWER_DOWN_AT) == 1
    assert len(events) > 20 and [e.created for e in events] == sorted(e.created for e in events)
    stored = yield head_end.store_runner.call(head_end.events.events, a)
    assert [received for e, received in stored if e.created == POWER_DOWN_AT] == ["push"]

    # From the store (the default): by type with a wildcard, and a narrower period.
    types = Counter(e.event_type for e in events)
    common = types.most_common(1)[0][0]
    pattern = ".".join(common.split(".")[:2] + ["*", "*"])
    period = (NOW - timedelta(days=3), NOW - timedelta(hours=1))
    reply, element = yield deferToThread(
        _ask, head_end.base_url, {"Meter": [{"mRID": a}, {"mRID": b}],
                                  "EndDeviceEventType": [{"mRID": pattern},
                                                         {"mRID": IDIS_EVENT_TYPES[40].event_type}]},
        start=period[0], end=period[1])
    assert reply.Reply.Result == "OK"
    want = [e for e in events if period[0] <= e.created <= period[1]
            and (event_type_matches(pattern, e.event_type)
                 or e.event_type == IDIS_EVENT_TYPES[40].event_type)]
    assert want and _events(element) == want
    assert any(e.created == COVER_AT and e.device_mrid == b for e in want)
    # The store holds nothing of meter c (never read): an empty, OK answer.
    reply, element = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": c}]})
    assert reply.Reply.Result == "OK" and _events(element) == []


@pytest_twisted.inlineCallbacks
def test_an_end_device_group_and_a_client_of_the_reference_wsdl(head_end, fleet):
    a, _b, c = fleet.inventory()["meters"]

    def reference_client():
        wsdl = reference("connexo", "comu-outbound", "getenddeviceevents", "GetEndDeviceEvents.wsdl")
        client = zeep.Client(str(wsdl), transport=zeep.transports.Transport(
            session=basic_session()))
        client.bound = client.create_service(
            "{http://iec.ch/TC57/2011/GetEndDeviceEvents}GetEndDeviceEvents_Binding",
            f"{head_end.base_url}/cim/GetEndDeviceEvents")
        return client

    client = yield deferToThread(reference_client)
    reply, element = yield deferToThread(
        _ask, head_end.base_url, {"EndDeviceGroup": [{"Names": [{"name": "feeder 7"}]}]},
        source="meter", client=client)
    assert reply.Reply.Result == "OK", reply.Reply
    assert reply.Header.CorrelationID == "mdm-1"
    events = _events(element)
    assert {e.device_mrid for e in events} == {a["mrid"], c["mrid"]}
    assert _keys(e for e in events if e.device_mrid == c["mrid"]) == _logged(fleet, FIRST_METER + 2)
    # The vendor's spelling of the Noun, Meter by serialNumber, no end: to now.
    reply, element = yield deferToThread(
        _ask, head_end.base_url, {"Meter": [{"serialNumber": a["name"]}]}, end=None,
        header={"Verb": "get", "Noun": "GetEndDeviceEvents"}, client=client)
    assert reply.Reply.Result == "OK"
    assert _keys(_events(element)) == _logged(fleet, FIRST_METER)


@pytest_twisted.inlineCallbacks
def test_unknown_meters_and_groups_are_errors_naming_them(head_end, fleet):
    a = fleet.inventory()["meters"][0]
    reply, _ = yield deferToThread(_ask, head_end.base_url, {
        "Meter": [{"mRID": a["mrid"]}, {"mRID": "no-such-meter"},
                  {"mRID": a["mrid"], "Names": [{"name": fleet.inventory()["meters"][1]["name"]}]}],
        "EndDeviceGroup": [{"mRID": "G-404"}]})
    assert reply.Reply.Result == "PARTIAL"
    got = [(e.code, e.details, e.ID._value_1, e.ID.objectType) for e in reply.Reply.Error]
    assert ("2.4", None, "no-such-meter", "EndDevice") in got
    assert ("2.4", "unknown-group", "G-404", "EndDeviceGroup") in got
    assert any(code == "2.4" and details == "mrid-names-mismatch" for code, details, _, _ in got)
    reply, _ = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": "no-such-meter"}]})
    assert reply.Reply.Result == "FAILED"


@pytest.mark.parametrize("selection, start, end, code, text", [
    ({"Meter": [{"mRID": "m"}]}, NOW, START, "1.8", "starts"),
    ({"Meter": [{"mRID": "m"}], "EndDeviceEventType": [{"mRID": "3.26.x.85"}]}, START, NOW,
     "1.8", "eventOrAction"),
    ({"EndDeviceEventType": [{"mRID": "3.26.*.*"}]}, START, NOW, "1.6", "names no Meter"),
    ({"UsagePoint": [{"mRID": "UP-1"}]}, START, NOW, "5.2", "not supported"),
])
@pytest_twisted.inlineCallbacks
def test_a_bad_request_is_a_fault_with_the_standards_code(head_end, selection, start, end, code,
                                                          text):
    with pytest.raises(Fault) as fault:
        yield deferToThread(_ask, head_end.base_url, selection, start=start, end=end)
    reply = fault.value.detail.find(".//{*}Reply")
    message = fault.value.detail[0]
    assert_valid_everywhere(message)
    error = reply.find("{*}Error")
    assert error.findtext("{*}code") == code and text in error.findtext("{*}reason")


@pytest_twisted.inlineCallbacks
def test_a_meter_read_is_the_engines_event_jobs_each_done(head_end, fleet):
    from sqlalchemy import select

    from cimhes.engine.jobs import JobRecord, JobRequestRecord, Priority

    meters = [m["mrid"] for m in fleet.inventory()["meters"]]
    reply, element = yield deferToThread(
        _ask, head_end.base_url, {"Meter": [{"mRID": m} for m in meters]}, source="meter")
    assert reply.Reply.Result == "OK" and _events(element)

    def jobs():
        with head_end.store._session() as session:  # noqa: SLF001
            return session.execute(select(JobRecord, JobRequestRecord.kind).join(
                JobRequestRecord)).all()
    rows = yield head_end.store_runner.call(jobs)
    assert sorted((j.device_mrid, j.kind, kind, j.state, j.priority, j.attempts)
                  for j, kind in rows) == [(m, "events", "events", "done", Priority.ON_DEMAND, 1)
                                           for m in sorted(meters)]
    assert {(j.window_start, j.window_end) for j, _ in rows} == {(START, NOW)}
    assert all(j.claimed_by == head_end.dispatcher.engine_id for j, _ in rows)


@pytest_twisted.inlineCallbacks
def test_a_wrong_verb_and_a_meter_read_without_a_start(head_end, fleet):
    a = fleet.inventory()["meters"][0]["mrid"]
    with pytest.raises(Fault) as fault:
        yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                            header={"Verb": "create", "Noun": "EndDeviceEvents"})
    assert fault.value.detail.find(".//{*}Reply/{*}Error").findtext("{*}code") == "2.9"
    reply, _ = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                                   start=None, end=NOW, source="meter")
    assert reply.Reply.Result == "FAILED"
    assert [(e.code, e.details) for e in reply.Reply.Error] == [("1.6", "time-window-missing")]


@pytest_twisted.inlineCallbacks
def test_a_large_answer_comes_in_parts_and_too_many_is_refused(make_head_end, fleet):
    head_end = make_head_end(event_requests=EventRequestLimits(
        max_events_per_message=7, max_events_per_request=20))
    a = fleet.inventory()["meters"][0]["mrid"]
    reply, element = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                                         start=NOW - timedelta(days=10), source="meter")
    count = int(dict((p.Name, p.Value) for p in reply.Header.Property)["MessageCount"])
    parts = [_events(element)]
    assert [e.code for e in reply.Reply.Error] == ["0.1"] and len(parts[0]) == 7
    for page in range(2, count + 1):
        reply, element = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                                             start=NOW - timedelta(days=10), page=page)
        assert dict((p.Name, p.Value) for p in reply.Header.Property)["MessageIndex"] == str(page)
        parts.append(_events(element))
    assert reply.Reply.Error == [] and reply.Reply.Result == "OK"
    every = [e for part in parts for e in part]
    assert _keys(every) == _logged(fleet, FIRST_METER, NOW - timedelta(days=10))
    assert count == -(-len(every) // 7) and count > 1
    reply, _ = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                                   start=NOW - timedelta(days=10), page=count + 1)
    assert reply.Reply.Result == "FAILED" and reply.Reply.Error[0].code == "1.8"
    # Twenty days of this meter's log are more than 20 events: refused whole, 3.1.
    reply, _ = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                                   source="meter")
    assert reply.Reply.Result == "FAILED"
    assert [e.code for e in reply.Reply.Error] == ["3.1"]
    assert "narrow" in reply.Reply.Error[0].reason


@pytest_twisted.inlineCallbacks
def test_asynchronous_parts_reach_the_reply_address(make_head_end, fleet, mdm):
    head_end = make_head_end(event_requests=EventRequestLimits(max_events_per_message=10))
    a = fleet.inventory()["meters"][0]["mrid"]
    header = {"Verb": "get", "Noun": "EndDeviceEvents", "AsyncReplyFlag": True,
              "ReplyAddress": f"{mdm.base}/mdm/ReplyEndDeviceEvents", "CorrelationID": "corr-9"}
    expected = sum(_logged(fleet, FIRST_METER, NOW - timedelta(days=10)).values())
    mdm.expected = -(-expected // 10)
    ack, _ = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                                 start=NOW - timedelta(days=10), source="meter", header=header)
    assert ack.Reply.Result == "OK" and [e.code for e in ack.Reply.Error] == ["0.3"]
    parts = yield mdm.all_parts
    for index, element in enumerate(parts, start=1):
        assert_valid_everywhere(element)
        response = decode_end_device_events_response(element)
        assert response.header.correlation_id == "corr-9"
        assert dict(response.header.properties)["MessageIndex"] == str(index)
    every = [e for element in parts for e in _events(element)]
    assert _keys(every) == _logged(fleet, FIRST_METER, NOW - timedelta(days=10))
    # A ReplyAddress the operator did not allow is refused and never called.
    header["ReplyAddress"] = "http://127.0.0.1:9/elsewhere"
    reply, _ = yield deferToThread(_ask, head_end.base_url, {"Meter": [{"mRID": a}]},
                                   header=header)
    assert reply.Reply.Result == "FAILED" and reply.Reply.Error[0].code == "7.2"


@pytest_twisted.inlineCallbacks
def test_the_events_reader_role_is_needed(head_end, fleet):
    from cimhes.engine.users import Role
    head_end.users.add_user("reader", "reader-password-1", [Role.READINGS_READER],
                            digest=True, actor="test", replace=True)
    client = yield deferToThread(zeep_client, f"{head_end.base_url}/cim/GetEndDeviceEvents?wsdl",
                                 name="reader", password="reader-password-1")
    with pytest.raises(Fault) as fault:
        yield deferToThread(client.service.GetEndDeviceEvents,
                            Header={"Verb": "get", "Noun": "EndDeviceEvents"},
                            Request={"GetEndDeviceEvents": {"Meter": [{"mRID": "x"}]}})
    assert fault.value.detail.find(".//{*}Reply/{*}Error").findtext("{*}code") == "7.2"
    assert etree.QName(fault.value.detail[0]).localname == "EndDeviceEventsFaultMessage"


@pytest_twisted.inlineCallbacks
def test_get_end_device_events_over_amqp(make_head_end, fleet, amqp_vhost):
    from cimhes.cim.codec.end_device_events import encode_get_end_device_events
    from cimhes.cim.end_device_events import EventSource, GetEndDeviceEvents
    from cimhes.cim.meter_readings import DeviceRef
    from cimhes.engine.users import Role
    from cimhes.queue.topology import REQUESTS_EXCHANGE

    head_end = make_head_end(amqp_url=amqp_vhost.url)
    # The AMQP user (its user_id) is the cimhes user of that name, with the role (docs/amqp.md).
    head_end.users.add_user(amqp_vhost.user, "amqp-reader-password", [Role.EVENTS_READER],
                            actor="test", replace=True)
    head_end.amqp.start()  # the reactor already runs: callWhenRunning would wait for nothing
    try:
        yield head_end.amqp.connection.connected()
        a = fleet.inventory()["meters"][0]["mrid"]
        body = etree.tostring(encode_get_end_device_events(GetEndDeviceEvents(
            header=Header(verb=Verb.GET, noun="EndDeviceEvents", message_id="amqp-ev-1"),
            meters=(DeviceRef(mrid=a),), event_types=("3.*.*.*",), start=START, end=NOW,
            source=EventSource.METER)), xml_declaration=True, encoding="UTF-8")
        props, answer = yield deferToThread(ask, amqp_vhost.url, REQUESTS_EXCHANGE,
                                            "EndDeviceEvents", body, correlation_id="c-1")
        assert props.correlation_id == "c-1"
        element = etree.fromstring(answer)
        assert_valid_everywhere(element)
        response = decode_end_device_events_response(element)
        assert response.reply.result is ReplyResult.OK
        assert _keys(response.events) == _logged(fleet, FIRST_METER)
    finally:
        yield head_end.amqp.stop()
