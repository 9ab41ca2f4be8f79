"""CIM requests over a real RabbitMQ broker: GetMeterReadings answered by the SOAP door's own
handler through the request queue, and bad messages answered FAILED or dead-lettered."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes import xsd
from cimhes.cim.codec import encode_get_meter_readings
from cimhes.cim.message import Header, Verb
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.drivers import DeviceAddress
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.fixtures.fleet import start_fleet
from cimhes.queue.topology import REASON_HEADER, REQUESTS_DEAD, REQUESTS_EXCHANGE

from cimhes.engine.users import Role

from .brokers import amqp_vhost, ask, take  # noqa: F401 (fixture)
from .credentials import add_test_user
from .schemas import assert_valid_everywhere

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
REGISTER = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
FIRST_METER = 241


@pytest.fixture
def head_end(tmp_path, amqp_vhost):
    fleet = start_fleet(reactor, 2, clock=lambda: NOW, base_index=FIRST_METER, port=0)
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key"), amqp_url=amqp_vhost.url),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    head_end.fleet = fleet
    # The broker's user of the test vhost is a cimhes user allowed to read (docs/amqp.md).
    add_test_user(head_end, amqp_vhost.user, "amqp-user-password", [Role.READINGS_READER])
    head_end.amqp.start()  # the reactor already runs: callWhenRunning would wait for nothing
    pytest_twisted.blockon(head_end.amqp.connection.connected())
    yield head_end
    pytest_twisted.blockon(head_end.amqp.stop())
    pytest_twisted.blockon(fleet.stop_all())
    head_end.store_runner.stop()
    head_end.store.close()


def _request(mrids, message_id="amqp-1", correlation_id=None) -> bytes:
    element = encode_get_meter_readings(GetMeterReadings(
        header=Header(verb=Verb.GET, noun="MeterReadings", message_id=message_id,
                      correlation_id=correlation_id, source="test-mdm"),
        end_devices=tuple(DeviceRef(mrid=m) for m in mrids), reading_types=(REGISTER,),
        ))
    return etree.tostring(element, xml_declaration=True, encoding="UTF-8")


@pytest_twisted.inlineCallbacks
def test_get_meter_readings_over_amqp_is_answered_with_the_correlation_id(head_end, amqp_vhost):
    meters = [m["mrid"] for m in head_end.fleet.inventory()["meters"]]
    props, body = yield deferToThread(
        ask, amqp_vhost.url, REQUESTS_EXCHANGE, "MeterReadings",
        _request(meters, correlation_id="corr-42"), correlation_id="amqp-corr-7")
    assert props.correlation_id == "amqp-corr-7"
    reply = etree.fromstring(body)
    assert_valid_everywhere(reply)
    ns = {"m": "http://iec.ch/TC57/2011/schema/message"}
    assert reply.findtext("{*}Header/m:CorrelationID", namespaces=ns) == "corr-42"
    assert reply.findtext("{*}Reply/m:Result", namespaces=ns) == "OK"
    readings = reply.findall(".//{*}MeterReading")
    assert {r.findtext("{*}Meter/{*}mRID") for r in readings} == set(meters)
    assert all(r.find("{*}Readings/{*}value") is not None for r in readings), body.decode()[:3000]
    # Without an AMQP correlation_id the Header's CorrelationID (else MessageID) is used.
    props, body = yield deferToThread(
        ask, amqp_vhost.url, REQUESTS_EXCHANGE, "MeterReadings", _request(meters[:1], "mid-9"))
    assert props.correlation_id == "mid-9"
    assert head_end.amqp.requests.counts["answered"] == 2


def _failed_error(body: bytes):
    reply = etree.fromstring(body)
    xsd.schema("Message.xsd").assertValid(reply) if reply.tag.endswith("}ResponseMessage") \
        else assert_valid_everywhere(reply)
    ns = {"m": "http://iec.ch/TC57/2011/schema/message"}
    assert reply.findtext("{*}Reply/m:Result", namespaces=ns) == "FAILED"
    return reply.findtext("{*}Reply/m:Error/m:code", namespaces=ns), \
        reply.findtext("{*}Reply/m:Error/m:reason", namespaces=ns)


@pytest_twisted.inlineCallbacks
def test_bad_messages_are_answered_failed_or_dead_lettered_and_the_consumer_serves_on(
        head_end, amqp_vhost):
    url = amqp_vhost.url
    # Not XML.
    props, body = yield deferToThread(ask, url, REQUESTS_EXCHANGE, "MeterReadings",
                                      b"this is not xml", correlation_id="bad-1")
    assert props.correlation_id == "bad-1"
    code, reason = _failed_error(body)
    assert code == "1.8" and "well-formed" in reason
    # Schema-invalid: a GetMeterReadings with a stray element, through the SOAP door's handler.
    invalid = _request(["x"]).replace(b"</m:Source>", b"</m:Source><m:Bogus>1</m:Bogus>") \
        if b"</m:Source>" in _request(["x"]) else _request(["x"]).replace(
            b"<msg:Source>", b"<msg:Bogus>1</msg:Bogus><msg:Source>")
    assert invalid != _request(["x"])
    props, body = yield deferToThread(ask, url, REQUESTS_EXCHANGE, "MeterReadings", invalid,
                                      correlation_id="bad-2")
    code, reason = _failed_error(body)
    assert code == "1.8" and "not valid" in reason
    # An unknown Noun (routed nowhere: through the alternate exchange to the consumer).
    unknown = _request(["x"]).replace(b">MeterReadings<", b">Gizmos<")
    props, body = yield deferToThread(ask, url, REQUESTS_EXCHANGE, "Gizmos", unknown,
                                      correlation_id="bad-3")
    code, reason = _failed_error(body)
    assert code == "2.5" and "Gizmos" in reason
    # Without a reply queue: dead-lettered with the reason in a header.
    yield deferToThread(ask, url, REQUESTS_EXCHANGE, "MeterReadings", b"<broken", reply=False,
                        correlation_id="bad-4")
    [(_method, dead_props, dead_body)] = yield deferToThread(take, url, REQUESTS_DEAD, 1)
    assert dead_body == b"<broken"
    assert dead_props.correlation_id == "bad-4"
    assert dead_props.headers[REASON_HEADER].startswith("1.8")
    # And a good request still gets its answer.
    meters = [m["mrid"] for m in head_end.fleet.inventory()["meters"]]
    props, body = yield deferToThread(ask, url, REQUESTS_EXCHANGE, "MeterReadings",
                                      _request(meters), correlation_id="good")
    assert props.correlation_id == "good"
    assert head_end.amqp.requests.counts == {"answered": 1, "failed": 3, "dead-lettered": 1}


def _audit(head_end, subject="amqp MeterReadings"):
    return [(e.action, e.outcome, e.actor, e.detail) for e in head_end.users.audit_entries()
            if e.source == "amqp" and (e.subject == subject or e.action == subject)]


@pytest_twisted.inlineCallbacks
def test_amqp_requests_are_served_only_to_known_amqp_users_holding_the_role(
        head_end, amqp_vhost):
    import pika

    url = amqp_vhost.url
    meters = [m["mrid"] for m in head_end.fleet.inventory()["meters"]][:1]
    # No user_id: the message names nobody (RabbitMQ checks the property only when it is set).
    props, body = yield deferToThread(ask, url, REQUESTS_EXCHANGE, "MeterReadings",
                                      _request(meters), correlation_id="anon", user_id=None)
    code, reason = _failed_error(body)
    assert code == "7.1" and "user_id" in reason
    # An AMQP user the broker knows but cimhes does not.
    stranger_url, _password = amqp_vhost.user_url()
    stranger = amqp_vhost.extra_user
    props, body = yield deferToThread(ask, stranger_url, REQUESTS_EXCHANGE, "MeterReadings",
                                      _request(meters), correlation_id="stranger")
    code, reason = _failed_error(body)
    assert code == "7.1" and stranger in reason
    # Known to cimhes, without the role; then granted it.
    add_test_user(head_end, stranger, "stranger-password", [Role.EVENTS_READER])
    props, body = yield deferToThread(ask, stranger_url, REQUESTS_EXCHANGE, "MeterReadings",
                                      _request(meters), correlation_id="no-role")
    code, reason = _failed_error(body)
    assert code == "7.2" and "readings-reader" in reason
    head_end.users.grant(stranger, Role.READINGS_READER, actor="test")
    props, body = yield deferToThread(ask, stranger_url, REQUESTS_EXCHANGE, "MeterReadings",
                                      _request(meters), correlation_id="granted")
    assert props.correlation_id == "granted" and b"<msg:Result>OK</msg:Result>" in body
    # Claiming another user: the broker itself refuses the message (and closes the channel).
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        yield deferToThread(ask, stranger_url, REQUESTS_EXCHANGE, "MeterReadings",
                            _request(meters), correlation_id="forged", user_id=amqp_vhost.user,
                            timeout=5)
    assert refused.value.reply_code == 406
    # Without a reply queue a refusal is dead-lettered with its 7.x reason.
    yield deferToThread(ask, url, REQUESTS_EXCHANGE, "MeterReadings", _request(meters),
                        reply=False, correlation_id="anon-dead", user_id=None)
    [(_m, dead_props, _b)] = yield deferToThread(take, url, REQUESTS_DEAD, 1)
    assert dead_props.headers[REASON_HEADER].startswith("7.1")
    # Every decision is in the audit trail (written off the request's path: wait for it).
    for _ in range(50):
        entries = _audit(head_end)
        if len(entries) >= 7:
            break
        yield deferToThread(__import__("time").sleep, 0.1)
    assert ("authenticate", "failure", None, "no AMQP user_id property") in entries
    assert ("authenticate", "failure", stranger,
            f"AMQP user {stranger!r} is not a cimhes user") in entries
    assert ("amqp MeterReadings", "refused", stranger, "needs role readings-reader") in entries
    assert ("authenticate", "success", stranger, "amqp user_id") in entries
    assert head_end.amqp.requests.counts["answered"] == 1
