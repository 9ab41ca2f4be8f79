"""Alarms to the DMS over a real RabbitMQ broker: a simulated meter's alarm push reaches a DMS
queue bound by routing key as a schema-valid EventMessage; with the broker unreachable alarms
wait in the outbox and all arrive once it is back; a storm survives its connection being closed."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pika
import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from cimhes import xsd
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.drivers import DeviceAddress
from cimhes.endpoints.push_listener import PushListenerFactory
from cimhes.engine.events import EventStore
from cimhes.engine.push import PushIntake
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import start_fleet
from cimhes.fixtures.push import alarm_body, data_notification, send
from cimhes.queue.connection import BrokerConnection, ReconnectPolicy
from cimhes.queue.events import EventRelay, pending_count
from cimhes.queue.topology import EVENTS_EXCHANGE, EVENTS_UNROUTED

from .brokers import amqp_vhost, rabbitmqctl, take  # noqa: F401 (fixture)

UTC = timezone.utc
NOW = datetime(2026, 6, 15, 12, 7, 30, tzinfo=UTC)
FAST = ReconnectPolicy(first=0.2, most=1.0, connect_timeout=2.0)
MSG = "http://iec.ch/TC57/2011/schema/message"


def wait(seconds):
    waiting = Deferred()
    reactor.callLater(seconds, waiting.callback, None)
    return waiting


def dms_queue(url, name, *bindings):
    """A DMS's durable queue on cimhes.events bound by ``bindings`` (blocking; in a thread)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(EVENTS_UNROUTED, "fanout", durable=True)
    channel.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True,
                             arguments={"alternate-exchange": EVENTS_UNROUTED})
    channel.queue_declare(name, durable=True)
    for key in bindings:
        channel.queue_bind(name, EVENTS_EXCHANGE, routing_key=key)
    connection.close()


@pytest.fixture
def site(tmp_path):
    fleet = start_fleet(reactor, 1, clock=lambda: NOW, port=0, base_index=52)
    devices = [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]]
    store = Store(f"sqlite:///{tmp_path / 'events.sqlite'}")
    store.load_inventory(devices)
    runner = StoreRunner(reactor, store)
    events = EventStore(store)
    intake = PushIntake(runner, events, devices, now=lambda: NOW)
    port = reactor.listenTCP(0, PushListenerFactory(reactor, intake), interface="127.0.0.1")
    yield {"store": store, "runner": runner, "events": events, "intake": intake,
           "device": devices[0], "port": port.getHost().port}
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(fleet.stop_all())
    runner.stop()
    store.close()


def start_relay(site, url):
    connection = BrokerConnection(reactor, url, FAST)
    relay = EventRelay(reactor, connection, site["runner"])
    connection.start()
    return connection, relay


@pytest_twisted.ensureDeferred
async def test_an_alarm_push_reaches_the_dms_queue_bound_by_routing_key(site, amqp_vhost):
    url = amqp_vhost.url
    await deferToThread(dms_queue, url, "dms.restore", "restore.#")
    await deferToThread(dms_queue, url, "dms.tamper", "tamper.*.#")
    connection, relay = start_relay(site, url)
    try:
        device = site["device"]
        bits = 1 << 2 | 1 << 13 | 1 << 1  # power up, fraud attempt, replace battery
        await send(reactor, "127.0.0.1", site["port"], [data_notification(
            alarm_body(device.name, bits), NOW)])
        [(method, props, body)] = await deferToThread(take, url, "dms.restore", 1)
        assert method.routing_key == "restore.info.3.26.38.49"
        assert props.delivery_mode == 2
        message = etree.fromstring(body)
        xsd.schema("EndDeviceEventsMessage.xsd").assertValid(message)
        assert message.findtext(f"{{*}}Header/{{{MSG}}}Verb") == "created"
        assert message.findtext(f"{{*}}Header/{{{MSG}}}Noun") == "EndDeviceEvents"
        assert message.findtext(f"{{*}}Header/{{{MSG}}}MessageID") == props.message_id
        assert message.findtext(".//{*}Assets/{*}mRID") == device.mrid
        assert message.find(".//{*}EndDeviceEventType").get("ref") == "3.26.38.49"
        [(method, _props, _body)] = await deferToThread(take, url, "dms.tamper", 1)
        assert method.routing_key == "tamper.major.3.12.43.257"
        # The battery alarm matched no DMS binding: kept by the alternate exchange, not dropped.
        [(method, _props, body)] = await deferToThread(take, url, EVENTS_UNROUTED, 1)
        assert method.routing_key == "diagnostics.info.3.2.0.85"
        for _ in range(50):
            if pending_count(site["store"]) == 0:
                break
            await wait(0.1)
        assert pending_count(site["store"]) == 0
    finally:
        await connection.stop()


def outage_events(device, count, start=NOW):
    return [EndDeviceEvent(device.mrid, start + timedelta(seconds=i), "3.26.38.85",
                           f"0.0.99.98.1.255:1:{i}", "power down") for i in range(count)]


@pytest_twisted.ensureDeferred
async def test_with_the_broker_unreachable_alarms_wait_in_the_outbox_and_all_arrive_later(
        site, amqp_vhost):
    url = amqp_vhost.url
    await deferToThread(dms_queue, url, "dms.outages", "outage.critical.#")
    closed = f"amqp://guest:secret-pw@127.18.0.1:1/{amqp_vhost.name}"  # nothing listens there
    down, _relay = start_relay(site, closed)
    await wait(0.5)
    stored = await site["runner"].call(site["events"].save_events,
                                       outage_events(site["device"], 300), "push", NOW)
    await wait(1.0)
    assert stored == 300
    assert down.state in ("connecting", "disconnected")
    assert "secret-pw" not in str(down.health())
    assert pending_count(site["store"]) == 300  # nothing lost, nothing sent
    await down.stop()
    up, relay = start_relay(site, url)
    try:
        received = await deferToThread(take, url, "dms.outages", 300)
        ids = [props.message_id for _m, props, _b in received]
        print(f"broker back: {len(received)} of 300 alarms received, {len(set(ids))} distinct")
        assert len(received) == 300 and len(set(ids)) == 300
    finally:
        await up.stop()


@pytest_twisted.ensureDeferred
async def test_a_storm_survives_its_connection_being_closed(site, amqp_vhost):
    url = amqp_vhost.url
    total = 5000
    await deferToThread(dms_queue, url, "dms.storm", "outage.#")
    connection, relay = start_relay(site, url)
    try:
        await connection.connected()
        stored = 0
        for batch in range(10):
            stored += await site["runner"].call(site["events"].save_events, outage_events(
                site["device"], total // 10, NOW + timedelta(hours=batch)), "push", NOW)
            if batch == 4:  # mid-storm: the broker closes our connections (this vhost's only)
                await deferToThread(rabbitmqctl, "close_all_connections", "--vhost",
                                    amqp_vhost.name, "test: connection closed mid-storm")
        assert stored == total
        received = await deferToThread(take, url, "dms.storm", 2 * total, 10.0)
        ids = [props.message_id for _m, props, _b in received]
        bodies = {}
        for _m, props, body in received:
            assert bodies.setdefault(props.message_id, body) == body  # a duplicate is the same
        print(f"storm: {total} alarms, {len(received)} received, {len(set(ids))} distinct, "
              f"{len(received) - len(set(ids))} duplicates, relay {relay.counts}, connections opened {connection.opened}")
        assert len(set(ids)) == total
        assert connection.opened >= 2  # it was closed, and reconnected by itself
        assert pending_count(site["store"]) == 0
    finally:
        await connection.stop()
