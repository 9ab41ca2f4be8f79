"""The store on SQLite and on a real PostgreSQL server: readings stored once however often they
are read, a corrected value replacing the old one with a trace, in bulk; events kept once and
reported through the outbox in the same transaction."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from lxml import etree
from sqlalchemy import select, update
from sqlalchemy.exc import DataError

from cimhes.cim.meter_readings import DeviceRef, IntervalBlock, IntervalReading, MeterReading, Reading
from cimhes.drivers import DeviceAddress
from cimhes.cim.end_device_events import EndDeviceEvent
from cimhes.engine import event_outbox
from cimhes.engine.events import EventStore
from cimhes.engine.store import (
    EndDeviceEventRecord,
    OutboxEntry,
    OutboxMessage,
    ReadingCorrection,
    ReadingRecord,
    Store,
)

UTC = timezone.utc
END = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
REGISTER = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
METERS = [DeviceAddress(mrid=f"00000000-0000-5000-8000-{k:012d}", name=f"M{k}",
                        device_type="idis-meter", host=f"127.13.0.{k}") for k in (1, 2)]


@pytest.fixture
def store(database_url):
    store = Store(database_url)
    store.load_inventory(METERS)
    yield store
    store.close()


def _profile(meter: DeviceAddress, values: list[str], first: int = 0) -> MeterReading:
    intervals = [IntervalReading(END + timedelta(minutes=15 * (first + n)), Decimal(v))
                 for n, v in enumerate(values)]
    return MeterReading(DeviceRef(mrid=meter.mrid), [], [IntervalBlock(PROFILE, intervals)])


def _register(meter: DeviceAddress, value: str, at: datetime) -> MeterReading:
    return MeterReading(DeviceRef(mrid=meter.mrid), [Reading(REGISTER, Decimal(value), at)], [])


def _corrections(store: Store) -> list[tuple]:
    with store.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(
            select(ReadingCorrection.old_value, ReadingCorrection.new_value,
                   ReadingCorrection.old_source, ReadingCorrection.source,
                   ReadingCorrection.old_read_at, ReadingCorrection.corrected_at)
            .order_by(ReadingCorrection.id))]


def test_the_same_intervals_read_twice_are_stored_once(store):
    first = END + timedelta(hours=1)
    store.save_meter_readings([_profile(METERS[0], ["1.5", "2.25", "3"]),
                               _register(METERS[1], "100.125", END)], first)
    # A re-read overlapping the first, with one interval more, in one batch.
    store.save_meter_readings([_profile(METERS[0], ["1.5", "2.25", "3", "4"])],
                              first + timedelta(hours=1))
    store.save_meter_readings([_register(METERS[1], "100.125", END)], first + timedelta(hours=2))

    assert store.stored_values(METERS[0].mrid, PROFILE) == [
        (END + timedelta(minutes=15 * n), Decimal(v)) for n, v in enumerate(["1.5", "2.25", "3", "4"])]
    assert store.stored_values(METERS[1].mrid, REGISTER) == [(END, Decimal("100.125"))]
    assert _corrections(store) == []
    with store.engine.connect() as connection:
        read_at = connection.execute(select(ReadingRecord.read_at).where(
            ReadingRecord.timestamp == END, ReadingRecord.reading_type == PROFILE)).scalar_one()
    assert read_at == first  # an unchanged value is not rewritten


def test_a_corrected_value_replaces_the_old_one_and_keeps_a_trace(store):
    read, corrected = END + timedelta(hours=1), END + timedelta(days=1)
    store.save_meter_readings([_profile(METERS[0], ["1.5", "2.25", "3"])], read)
    store.save_meter_readings([_profile(METERS[0], ["1.5", "2.5", "3"])], corrected,
                              source="push")

    assert [v for _, v in store.stored_values(METERS[0].mrid, PROFILE)] == \
        [Decimal("1.5"), Decimal("2.5"), Decimal("3")]
    assert _corrections(store) == [("2.25", "2.5", "read", "push", read, corrected)]


def test_a_value_changed_by_any_writer_is_traced(store):
    """The trace is the database's own: an UPDATE by hand leaves one too."""
    store.save_meter_readings([_register(METERS[0], "7", END)], END)
    with store.engine.begin() as connection:
        connection.execute(update(ReadingRecord).values(value="8", source="manual",
                                                         read_at=END + timedelta(days=2)))
    assert _corrections(store) == [("7", "8", "read", "manual", END, END + timedelta(days=2))]


