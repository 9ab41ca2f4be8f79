"""Pushes taken in: each DataNotification attributed to a device, its alarms stored as EndDeviceEvents,
its readings stored as readings, and every push nobody owns recorded for review.

`PushIntake.take(apdu, peer)` is called by the listener for each framed APDU. It never raises:
an unknown sender (logical device name or system title not in the directory), a push that does
not decrypt or decode, is an `UnrecognisedPush` row. The directory of devices (by serial, the
logical device name being "CIM" + serial as the project's meters have it, and by system title) is
held in memory, given at start; `reload` replaces it. Writes go to the store thread in batches
(group commit, as `ReadingWriter` does): under a storm of pushes they become few large
transactions. `counts` says what happened, for operators and the benchmark.

With a journal (`use_journal`, engine/push_journal.py) each APDU is journalled before it is
parsed and marked done once what it carried is committed (its events' or unrecognised row's
batch, its readings' save); `replay` takes the entries a killed process left not done. While the
meters' logs are read back after an unclean stop (engine/push_recovery.py), `guard` makes a
pushed event of those meters and that window that its log copy already stored count as stored.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from cimhes.drivers import DeviceAddress
from cimhes.drivers.ciphering import SecurityKeys
from cimhes.drivers.idis_push import interpret, sender
from cimhes.drivers.push import PushError, decode
from cimhes.engine.events import EventStore, UnrecognisedPush
from cimhes.engine.store import ReadingWriter, StoreRunner

log = logging.getLogger(__name__)
LOGICAL_DEVICE_NAME_PREFIX = "CIM"


class PushIntake:
    def __init__(self, runner: StoreRunner, event_store: EventStore,
                 devices: Iterable[DeviceAddress], now=None):
        self._runner = runner
        self._events = event_store
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._readings = ReadingWriter(runner, self._now)
        self._queued_events: list = []
        self._queued_unrecognised: list[UnrecognisedPush] = []
        self._queued_entries: list[int | None] = []  # journal entries of the queued batch
        self._journal = None
        self._guarded: tuple[set[str], datetime, datetime] | None = None
        self._writing = False
        self._idle: list[Deferred] = []
        self._pending_readings: list[Deferred] = []
        self.counts: Counter[str] = Counter()
        self.reload(devices)

    def reload(self, devices: Iterable[DeviceAddress]) -> None:
        self._by_name: dict[str, DeviceAddress] = {}
        self._keys: dict[bytes, SecurityKeys] = {}
        self._by_title: dict[bytes, DeviceAddress] = {}
        for device in devices:
            self._by_name[LOGICAL_DEVICE_NAME_PREFIX + device.name] = device
            if device.system_title and device.encryption_key and device.authentication_key:
                title = bytes.fromhex(device.system_title)
                self._by_title[title] = device
                self._keys[title] = SecurityKeys(bytes.fromhex(device.encryption_key),
                                                 bytes.fromhex(device.authentication_key))

    def devices(self) -> list[DeviceAddress]:
        """The devices whose pushes are taken."""
        return list(self._by_name.values())

    def guard(self, mrids, since: datetime, until: datetime) -> None:
        """Pushed events of ``mrids`` timed in [since, until] are stored only if no event of the
        same meter, time and type is (the push recovery's log copy: one alarm, one message)."""
        self._guarded = (set(mrids), since, until)

    def use_journal(self, journal) -> None:
        """Journal every APDU taken from now on (a `PushJournal`)."""
        self._journal = journal

    def replay(self) -> int:
        """Take again the journal's entries a previous process left not done; how many."""
        entries = self._journal.unfinished() if self._journal is not None else []
        for entry in entries:
            self._take(entry.apdu, entry.peer, entry.sequence)
        if entries:
            self._journal.counts["replayed"] += len(entries)
            log.warning("replayed %d pushes the previous process had read but not committed "
                        "(push journal %s)", len(entries), self._journal.directory)
        return len(entries)

    def take(self, apdu: bytes, peer: str) -> None:
        """Journal, attribute, interpret and queue one pushed APDU; never raises."""
        entry = None
        if self._journal is not None:
            try:
                entry = self._journal.append(peer, apdu)
            except OSError as failure:  # a full disk: the push is still taken
                self.counts["journal failures"] += 1
                log.error("journalling a push from %s failed: %s", peer, failure)
        self._take(apdu, peer, entry)

    def _take(self, apdu: bytes, peer: str, entry: int | None) -> None:
        try:
            notification = decode(apdu, self._keys.get)
            _setup, name = sender(notification)
            device = self._by_name.get(name)
            if device is None:
                raise PushError("unknown device", f"logical device name {name!r} is not in "
                                "the inventory", name)
            if notification.system_title is not None and \
                    self._by_title.get(notification.system_title) is not device:
                raise PushError("unknown device", f"{name!r} pushed under another device's "
                                "system title", name)
            content = interpret(notification, device.mrid, device.name)
        except PushError as refused:
            self.counts[refused.problem] += 1
            self._queued_entries.append(entry)
            self.record(UnrecognisedPush(self._now(), peer, refused.identity, refused.problem,
                                         refused.reason, len(apdu), apdu[:512]))
            return
        except Exception:  # a bug must not take the listener down with it
            log.exception("push from %s could not be taken", peer)
            self.counts["internal error"] += 1
            self._done([entry])  # replaying it would meet the same bug
            return
        self.counts[content.setup] += 1
        if content.events:
            self._queued_events.extend(content.events)
            self._queued_entries.append(entry)
            self._write()
        if content.meter_reading is not None:
            if len(self._pending_readings) > 1000:
                self._pending_readings = [d for d in self._pending_readings if not d.called]
            saved = self._readings.save(content.meter_reading)
            if entry is not None:
                saved.addCallback(lambda result: self._done([entry]) or result)
            self._pending_readings.append(saved.addErrback(self._store_failed))
        if not content.events and content.meter_reading is None:
            self._done([entry])

    def _done(self, entries) -> None:
        if self._journal is not None:
            self._journal.done(entries)

    def record(self, push: UnrecognisedPush) -> None:
        """Queue an unrecognised push the listener met before any APDU (broken framing)."""
        self._queued_unrecognised.append(push)
        self._write()

    def idle(self) -> Deferred:
        """Fires once everything taken so far is written."""
        events_written = Deferred()
        if not self._writing and not self._queued_events and not self._queued_unrecognised:
            events_written.callback(None)
        else:
            self._idle.append(events_written)
        readings, self._pending_readings = self._pending_readings, []
        return gatherResults([events_written, *readings], consumeErrors=True)

    def _write(self) -> None:
        if self._writing:
            return
        events, self._queued_events = self._queued_events, []
        unrecognised, self._queued_unrecognised = self._queued_unrecognised, []
        entries, self._queued_entries = self._queued_entries, []
        if not events and not unrecognised:
            idle, self._idle = self._idle, []
            for waiting in idle:
                waiting.callback(None)
            return
        self._writing = True
        written = self._runner.call(self._write_batch, events, unrecognised, self._now())

        def done(result):
            self._writing = False
            if isinstance(result, Failure):
                self._store_failed(result)  # its entries stay in the journal for a replay
            else:
                self.counts["events stored"] += result
                self._done(entries)
            self._write()

        written.addBoth(done)

    def _write_batch(self, events, unrecognised, at) -> int:
        for push in unrecognised:
            self._events.record_unrecognised(push)
        if self._guarded is not None and events:
            events = self._unguarded(events)
        return self._events.save_events(events, "push", at) if events else 0

    def _unguarded(self, events):
        from cimhes.engine.push_recovery import without_stored

        mrids, since, until = self._guarded
        guarded = [e for e in events if e.device_mrid in mrids and since <= e.created <= until]
        if not guarded:
            return events
        checked = set(map(id, guarded))
        kept = set(map(id, without_stored(self._runner.store, guarded)))
        return [e for e in events if id(e) not in checked or id(e) in kept]

    def _store_failed(self, failure: Failure) -> None:
        self.counts["store failures"] += 1
        log.error("storing pushed data failed: %s", failure.getErrorMessage())
