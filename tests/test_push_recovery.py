"""The push recovery's rule (engine/push_recovery.py): which meters are read back after an
unclean stop (those that pushed in the lookback before the last committed push, and their
feeders' other meters), and that an event read from a log is stored only when no event of the
same meter, time and type is. The whole path, with a SIGKILL mid-storm and meters answering
DLMS, is tests/test_amqp_faults.py."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.engine.events import EventStore
from cimhes.engine.inventory import Inventory
from cimhes.engine.push_recovery import plan, store_unknown
from cimhes.engine.store import Store
from cimhes.fixtures.alarm_storm import StormMeters

UTC = timezone.utc
T = datetime(2026, 8, 3, 17, 0, tzinfo=UTC)  # the last committed push
UP = "3.26.38.49"


def power_up(mrid, at, code="0.0.97.98.0.255:2"):
    return EndDeviceEvent(mrid, at, UP, code, "power up")


def test_the_recent_pushers_and_their_feeder_mates_are_read_back(tmp_path):
    entries = StormMeters(6).inventory()["meters"]
    for entry, feeder in zip(entries, ["F1", "F1", "F1", "F2", None, None]):
        if feeder:
            entry.update(feeder=feeder, transformer=f"T-{feeder}")
    a, b, c, d, e, f = (entry["mrid"] for entry in entries)
    store = Store(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        store.load_inventory(Inventory.from_json({"meters": entries}))
        events = EventStore(store)
        events.save_events([power_up(a, T)], "push", T - timedelta(seconds=30))  # recent push
        events.save_events([power_up(e, T)], "push", T - timedelta(minutes=1))  # no feeder
        events.save_events([power_up(d, T)], "log", T)  # read from a log, not pushed
        events.save_events([power_up(f, T)], "push", T - timedelta(minutes=20))  # too long ago
        chosen = plan(store, T, T + timedelta(minutes=2), lookback=timedelta(minutes=10))
        assert chosen.mrids == [a, e, b, c]  # most recent pusher first, then a's feeder mates
        assert (chosen.since, chosen.until, chosen.skipped) == (
            T - timedelta(minutes=10), T + timedelta(minutes=2), 0)
        capped = plan(store, T, T, lookback=timedelta(minutes=10), max_meters=2)
        assert (capped.mrids, capped.skipped) == ([a, e], 2)
    finally:
        store.close()


def test_a_logged_power_up_already_pushed_is_not_stored_again(tmp_path):
    entries = StormMeters(1).inventory()["meters"]
    mrid = entries[0]["mrid"]
    store = Store(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        store.load_inventory(Inventory.from_json({"meters": entries}))
        events = EventStore(store)
        events.save_events([power_up(mrid, T)], "push", T)
        read = [power_up(mrid, T, "0.0.99.98.0.255:2"),  # the same alarm, from the log
                power_up(mrid, T + timedelta(seconds=5), "0.0.99.98.0.255:2")]  # lost push
        assert store_unknown(events, store, read, T) == (1, 1)
        assert [e.created for e, _how in events.events(mrid)] == [T, T + timedelta(seconds=5)]
        assert store_unknown(events, store, read, T) == (0, 2)  # read again: nothing new
    finally:
        store.close()