def test_a_large_batch_mixing_new_repeated_and_corrected_values(store):
    """One call with 2 x 960 intervals: half already stored (one of those changed), half new."""
    old = [str(n) for n in range(480)]
    store.save_meter_readings([_profile(m, old) for m in METERS], END)
    again = old.copy()
    again[17] = "17.5"
    store.save_meter_readings([_profile(m, again + [str(n) for n in range(480, 960)])
                               for m in METERS], END + timedelta(days=1))
    for meter in METERS:
        values = [v for _, v in store.stored_values(meter.mrid, PROFILE)]
        assert values == [Decimal(v) for v in again] + [Decimal(n) for n in range(480, 960)]
    assert [c[:2] for c in _corrections(store)] == [("17", "17.5"), ("17", "17.5")]


def test_one_batch_giving_the_same_interval_twice_keeps_the_last_value_and_traces_it(store):
    """Two reads of one meter in one batch (two sessions' readings written together): as if
    saved one after the other, the later value replaces the earlier with a trace."""
    store.save_meter_readings([_profile(METERS[0], ["1", "2"]), _profile(METERS[1], ["5"]),
                               _profile(METERS[0], ["1", "2.5", "3"])], END)
    assert [v for _, v in store.stored_values(METERS[0].mrid, PROFILE)] == \
        [Decimal("1"), Decimal("2.5"), Decimal("3")]
    assert [v for _, v in store.stored_values(METERS[1].mrid, PROFILE)] == [Decimal("5")]
    assert [c[:2] for c in _corrections(store)] == [("2", "2.5")]


def test_many_meters_in_one_batch_each_keep_their_own_rows(store):
    """The bulk path (PostgreSQL: COPY into a staging table) keeps device, type, time, value,
    read time and source of every row."""
    meters = [DeviceAddress(mrid=f"00000000-0000-5000-8000-{k:012d}", name=f"B{k}",
                            device_type="idis-meter", host="127.13.0.20") for k in range(10, 40)]
    store.load_inventory(meters)
    read_at = END + timedelta(hours=3, milliseconds=7)
    given = store.save_meter_readings(
        [MeterReading(DeviceRef(mrid=m.mrid), [Reading(REGISTER, Decimal(k) / 8, END)],
                      [IntervalBlock(PROFILE, [IntervalReading(END + timedelta(minutes=15 * n),
                                                              Decimal(f"{k}.{n}"))
                                               for n in range(96)])])
         for k, m in enumerate(meters)], read_at, source="push")
    assert given == 30 * 97
    for k, meter in enumerate(meters):
        assert store.stored_values(meter.mrid, REGISTER) == [(END, Decimal(k) / 8)]
        assert store.stored_values(meter.mrid, PROFILE) == [
            (END + timedelta(minutes=15 * n), Decimal(f"{k}.{n}")) for n in range(96)]
    with store.engine.connect() as connection:
        assert set(connection.execute(select(ReadingRecord.read_at, ReadingRecord.source))) == \
            {(read_at, "push")}


