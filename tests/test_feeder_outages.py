"""Low-voltage network monitoring: a burst of outage alarms from one feeder makes one summarised
feeder-outage EndDeviceEvent, its restoration one feeder-restored event, each stored once with
its outbox row; over the broker the summary reaches a DMS bound by its own routing key."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from lxml import etree
from sqlalchemy import select
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes import xsd
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.engine.events import EventStore
from cimhes.engine.feeder_outages import (
    FeederEventRecord,
    FeederOutageDetector,
    FeederOutageSettings,
)
from cimhes.engine.inventory import Inventory
from cimhes.engine.store import OutboxMessage, Store, StoreRunner
from cimhes.fixtures.alarm_storm import StormMeters
from cimhes.fixtures.dms import declare_dms_queue
from cimhes.queue.connection import BrokerConnection, ReconnectPolicy
from cimhes.queue.events import EventRelay

from .brokers import amqp_vhost, take  # noqa: F401 (fixture)

UTC = timezone.utc
T0 = datetime(2026, 8, 3, 17, 0, tzinfo=UTC)
DOWN, UP = "3.26.38.85", "3.26.38.49"


def network_inventory(f1=8, f2=3):
    """Meters 1..f1 on feeder F1 (two transformers), the next f2 on F2, one with no position."""
    entries = StormMeters(f1 + f2 + 1).inventory()["meters"]
    for i, entry in enumerate(entries[:f1]):
        entry.update(feeder="F1", transformer=f"T1-{i % 2}")
    for entry in entries[f1:f1 + f2]:
        entry.update(feeder="F2", transformer="T2-0")
    return Inventory.from_json({"meters": entries}), [e["mrid"] for e in entries]


def events(mrids, event_type, start, step=timedelta(seconds=2)):
    return [EndDeviceEvent(m, start + i * step, event_type, f"0.0.99.98.0.255:{i}",
                           "power down" if event_type == DOWN else "power up")
            for i, m in enumerate(mrids)]


def summaries(store):
    with store.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(select(
            FeederEventRecord.feeder, FeederEventRecord.kind, FeederEventRecord.episode,
            FeederEventRecord.meters).order_by(FeederEventRecord.id))]


def outbox_keys(store):
    with store.engine.connect() as connection:
        return [k.removeprefix("EndDeviceEvents ") for k in connection.execute(
            select(OutboxMessage.kind).order_by(OutboxMessage.id)).scalars()]


def test_the_inventory_takes_each_meters_transformer_and_feeder():
    inventory, _ = network_inventory()
    assert [(d.feeder, d.transformer) for d in inventory.devices[:2]] == [("F1", "T1-0"),
                                                                          ("F1", "T1-1")]
    assert inventory.devices[-1].feeder is None
    entry = StormMeters(1).inventory()["meters"][0]
    with pytest.raises(ValueError, match="feeder must be a name"):
        Inventory.from_json({"meters": [{**entry, "feeder": ""}]})
    with pytest.raises(ValueError, match="unknown keys"):
        Inventory.from_json({"meters": [{**entry, "substation": "S1"}]})


def test_a_burst_of_outages_on_one_feeder_makes_one_summary_and_its_restoration_another(
        database_url):
    inventory, mrids = network_inventory()
    store = Store(database_url)
    try:
        store.load_inventory(inventory)
        saved = EventStore(store, feeders=FeederOutageDetector(FeederOutageSettings(5, timedelta(seconds=60))))
        f1, f2 = mrids[:8], mrids[8:11]
        # Four F1 meters and the F2 ones: below the threshold, no summary.
        saved.save_events(events(f1[:4], DOWN, T0) + events(f2, DOWN, T0), "push", T0)
        assert summaries(store) == []
        # The fifth F1 meter within the minute: one feeder outage; the rest add nothing.
        saved.save_events(events(f1[4:5], DOWN, T0 + timedelta(seconds=20)), "push", T0)
        saved.save_events(events(f1[5:], DOWN, T0 + timedelta(seconds=25)), "push", T0)
        assert summaries(store) == [("F1", "outage", 1, 5)]
        # The same events again (a log read after the pushes): stored once, nothing new.
        assert saved.save_events(events(f1[:4], DOWN, T0), "log", T0) == 0
        assert summaries(store) == [("F1", "outage", 1, 5)]
        # Power back on all eight: one restoration.
        back = T0 + timedelta(minutes=30)
        saved.save_events(events(f1, UP, back), "push", back)
        assert summaries(store) == [("F1", "outage", 1, 5), ("F1", "restore", 1, 8)]
        # A second outage, later: the next episode.
        again = T0 + timedelta(hours=2)
        saved.save_events(events(f1[2:7], DOWN, again), "push", again)
        assert summaries(store)[-1] == ("F1", "outage", 2, 5)
        keys = outbox_keys(store)
        assert keys.count("feeder-outage.critical.F1") == 2
        assert keys.count("feeder-restore.info.F1") == 1
        assert not any("F2" in k for k in keys)
        assert len(keys) == 4 + 3 + 1 + 3 + 1 + 8 + 1 + 5 + 1  # every meter event, and 3 summaries
    finally:
        store.close()


def test_outages_spread_wider_than_the_window_make_no_summary(tmp_path):
    inventory, mrids = network_inventory()
    store = Store(f"sqlite:///{tmp_path / 'spread.sqlite'}")
    try:
        store.load_inventory(inventory)
        saved = EventStore(store, feeders=FeederOutageDetector(FeederOutageSettings(3, timedelta(seconds=10))))
        saved.save_events(events(mrids[:6], DOWN, T0, step=timedelta(seconds=6)), "push", T0)
        assert summaries(store) == []  # never 3 meters within 10 s
        saved.save_events(events(mrids[6:8], DOWN, T0 + timedelta(seconds=31)), "push", T0)
        assert summaries(store) == [("F1", "outage", 1, 4)]  # 24, 30, 31 and 33 s
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_the_feeder_outage_reaches_the_dms_on_its_own_routing_key(tmp_path, amqp_vhost):
    inventory, mrids = network_inventory()
    store = Store(f"sqlite:///{tmp_path / 'feeder.sqlite'}")
    store.load_inventory(inventory)
    runner = StoreRunner(reactor, store)
    url = amqp_vhost.url
    await deferToThread(declare_dms_queue, url, "dms.feeders", ["feeder-outage.#",
                                                                "feeder-restore.#"])
    connection = BrokerConnection(reactor, url, ReconnectPolicy(0.2, 1.0, 2.0))
    EventRelay(reactor, connection, runner)
    connection.start()
    try:
        saved = EventStore(store)  # the defaults: 5 meters within 60 s
        await runner.call(saved.save_events, events(mrids[:8], DOWN, T0), "push", T0)
        back = T0 + timedelta(minutes=5)
        await runner.call(saved.save_events, events(mrids[:8], UP, back), "push", back)
        received = await deferToThread(take, url, "dms.feeders", 2)
        assert [m.routing_key for m, _p, _b in received] == ["feeder-outage.critical.F1",
                                                            "feeder-restore.info.F1"]
        outage = etree.fromstring(received[0][2])
        xsd.schema("EndDeviceEventsMessage.xsd").assertValid(outage)
        [event] = outage.findall(".//{*}EndDeviceEvent")
        assert event.find("{*}EndDeviceEventType").get("ref") == DOWN
        assert event.findtext("{*}Assets/{*}mRID") == "F1"
        details = {d.findtext("{*}name"): d.findtext("{*}value")
                   for d in event.findall("{*}EndDeviceEventDetails")}
        assert details["meters"] == "8" and details["transformers"] == "T1-0,T1-1"
        assert event.findtext("{*}createdDateTime").startswith("2026-08-03T17:00:00")
        assert len(await deferToThread(take, url, "dms.feeders", 1, 1.0)) == 0  # once each
    finally:
        await connection.stop()
        runner.stop()
        store.close()
