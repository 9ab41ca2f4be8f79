"""CreatedEndDeviceEvents published to an MDM subscriber: every event stored (from a meter's
log, through GetEndDeviceEvents DataSource=meter, or pushed) gets its outbox row in its own
transaction and is posted with zeep through ReceiveEndDeviceEvents to a real SOAP endpoint; a
subscriber that is down keeps them pending (retried with backoff), they are delivered once it
is back, and after a restart of the head-end."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from spyne import AnyXml, ServiceBase, rpc
from sqlalchemy import select
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes import xsd
from cimhes.cim.codec.end_device_events import (
    decode_created_end_device_events,
    encode_events_response,
)
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_events import EVENT_LOGS
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.engine.store import OutboxMessage

from .credentials import add_test_user, zeep_client
from .schemas import _compiled, reference

UTC = timezone.utc
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=UTC)
START = NOW - timedelta(days=4)
FIRST_METER = 291
EVENTS_MESSAGE = ("connexo", "comu-outbound", "enddeviceevents", "xsd", "EndDeviceEventsMessage.xsd")


class _TrackingSite(Site):
    """A Site that knows its open connections."""

    def __init__(self, resource):
        super().__init__(resource)
        self.channels = set()

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        lost = channel.connectionLost

        def connection_lost(reason):
            self.channels.discard(channel)
            return lost(reason)

        channel.connectionLost = connection_lost
        return channel


class Subscriber:
    """An MDM's ReceiveEndDeviceEvents on a port of its own, which can go down and come back."""

    def __init__(self):
        self.received: list[tuple[Header, tuple[EndDeviceEvent, ...]]] = []
        receiver = self

        class ReceiveEndDeviceEventsService(ServiceBase):
            @rpc(AnyXml, _body_style="bare", _in_message_name="CreatedEndDeviceEvents",
                 _returns=AnyXml, _operation_name="CreatedEndDeviceEvents")
            def CreatedEndDeviceEvents(ctx, element):
                return receiver.take(element)

        root, folder = Resource(), Resource()
        root.putChild(b"mdm", folder)
        folder.putChild(b"ReceiveEndDeviceEvents", SoapResource(
            soap_application(ReceiveEndDeviceEventsService,
                             tns="http://iec.ch/TC57/2011/EndDeviceEventsMessage",
                             name="ReceiveEndDeviceEvents"), "ReceiveEndDeviceEvents.wsdl"))
        self.site = _TrackingSite(root)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.url = f"http://127.0.0.1:{self.number}/mdm/ReceiveEndDeviceEvents"

    def take(self, element):
        xsd.schema("EndDeviceEventsMessage.xsd").assertValid(element)
        _compiled(reference(*EVENTS_MESSAGE)).assertValid(element)
        header, events = decode_created_end_device_events(element)
        self.received.append((header, events))
        return encode_events_response(Header(verb=Verb.REPLY, noun="EndDeviceEvents",
                                             correlation_id=header.message_id),
                                      Reply(ReplyResult.OK))

    def events(self) -> set[tuple[str, str, datetime]]:
        return {(e.device_mrid, e.device_code, e.created) for _, batch in self.received
                for e in batch}

    def down(self):
        """Stop listening and drop the open connections (a kept-alive one would still answer)."""
        for channel in list(self.site.channels):
            # twisted.web's protocol is a proxy; the HTTPChannel behind it has the transport.
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.abortConnection()
        return self.port.stopListening()

    def up(self) -> None:
        self.port = reactor.listenTCP(self.number, self.site, interface="127.0.0.1")


