"""The push ingress journal: every framed DataNotification kept on disk until its data is committed.

A DLMS DataNotification has no acknowledgement: a push the process has read but not yet
committed would die with the process. So `PushIntake` appends each framed APDU's raw bytes,
with the peer and the arrival time, to this append-only journal before it parses it, and marks
it done once what it carried (events, readings, an unrecognised-push row) is committed. At start
the entries not done are replayed through the same intake; the store's once-only rule drops the
events of an entry that was committed but not yet marked.

On disk: a directory (mode 0700) of segments ``<first sequence number>.journal`` (mode 0600).
A segment is a series of records, each ``kind (1 octet) | payload length (4) | sequence number
(8) | time (8, float seconds since the epoch) | CRC-32 of the payload (4) | payload``:

- ``E`` an entry: payload = peer length (1) | peer (ASCII) | the APDU;
- ``D`` done: every entry with a sequence number up to this record's is done (the watermark:
  the lowest entry not done, minus one); no payload;
- ``C`` closed: the process stopped cleanly (its last record). A journal whose last record is
  not ``C`` was left by a process that was killed or crashed: `stopped_cleanly` is False, and
  `last_commit` (the time of its last ``D``, else of its last record) is when it last committed
  pushes (engine/push_recovery.py reads the meters' logs from there).

A new segment starts when the current one passes ``segment_bytes``; a segment whose entries
are all done (and which is not the current one) is deleted. Bounded: past ``max_bytes`` in all
(default 64 MiB, about 700,000 alarm pushes) a new push is not journalled (it is still taken),
which is counted and logged once per episode; journalling resumes when segments are freed. At
start a torn record (a write cut by a power loss) ends the reading of its segment, logged.

Durability. `os.write` puts a record in the kernel's page cache before the push is parsed, so
a killed process (SIGKILL, a crash) loses nothing it has read. A power loss loses what the
kernel had not written back: with ``fsync=True`` a thread of the journal's own fsyncs it as soon
as records were written since its last fsync (group fsync: the reactor never waits for the disk;
a push is parsed while its record is being synced; its cost is measured by bench/amqp.py --fsync
and recorded in bench/README.md). Bytes the kernel accepted but the process never read are beyond
any journal: see engine/push_recovery.py.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 1024 * 1024
_HEADER = struct.Struct(">cIQdI")
_ENTRY, _DONE, _CLOSED = b"E", b"D", b"C"
_SUFFIX = ".journal"


class JournalError(ValueError):
    """The journal directory cannot be used (named in the message)."""


@dataclass(frozen=True)
class JournalEntry:
    sequence: int
    peer: str
    arrived: float  # seconds since the epoch
    apdu: bytes


class PushJournal:
    """Append, mark done, replay. Blocking file writes of a few dozen octets (page cache): cheap
    enough for the reactor thread; with ``fsync`` the fsyncs run on a thread of their own."""

    def __init__(self, directory: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, fsync: bool = False,
                 clock=time.time) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise JournalError("push journal sizes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max_bytes)
        self._fsync = fsync
        # The fsync thread and the reactor share the current segment's descriptor: the lock is
        # held while it is fsynced, closed or replaced (rotation, close: rare).
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._closing = False
        self._syncer = None
        self._clock = clock
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        except OSError as failure:
            raise JournalError(f"push journal directory {self.directory}: {failure}") from None
        self.counts = {"journalled": 0, "not journalled (full)": 0, "replayed": 0,
                       "torn records": 0}
        self._full = False
        # Segments: first sequence number -> [path, size, last sequence number].
        self._segments: dict[int, list] = {}
        self._pending: dict[int, None] = {}  # sequence numbers not done, in order
        self._watermark = 0
        self._next = 1
        self._fd = None
        self._current = None
        self.stopped_cleanly = True  # no journal yet: nothing was running
        self.last_commit: float | None = None
        self._unfinished = self._read_back()
        if fsync:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name="cimhes-push-journal-fsync")
            self._syncer.start()
        # Running: from now on a stop that is not `close` shows (a done mark dated as the last
        # commit, so it does not move what the next start takes for the last commit).
        at = self.last_commit if self.last_commit is not None else self._clock()
        self._write(_HEADER.pack(_DONE, 0, self._watermark, at, zlib.crc32(b"")), None)

    # ------------------------------------------------------------------ start

    def _read_back(self) -> list[JournalEntry]:
        entries: dict[int, JournalEntry] = {}
        watermark = 0
        last_kind = _CLOSED
        last_at = None
        for path in sorted(self.directory.glob("*" + _SUFFIX), key=lambda p: int(p.stem)):
            data = path.read_bytes()
            first, last, offset = int(path.stem), int(path.stem) - 1, 0
            while offset < len(data):
                if len(data) - offset < _HEADER.size:
                    self._torn(path, offset)
                    break
                kind, length, sequence, at, crc = _HEADER.unpack_from(data, offset)
                payload = data[offset + _HEADER.size:offset + _HEADER.size + length]
                if (kind not in (_ENTRY, _DONE, _CLOSED) or len(payload) != length
                        or zlib.crc32(payload) != crc):
                    self._torn(path, offset)
                    break
                offset += _HEADER.size + length
                last_kind = kind
                if kind == _CLOSED:
                    continue
                last_at = at
                if kind == _DONE:
                    watermark = max(watermark, sequence)
                    self.last_commit = at
                    continue
                peer_length = payload[0]
                entries[sequence] = JournalEntry(sequence, payload[1:1 + peer_length].decode(
                    "ascii", "replace"), at, payload[1 + peer_length:])
                last = max(last, sequence)
                self._next = max(self._next, sequence + 1)
            self._segments[first] = [path, len(data), last]
        self._watermark = watermark
        self._next = max(self._next, watermark + 1)
        self.stopped_cleanly = last_kind == _CLOSED
        if self.last_commit is None:
            self.last_commit = last_at
        unfinished = [entries[s] for s in sorted(entries) if s > watermark]
        for entry in unfinished:
            self._pending[entry.sequence] = None
        self._collect()
        return unfinished

    def _torn(self, path: Path, offset: int) -> None:
        self.counts["torn records"] += 1
        log.warning("push journal %s: a torn record at offset %d ends what is read of it "
                    "(a write cut by a crash or power loss)", path.name, offset)

    def unfinished(self) -> list[JournalEntry]:
        """The entries a previous process left not done, oldest first (once: then forgotten)."""
        unfinished, self._unfinished = self._unfinished, []
        return unfinished

    # ------------------------------------------------------------------ running

    @property
    def size(self) -> int:
        return sum(segment[1] for segment in self._segments.values())

    def append(self, peer: str, apdu: bytes) -> int | None:
        """Journal one framed APDU; its sequence number, or None when the journal is full."""
        peer_octets = peer.encode("ascii", "replace")[:255]
        payload = bytes((len(peer_octets),)) + peer_octets + apdu
        record_size = _HEADER.size + len(payload)
        if self.size + record_size > self.max_bytes:
            self.counts["not journalled (full)"] += 1
            if not self._full:
                self._full = True
                log.error("push journal %s is full (%d bytes, the limit --push-journal-max-bytes):"
                          " pushes are taken without it until committed entries free space; a "
                          "crash now loses the ones not yet committed", self.directory,
                          self.max_bytes)
            return None
        if self._full:
            self._full = False
            log.warning("push journal %s has room again: pushes are journalled", self.directory)
        sequence = self._next
        self._next += 1
        self._write(_HEADER.pack(_ENTRY, len(payload), sequence, self._clock(),
                                 zlib.crc32(payload)) + payload, sequence)
        self._pending[sequence] = None
        self.counts["journalled"] += 1
        return sequence

    def done(self, sequences) -> None:
        """These entries' data is committed: advance the watermark, free whole segments."""
        for sequence in sequences:
            if sequence is not None:
                self._pending.pop(sequence, None)
        watermark = next(iter(self._pending)) - 1 if self._pending else self._next - 1
        if watermark <= self._watermark:
            return
        self._watermark = watermark
        self._write(_HEADER.pack(_DONE, 0, watermark, self._clock(), zlib.crc32(b"")), None)
        self._collect()

    def close(self) -> None:
        """Stop cleanly: the close mark, so the next start knows nothing was lost."""
        if self._fd is None and self._current is not None:
            return
        self._write(_HEADER.pack(_CLOSED, 0, self._watermark, self._clock(), zlib.crc32(b"")),
                    None)
        if self._syncer is not None:
            self._closing = True
            self._dirty.set()
            self._syncer.join()
            self._syncer = None
        with self._lock:
            if self._fd is not None:
                if self._fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    # ------------------------------------------------------------------ files

    def _write(self, record: bytes, sequence: int | None) -> None:
        if self._fd is None or self._segments[self._current][1] >= self.segment_bytes:
            self._open_segment(sequence if sequence is not None else self._next)
        os.write(self._fd, record)
        segment = self._segments[self._current]
        segment[1] += len(record)
        if sequence is not None:
            segment[2] = sequence
        if self._syncer is not None:
            self._dirty.set()

    def _sync_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            with self._lock:
                if self._fd is not None:
                    os.fsync(self._fd)
            if self._closing:
                return

    def _open_segment(self, first: int) -> None:
        while first in self._segments:  # a done record may open a segment: never reuse a name
            first += 1
        path = self.directory / f"{first:020d}{_SUFFIX}"
        with self._lock:
            if self._fd is not None:
                if self._fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments[first] = [path, 0, first - 1]
        self._current = first
        self._collect()

    def _collect(self) -> None:
        for first, (path, _size, last) in list(self._segments.items()):
            if first != self._current and last <= self._watermark:
                path.unlink(missing_ok=True)
                del self._segments[first]
