"""Bounds on requests: devices per synchronous request (3.1), pending requests per caller (3.2)
and the lengths of the Header's open fields (1.4), through zeep against a real head-end and
simulated meters on loopback."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import pytest_twisted
import zeep
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zeep.plugins import HistoryPlugin

from cimhes.cim.message import ErrorCode
from cimhes.engine.admission import Admission, Refused, RequestLimits
from cimhes.fixtures.fleet import start_fleet

from .credentials import add_test_user, zeep_client
from .head_ends import close_head_end, devices_of, serve_head_end
from .schemas import assert_valid_everywhere

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
REGISTER = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
FIRST_METER = 231  # loopback 127.0.1.231..


def test_defaults_and_validation():
    limits = RequestLimits()
    assert (limits.max_devices_per_request, limits.max_pending_per_caller) == (1000, 8)
    with pytest.raises(ValueError, match="max_pending_per_caller must be positive"):
        RequestLimits(max_pending_per_caller=0)


def test_a_pass_counts_once_and_frees_its_place():
    admission = Admission(RequestLimits(max_devices_per_request=5, max_pending_per_caller=2))
    first = admission.admit("a", 5)
    admission.admit("a", 1)
    with pytest.raises(Refused) as caught:
        admission.admit("a", 1)
    assert caught.value.error.code == ErrorCode.TOO_MANY_PENDING.value == "3.2"
    admission.admit("b", 1)  # another caller has its own count
    first.release()
    first.release()  # a second release gives nothing back twice
    assert admission.pending("a") == 1
    admission.admit("a", 1)
    with pytest.raises(Refused) as caught:
        admission.admit("c", 6)
    assert caught.value.error.code == ErrorCode.TOO_MANY_OBJECTS.value == "3.1"
    assert "at most 5" in caught.value.error.reason and "asynchronously" in caught.value.error.reason


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 3, clock=lambda: NOW, base_index=FIRST_METER,
                        response_delay=0.3, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet):
    head_end = serve_head_end(
        tmp_path, devices_of(fleet), device_timeout=5.0,
        request_limits=RequestLimits(max_devices_per_request=2, max_pending_per_caller=1))
    add_test_user(head_end)
    add_test_user(head_end, name="other-mdm", password="other-mdm-password")
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.base_url = f"http://127.0.0.1:{port.getHost().port}"
    yield head_end
    close_head_end(head_end)


def _client(base_url: str, **credentials):
    history = HistoryPlugin()
    client = zeep_client(f"{base_url}/cim/GetMeterReadings?wsdl", plugins=[history],
                         **credentials)
    return client, history


def _ask(client, mrids, message_id="limits-1"):
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings", "MessageID": message_id},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": m} for m in mrids],
                                      "ReadingType": [{"mRID": REGISTER}]}})


@pytest_twisted.inlineCallbacks
def test_more_devices_than_a_synchronous_request_may_name_is_refused_whole(head_end, fleet):
    mrids = [m["mrid"] for m in fleet.inventory()["meters"]]
    client, history = yield deferToThread(_client, head_end.base_url)
    reply = yield deferToThread(_ask, client, mrids)

    assert_valid_everywhere(history.last_received["envelope"].find(f"{{{SOAP_ENV}}}Body")[0])
    assert reply.Reply.Result == "FAILED"
    (error,) = reply.Reply.Error
    assert error.code == "3.1"
    assert "names 3 devices" in error.reason and "at most 2" in error.reason
    assert reply.Payload is None or not reply.Payload.MeterReadings.MeterReading
    assert fleet.open_connections() == 0
    assert head_end.store.stored_values(mrids[0], REGISTER) == []  # no meter was read
    (logged,) = head_end.store.requests()
    assert (logged.result, logged.devices_asked) == ("FAILED", 3)

    reply = yield deferToThread(_ask, client, mrids[:2])  # at the limit: served
    assert reply.Reply.Result == "OK"


@pytest_twisted.inlineCallbacks
def test_a_caller_past_its_pending_requests_is_refused_and_others_are_served(head_end, fleet):
    mrids = [m["mrid"] for m in fleet.inventory()["meters"]]
    (_, (first, _h1)), (_, (again, _h2)), (_, (other, _h3)) = yield DeferredList([
        deferToThread(_client, head_end.base_url),
        deferToThread(_client, head_end.base_url),
        deferToThread(_client, head_end.base_url, name="other-mdm",
                      password="other-mdm-password")], fireOnOneErrback=True)

    slow = deferToThread(_ask, first, mrids[:1], "pending-1")  # ~2 s: every answer is 0.3 s late
    for _ in range(200):  # until the slow one is admitted (bounded: 2 s)
        if head_end.admission.pending("user mdm-test") or slow.called:  # (called: it failed)
            break
        yield deferLater(reactor, 0.01, lambda: None)
    assert head_end.admission.pending("user mdm-test") == 1
    refused = yield deferToThread(_ask, again, mrids[1:2], "pending-2")
    served = yield deferToThread(_ask, other, mrids[1:2], "pending-3")
    answered = yield slow

    assert refused.Reply.Result == "FAILED"
    (error,) = refused.Reply.Error
    assert error.code == "3.2" and "mdm-test" in error.reason and "at most 1" in error.reason
    assert served.Reply.Result == "OK" and answered.Reply.Result == "OK"
    assert head_end.admission.pending("user mdm-test") == 0
    after = yield deferToThread(_ask, again, mrids[1:2], "pending-4")
    assert after.Reply.Result == "OK"


@pytest.mark.parametrize("field, value", [
    ("MessageID", "m" * 129),
    ("Source", "s" * 3_000_000),
    ("Comment", "c" * 1025),
])
@pytest_twisted.inlineCallbacks
def test_a_header_field_past_its_limit_is_a_1_4_error_and_nothing_is_stored(
        head_end, fleet, field, value):
    mrid = fleet.inventory()["meters"][0]["mrid"]
    client, _ = yield deferToThread(_client, head_end.base_url)

    def ask():
        return client.service.GetMeterReadings(
            Header={"Verb": "get", "Noun": "MeterReadings", field: value},
            Request={"GetMeterReadings": {"EndDevice": [{"mRID": mrid}],
                                          "ReadingType": [{"mRID": REGISTER}]}})

    with pytest.raises(zeep.exceptions.Fault) as caught:
        yield deferToThread(ask)
    detail = caught.value.detail[0]
    assert_valid_everywhere(detail)
    ns = "http://iec.ch/TC57/2011/schema/message"
    error = detail.find(f".//{{{ns}}}Error")
    # 61968-100 has no "field too long": 3.1 (too many), detail message-too-large
    assert error.findtext(f"{{{ns}}}code") == "3.1"
    assert error.findtext(f"{{{ns}}}details").startswith("message-too-large")
    assert error.findtext(f"{{{ns}}}xpath").endswith(field)
    assert f"{len(value)} characters" in error.findtext(f"{{{ns}}}reason")
    assert head_end.store.requests() == []
    assert value not in caught.value.message