@pytest.fixture
def fleet():
    from cimhes.fixtures.fleet import start_fleet
    fleet = start_fleet(reactor, 2, clock=lambda: NOW, base_index=FIRST_METER, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def subscriber():
    subscriber = Subscriber()
    yield subscriber
    if subscriber.port.connected:
        pytest_twisted.blockon(subscriber.down())


@pytest.fixture
def make_head_end(tmp_path, fleet, subscriber):
    running = []

    def make():
        head_end = HeadEnd(reactor, HeadEndSettings(
            database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
            secret_key_file=str(tmp_path / "secret.key"), publish_first_retry=0.2,
            event_subscribers=(("mdm", subscriber.url),)),
            [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
        add_test_user(head_end)
        head_end.event_publisher.start()
        port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
        head_end.base_url = f"http://127.0.0.1:{port.getHost().port}"
        running.append((head_end, port))
        return head_end

    @defer.inlineCallbacks
    def stop(head_end):
        for entry in [r for r in running if r[0] is head_end]:
            running.remove(entry)
            head_end.event_publisher.stop()
            head_end.publisher.stop()
            yield entry[1].stopListening()
            head_end.store_runner.stop()
            head_end.store.close()

    make.stop = stop
    yield make
    for head_end, _ in list(running):
        pytest_twisted.blockon(stop(head_end))


def _pending(store) -> list[tuple[int, str | None]]:
    with store.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(
            select(OutboxMessage.attempts, OutboxMessage.last_error).where(
                OutboxMessage.destination == "mdm-events:mdm",
                OutboxMessage.published_at.is_(None)))]


def _read_logs(base_url, mrid):
    client = zeep_client(f"{base_url}/cim/GetEndDeviceEvents?wsdl")
    return client.service.GetEndDeviceEvents(
        Header={"Verb": "get", "Noun": "EndDeviceEvents"},
        Request={"Option": [{"name": "DataSource", "value": "meter"}],
                 "GetEndDeviceEvents": {"Meter": [{"mRID": mrid}], "TimeSchedule": [
                     {"scheduleInterval": {"start": START, "end": NOW}}]}})


async def _until(condition, timeout=30.0, state=lambda: ""):
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, f"not within the time limit: {state()}"
        await task.deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_events_reach_the_subscriber_after_an_outage_and_after_a_restart(
        make_head_end, subscriber, fleet):
    a, b = (m["mrid"] for m in fleet.inventory()["meters"])
    head_end = make_head_end()
    await subscriber.down()

    # Read from a meter's logs while the subscriber is down: kept, retried with backoff.
    reply = await deferToThread(_read_logs, head_end.base_url, a)
    assert reply.Reply.Result == "OK"
    read = {(a, f"{log.obis}:{code}" if not log.is_power_failure else
             f"{log.obis}:long power failure", at)
            for log in EVENT_LOGS.values()
            for at, code in fleet.state(FIRST_METER).events(log.obis, START, NOW)}
    assert len(read) > 3
    await _until(lambda: any(attempts >= 2 for attempts, _ in _pending(head_end.store)))
    assert all("Connection" in error or "refused" in error
               for _, error in _pending(head_end.store))
    assert subscriber.received == []

    subscriber.up()
    await _until(lambda: subscriber.events() == read and not _pending(head_end.store))

    # Down again; events pushed meanwhile (the push intake's path) wait; the head-end stops.
    await subscriber.down()
    pushed = [EndDeviceEvent(b, NOW - timedelta(minutes=m), "3.12.29.212",
                             f"{EVENT_LOGS['fraud'].obis}:40", "terminal cover removed")
              for m in (1, 2)]
    stored = await head_end.store_runner.call(head_end.events.save_events, pushed, "push", NOW)
    assert stored == 2
    await _until(lambda: any(attempts >= 1 for attempts, _ in _pending(head_end.store)),
                 state=lambda: (_pending(head_end.store), len(subscriber.received)))
    await make_head_end.stop(head_end)

    subscriber.up()
    restarted = make_head_end()
    want = read | {(e.device_mrid, e.device_code, e.created) for e in pushed}
    await _until(lambda: subscriber.events() == want and not _pending(restarted.store))
    # Each event was posted once: no batch was delivered twice.
    assert sum(len(batch) for _, batch in subscriber.received) == len(want)
