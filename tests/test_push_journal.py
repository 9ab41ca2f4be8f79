"""The push ingress journal: what a process journalled and did not mark done comes back at the
next start, in order, with its peer and arrival time; done entries and freed segments do not;
the journal keeps to its size bound, its files are private, a torn tail is skipped; and a
PushIntake with a journal replays a killed process's pushes through the normal path."""
from __future__ import annotations

import os
import stat
from datetime import datetime, timezone

import pytest_twisted
from twisted.internet import reactor

from cimhes.drivers import DeviceAddress
from cimhes.engine.events import EventStore
from cimhes.engine.push import PushIntake
from cimhes.engine.push_journal import PushJournal
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.alarm_storm import StormMeters
from cimhes.fixtures.push import alarm_body, data_notification

UTC = timezone.utc
AT = datetime(2026, 7, 1, 4, 0, tzinfo=UTC)


def test_entries_not_done_come_back_at_the_next_start_in_order(tmp_path):
    journal = PushJournal(tmp_path / "j", clock=lambda: 1234.5)
    first = journal.append("127.0.0.9:4000", b"\x0fone")
    second = journal.append("127.0.0.9:4001", b"\x0ftwo")
    third = journal.append("127.0.0.9:4002", b"\x0fthree")
    journal.done([first, third])  # the second's batch is not committed yet
    journal.close()  # (a SIGKILL leaves the same bytes: each record is one write())

    again = PushJournal(tmp_path / "j")
    left = again.unfinished()
    assert [(e.sequence, e.peer, e.arrived, e.apdu) for e in left] == [
        (second, "127.0.0.9:4001", 1234.5, b"\x0ftwo"), (third, "127.0.0.9:4002", 1234.5,
                                                         b"\x0fthree")]
    assert again.unfinished() == []  # handed out once
    fourth = again.append("p", b"\x0ffour")
    assert fourth > third  # numbering goes on
    again.done([second, third, fourth])
    again.close()
    assert PushJournal(tmp_path / "j").unfinished() == []


def test_whole_segments_are_freed_once_done_and_the_size_is_bounded(tmp_path, caplog):
    journal = PushJournal(tmp_path / "j", segment_bytes=200, max_bytes=1000)
    entries = [journal.append("peer", bytes(40)) for _ in range(20)]
    taken = [e for e in entries if e is not None]
    assert len(taken) < 20 and journal.counts["not journalled (full)"] == 20 - len(taken)
    assert "push journal" in caplog.text and "is full" in caplog.text
    assert journal.size <= 1000
    journal.done(taken)
    assert len(list((tmp_path / "j").glob("*.journal"))) == 1  # only the current one is left
    assert journal.append("peer", bytes(40)) is not None  # room again
    directory_mode = stat.S_IMODE(os.stat(tmp_path / "j").st_mode)
    file_modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "j").glob("*.journal")}
    assert directory_mode == 0o700 and file_modes == {0o600}


def test_a_torn_last_record_is_skipped_and_the_rest_kept(tmp_path):
    journal = PushJournal(tmp_path / "j")
    kept = journal.append("peer", b"\x0fkept")
    journal.append("peer", b"\x0fcut by a power loss")  # and no close: the power went
    segment = next((tmp_path / "j").glob("*.journal"))
    segment.write_bytes(segment.read_bytes()[:-5])
    again = PushJournal(tmp_path / "j")
    assert [e.sequence for e in again.unfinished()] == [kept]
    assert again.counts["torn records"] == 1


def test_a_stop_without_close_is_told_apart_from_a_clean_one(tmp_path):
    clock = iter([100.0, 101.0, 102.0, 103.0, 104.0, 105.0, 106.0, 107.0, 108.0])
    first = PushJournal(tmp_path / "j", clock=lambda: next(clock))
    assert first.stopped_cleanly  # nothing ran before
    entry = first.append("peer", b"\x0fone")  # at 101
    first.done([entry])  # committed at 102
    first.append("peer", b"\x0ftwo")  # at 103, then killed: no close
    killed = PushJournal(tmp_path / "j", clock=lambda: next(clock))
    assert not killed.stopped_cleanly and killed.last_commit == 102.0
    killed.done([e.sequence for e in killed.unfinished()])
    killed.close()
    again = PushJournal(tmp_path / "j", clock=lambda: next(clock))
    assert again.stopped_cleanly and again.unfinished() == []
    # Started, then killed before any push: still an unclean stop.
    assert not PushJournal(tmp_path / "j").stopped_cleanly


def test_fsync_mode_writes_the_same_journal_across_segments(tmp_path):
    journal = PushJournal(tmp_path / "j", fsync=True, segment_bytes=150)
    apdus = [b"\x0f" + bytes([i]) * 40 for i in range(12)]  # a new segment every two
    for apdu in apdus:
        journal.append("peer", apdu)
    journal.close()
    again = PushJournal(tmp_path / "j")
    assert [e.apdu for e in again.unfinished()] == apdus and again.stopped_cleanly


@pytest_twisted.ensureDeferred
async def test_an_intake_replays_what_a_killed_process_read_and_did_not_commit(tmp_path):
    meters = StormMeters(3)
    devices = [DeviceAddress.from_inventory(m) for m in meters.inventory()["meters"]]
    store = Store(f"sqlite:///{tmp_path / 'push.sqlite'}")
    store.load_inventory(devices)
    runner = StoreRunner(reactor, store)
    events = EventStore(store)
    pushes = [data_notification(alarm_body(m.serial, 1 << 2), AT) for m in meters.meters]
    try:
        # The killed process: all three journalled, the first committed and marked done, the
        # second committed but killed before its mark, the third never committed.
        killed = PushJournal(tmp_path / "j")
        first, second, _third = (killed.append("127.0.0.7:1", apdu) for apdu in pushes)
        intake = PushIntake(runner, events, devices, now=lambda: AT)
        intake._take(pushes[0], "127.0.0.7:1", None)  # noqa: SLF001 (as the killed one did)
        intake._take(pushes[1], "127.0.0.7:1", None)  # noqa: SLF001
        await intake.idle()
        killed.done([first])
        killed.close()
        assert events.events(meters.meters[2].mrid) == []

        restarted = PushIntake(runner, events, devices, now=lambda: AT)
        journal = PushJournal(tmp_path / "j")
        restarted.use_journal(journal)
        assert restarted.replay() == 2
        await restarted.idle()
        # Each meter's alarm once: the second deduped by the store, the third stored now.
        assert [len(events.events(m.mrid)) for m in meters.meters] == [1, 1, 1]
        assert restarted.counts["events stored"] == 1
        journal.close()
        assert PushJournal(tmp_path / "j").unfinished() == []  # both marked done after commit
        assert second is not None
    finally:
        runner.stop()
        store.close()
