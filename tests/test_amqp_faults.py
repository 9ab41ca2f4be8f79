"""Alarms to the DMS survive faults, over a RabbitMQ node of the test's own (tests/brokers.py
`own_broker`): the broker stopped (`rabbitmqctl stop_app`) and started again in the middle of an
alarm storm pushed to the push listener, and the cimhes process killed (SIGKILL) mid-storm and
started again. Each time the DMS consumer receives every alarm (the kill: every alarm the storm
simulator sent, by meter and time, those the killed process had read coming back from the push
journal and those the kernel had taken but it never read from the meters' event logs), any
duplicate carrying the same MessageID and body. Counts are printed (pytest -s shows them).

STORM_ALARMS (default 5,000) is the storm's size; bench/amqp.py runs 10,000.
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone

import pytest
import pytest_twisted
from sqlalchemy import func, select
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.push_listener import PushListenerFactory
from cimhes.engine.events import EventStore
from cimhes.engine.push import PushIntake
from cimhes.engine.store import EndDeviceEventRecord, Store, StoreRunner
from cimhes.fixtures.alarm_storm import AlarmStorm, StormMeters
from cimhes.fixtures.dms import DmsConsumer, declare_dms_queue
from cimhes.queue.connection import BrokerConnection, ReconnectPolicy
from cimhes.queue.events import EventRelay, pending_count

from .brokers import own_broker  # noqa: F401 (fixture)

UTC = timezone.utc
START = datetime(2026, 7, 1, 4, 0, tzinfo=UTC)
STORM_ALARMS = int(os.environ.get("CIMHES_TEST_STORM_ALARMS", "5000"))
STORM_METERS = 1000
FAST = ReconnectPolicy(first=0.2, most=1.0, connect_timeout=2.0)


def wait(seconds):
    waiting = Deferred()
    reactor.callLater(seconds, waiting.callback, None)
    return waiting


async def taken(intake, count, timeout=30.0):
    """Wait until the listener took and stored ``count`` events (a sender's close comes before
    the listener has read everything)."""
    deadline = time.monotonic() + timeout
    while intake.counts["events stored"] < count and time.monotonic() < deadline:
        await wait(0.1)
    await intake.idle()


def stored_keys(store) -> set:
    from cimhes.engine.store import Device

    with store.engine.connect() as connection:
        return {(mrid, at.astimezone(UTC)) for mrid, at in connection.execute(
            select(Device.mrid, EndDeviceEventRecord.created_at).join(
                Device, Device.id == EndDeviceEventRecord.device_id))}


def stored_events(store) -> int:
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(EndDeviceEventRecord)).scalar()


def logged_events(store) -> int:
    """Power-up events stored from an event log read (not from a push)."""
    with store.engine.connect() as connection:
        return sum(1 for details, kind in connection.execute(select(
            EndDeviceEventRecord.details, EndDeviceEventRecord.event_type))
            if (details or {}).get("receivedBy") == "log" and kind == "3.26.38.49")


def check_delivery(consumer: DmsConsumer, stored: int, what: str) -> None:
    ids = [m[0] for m in consumer.messages]
    print(f"{what}: {stored} alarms stored, {len(ids)} messages received by the DMS, "
          f"{len(set(ids))} distinct MessageIDs, {len(ids) - len(set(ids))} duplicates, "
          f"DMS reconnections {consumer.reconnections}")
    assert len(set(ids)) == stored
    assert consumer.duplicates_differ() == []


@pytest_twisted.ensureDeferred
async def test_an_alarm_storm_survives_the_broker_stopped_and_started(tmp_path, own_broker):
    meters = StormMeters(STORM_METERS)
    devices = [DeviceAddress.from_inventory(m) for m in meters.inventory()["meters"]]
    store = Store(f"sqlite:///{tmp_path / 'storm.sqlite'}")
    store.load_inventory(devices)
    runner = StoreRunner(reactor, store)
    intake = PushIntake(runner, EventStore(store), devices, now=lambda: START)
    listening = reactor.listenTCP(0, PushListenerFactory(reactor, intake), backlog=1024,
                                 interface="127.0.0.1")
    url = own_broker.url
    queue = f"dms.storm.{os.getpid()}"
    await deferToThread(declare_dms_queue, url, queue, ["restore.#"])
    consumer = DmsConsumer(url, queue).start()
    connection = BrokerConnection(reactor, url, FAST)
    relay = EventRelay(reactor, connection, runner)
    connection.start()
    storm = AlarmStorm(reactor, meters, STORM_ALARMS, START, port=listening.getHost().port)
    faults = []

    def mid_storm(sent):
        if not faults and sent >= STORM_ALARMS * 2 // 5:
            faults.append(("stopped", sent, relay.counts["published"]))
            return deferToThread(own_broker.stop_app)
        if len(faults) == 1 and sent >= STORM_ALARMS * 3 // 5:
            faults.append(("started", sent, relay.counts["published"]))
            return deferToThread(own_broker.start_app)
        return None

    try:
        await connection.connected()
        started = time.monotonic()
        await storm.run(mid_storm)
        await taken(intake, STORM_ALARMS)
        stored = stored_events(store)
        assert stored == STORM_ALARMS, dict(intake.counts)
        assert await deferToThread(consumer.wait_for, stored, 45.0), consumer.distinct()
        print(f"broker stop_app/start_app mid-storm: {faults} (fault, pushes sent, published); "
              f"{storm.retries} push retries; relay {relay.counts}; broker connections opened "
              f"{connection.opened}; {time.monotonic() - started:.1f} s")
        await wait(1.0)  # a late duplicate, if any, arrives too
        check_delivery(consumer, stored, "broker stopped mid-storm")
        assert connection.opened >= 2  # the broker went away, the relay reconnected by itself
        assert pending_count(store) == 0
    finally:
        consumer.stop()
        await connection.stop()
        await listening.stopListening()
        runner.stop()
        store.close()


def _serve(tmp_path, inventory, push_port, amqp_url):
    from .test_cli import _start

    return _start("serve", "--inventory", str(inventory), "--port", "0",
                  "--db", str(tmp_path / "serve.sqlite"), "--amqp-url", amqp_url,
                  "--push-host", PUSH_HOST, "--push-port", str(push_port))


PUSH_HOST = "127.0.23.253"
# The killed process's storm comes from simulated meters that also answer DLMS (their event logs
# are read back at the restart): meters 5589.. listen on 127.0.23.1.. (this file's range).
KILLED_METERS, FIRST_KILLED_METER = 250, 5589


def received_alarms(consumer: DmsConsumer) -> dict:
    """(mRID, createdDateTime) of each alarm the DMS received -> its MessageIDs."""
    from lxml import etree

    alarms: dict = {}
    for message_id, _key, body, _at in consumer.messages:
        for event in etree.fromstring(body).iterfind(".//{*}EndDeviceEvent"):
            created = datetime.fromisoformat(
                event.findtext("{*}createdDateTime").replace("Z", "+00:00")).astimezone(UTC)
            alarms.setdefault((event.findtext("{*}Assets/{*}mRID"), created), set()).add(
                message_id)
    return alarms


@pytest_twisted.ensureDeferred
async def test_an_alarm_storm_survives_cimhes_killed_and_started_again(tmp_path, own_broker):
    import json
    import signal

    from .brokers import _free_port
    from .test_cli import _stop

    from datetime import timedelta

    from cimhes.fixtures.fleet import start_fleet

    fleet = start_fleet(reactor, KILLED_METERS, clock=lambda: datetime.now(UTC), port=0,
                        base_index=FIRST_KILLED_METER)
    meters = StormMeters(KILLED_METERS, first=FIRST_KILLED_METER)
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps(fleet.inventory()))
    # Each pushed power up is also in its meter's standard and power failure logs from the
    # moment it is pushed, as a meter records it (event times of the last minute, so the
    # head-end's own clock has passed them).
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60)
    url = own_broker.url
    queue = f"dms.killed.{os.getpid()}"
    await deferToThread(declare_dms_queue, url, queue, ["restore.#"])
    consumer = DmsConsumer(url, queue).start()
    push_port = _free_port(PUSH_HOST)
    first, ready = await deferToThread(_serve, tmp_path, inventory, push_port, url)
    assert ready["push"] == {"host": PUSH_HOST, "port": push_port, "replayed": 0}
    processes = [first]
    index = {m.mrid: k for k, m in enumerate(meters.meters, FIRST_KILLED_METER)}
    storm = AlarmStorm(reactor, meters, STORM_ALARMS, start, host=PUSH_HOST, port=push_port,
                       happened=lambda mrid, at: fleet.state(index[mrid]).outage(
                           at - timedelta(seconds=1), at))
    restarted: list[Deferred] = []
    kill = {}

    def mid_storm(sent):
        if not restarted and sent >= STORM_ALARMS * 2 // 5:
            kill.update(sent=sent, received=consumer.distinct())
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            # The storm goes on while cimhes starts again: pushes are refused, meters retry.
            again = deferToThread(_serve, tmp_path, inventory, push_port, url)
            again.addCallback(lambda started: processes.append(started[0]) or started)
            restarted.append(again)

    try:
        started = time.monotonic()
        await storm.run(mid_storm)
        _second, second_ready = await restarted[0]
        replayed = second_ready["push"]["replayed"]
        recovery = second_ready["push"]["recovery"]
        sent = {(mrid, at) for mrid, at, _apdu in storm.pushes}
        store = Store(f"sqlite:///{tmp_path / 'serve.sqlite'}")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # every stored alarm reached the DMS
                received = received_alarms(consumer)
                # Every alarm sent received, and the outbox drained too (the events read back
                # from the meters' logs are published after the alarms sent): under load the
                # relay can still be at work when the last alarm sent has arrived.
                if pending_count(store) == 0 and (
                        sent <= received.keys() or (time.monotonic() - started > 40 and
                                                    consumer.distinct() >= stored_events(store))):
                    break
                await wait(0.5)
            await wait(1.0)  # a late duplicate, if any, arrives too
            stored = stored_events(store)
            pending = pending_count(store)
            from_logs = logged_events(store)
        finally:
            store.close()
        received = received_alarms(consumer)
        missing = sent - received.keys()
        ids = [m[0] for m in consumer.messages]
        print(f"cimhes SIGKILLed after {kill['sent']} pushes sent ({kill['received']} alarms at "
              f"the DMS then), started again: {storm.retries} push retries while it was down; "
              f"{replayed} pushes replayed from the journal (read by the killed process, not "
              f"committed); recovery {recovery} read back {from_logs} power-up events from the "
              f"meters' logs; sent {len(sent)} alarms, received by the DMS {len(received)} "
              f"distinct alarms in {len(ids)} messages ({len(set(ids))} distinct MessageIDs, "
              f"{len(ids) - len(set(ids))} duplicates); {stored} events stored (the logs' power "
              f"downs and failures too); never received "
              f"{len(missing)}; "
              f"{pending} outbox rows left; {time.monotonic() - started:.1f} s")
        assert consumer.duplicates_differ() == []
        # A duplicate is only ever the same message again: one MessageID per alarm.
        assert [key for key, message_ids in received.items() if len(message_ids) > 1] == []
        assert pending == 0
        assert recovery["meters"] == KILLED_METERS  # every meter pushed in the last minutes
        # What the journal cannot save (pushes the kernel took and the killed process never
        # read) came back from the meters' logs: every alarm sent reached the DMS, once.
        assert not missing, f"{len(missing)} sent alarms never reached the DMS"
    finally:
        consumer.stop()
        for process in processes:
            if process.poll() is None:
                _stop(process)
        await fleet.stop_all()