def test_a_batch_the_server_refuses_leaves_nothing_and_the_next_batch_is_stored(store):
    """PostgreSQL refuses a value longer than its column (SQLite does not check lengths): the
    whole batch is rolled back, staging table included, and the next one is stored."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not enforce the value column's length")
    with pytest.raises(DataError, match="too long"):
        store.save_meter_readings([_profile(METERS[0], ["1", "2"]),
                                   _register(METERS[1], "1" * 41, END)], END)
    assert store.stored_values(METERS[0].mrid, PROFILE) == []
    store.save_meter_readings([_profile(METERS[0], ["1", "2"])], END)
    store.save_meter_readings([_profile(METERS[0], ["1", "3"])], END + timedelta(hours=1))
    assert [v for _, v in store.stored_values(METERS[0].mrid, PROFILE)] == \
        [Decimal("1"), Decimal("3")]
    assert [c[:2] for c in _corrections(store)] == [("2", "3")]


def test_readings_of_a_device_not_in_the_inventory_are_refused_and_nothing_is_stored(store):
    stranger = DeviceAddress(mrid="ffffffff-0000-5000-8000-000000000000", name="X",
                             device_type="idis-meter", host="127.13.0.9")
    with pytest.raises(ValueError, match=f"{stranger.mrid}, which is not in the inventory"):
        store.save_meter_readings([_register(METERS[0], "1", END), _register(stranger, "2", END)],
                                  END)
    assert store.stored_values(METERS[0].mrid, REGISTER) == []


EVENT_LOG = "0.0.99.98.0.255"  # the IDIS standard event log
POWER_DOWN = "3.26.38.85"  # EndDeviceEventType: power down
POWER_UP = "3.26.38.49"


def _events(*minutes: int) -> list[EndDeviceEvent]:
    return [EndDeviceEvent(METERS[0].mrid, END + timedelta(minutes=m, milliseconds=250),
                           POWER_DOWN if m % 2 else POWER_UP, f"{EVENT_LOG}:{m}", "",
                           details=(("minute", str(m)),)) for m in minutes]


def _outbox(store: Store) -> list[tuple[str, str]]:
    with store.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(
            select(OutboxMessage.destination, OutboxMessage.payload).order_by(OutboxMessage.id))]


def test_events_fetched_again_are_stored_once_and_reported_once(store):
    events = EventStore(store, subscribers=["mdm-1"])
    assert events.save_events(_events(1, 2, 3), "log", END) == 3
    assert events.save_events(_events(2, 3, 4), "push", END + timedelta(hours=1)) == 1
    assert events.save_events(_events(1, 4), "log", END + timedelta(hours=2)) == 0

    rows = _outbox(store)
    # One row per new event for the DMS, one per batch for the subscriber.
    assert [d for d, _ in rows] == ["dms:amqp"] * 3 + ["mdm-events:mdm-1"] + ["dms:amqp",
                                                                             "mdm-events:mdm-1"]
    batch = etree.fromstring(rows[3][1].encode())
    assert len(batch.findall(".//{*}EndDeviceEvent")) == 3
    with store.engine.connect() as connection:
        stored = connection.execute(select(EndDeviceEventRecord.dlms_code,
                                           EndDeviceEventRecord.details)
                                    .order_by(EndDeviceEventRecord.created_at)).all()
    assert [(code, details["minute"], details["receivedBy"]) for code, details in stored] == [
        (1, "1", "log"), (2, "2", "log"), (3, "3", "log"), (4, "4", "push")]


def test_events_and_the_messages_reporting_them_are_stored_together_or_not_at_all(store,
                                                                                 monkeypatch):
    events = EventStore(store, subscribers=["mdm-1"])

    def broken(*args):
        raise RuntimeError("payload could not be built")

    monkeypatch.setattr(event_outbox, "event_message", broken)
    with pytest.raises(RuntimeError):
        events.save_events(_events(1, 2), "log", END)
    monkeypatch.undo()
    # Nothing was kept: the same events are new again, and reported.
    assert events.save_events(_events(1, 2), "log", END) == 2
    assert len(_outbox(store)) == 3


def test_an_outbox_message_stays_pending_through_failures_until_published(store):
    now = datetime.now(timezone.utc)
    store.add_to_outbox([OutboxEntry("mdm", "MeterReadings.created", "<xml/>")], now)
    (message,) = store.pending_outbox("mdm", now + timedelta(seconds=1))
    store.outbox_failed(message.id, "connection refused " * 100, now + timedelta(minutes=5))
    assert store.pending_outbox("mdm", now + timedelta(minutes=4)) == []
    (retry,) = store.pending_outbox("mdm", now + timedelta(minutes=5))
    assert (retry.id, retry.attempts) == (message.id, 1)
    store.outbox_published([retry.id], now + timedelta(minutes=5))
    assert store.pending_outbox("mdm", now + timedelta(days=1)) == []
