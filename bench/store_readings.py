"""Benchmark: storing the readings of 1,000 full meter reads, against plain sqlite3 as the floor.

The rows are those of `bench/read_fleet.py`'s read: per meter 4 register readings and two
96-interval blocks (196 rows), built as the driver builds them (cim dataclasses, Decimal values,
aware UTC datetimes). It times `Store.save_meter_readings` on a fresh SQLite file, in batches of
`--batch` meters, and, in the same run, the same rows written with the plain `sqlite3` module
(one executemany per batch into an equivalent table): the floor any ORM path sits on.

    python bench/store_readings.py [--meters 1000] [--batch 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import platform
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

from cimhes.cim.meter_readings import (
    DeviceRef,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    Reading,
)
from cimhes.drivers import DeviceAddress
from cimhes.engine.store import Store

UTC = timezone.utc
REGISTERS = ["0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0",
             "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0", "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0"]
PROFILES = ["0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"]
END = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def fleet(meters: int) -> tuple[list[DeviceAddress], list[MeterReading]]:
    devices, readings = [], []
    clock = END + timedelta(minutes=7, seconds=31, milliseconds=520)
    for k in range(1, meters + 1):
        mrid = f"00000000-0000-5000-8000-{k:012d}"
        devices.append(DeviceAddress(mrid=mrid, name=f"CIMHES{k:06d}", device_type="idis-meter",
                                     host="127.0.0.1", port=4059))
        registers = [Reading(rt, Decimal(k * 1000 + i) / 1000, clock)
                     for i, rt in enumerate(REGISTERS)]
        blocks = [IntervalBlock(rt, [
            IntervalReading(END - timedelta(minutes=15 * (95 - n)), Decimal(k * 100 + n) / 1000)
            for n in range(96)]) for rt in PROFILES]
        readings.append(MeterReading(DeviceRef(mrid=mrid), registers, blocks))
    return devices, readings


def floor_sqlite3(path: Path, readings: list[MeterReading], batch: int) -> float:
    """The same rows through the plain sqlite3 module: ISO text times, one executemany a batch."""
    db = sqlite3.connect(path)
    db.executescript("""
        PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
        CREATE TABLE reading (id INTEGER PRIMARY KEY, device_id INTEGER, reading_type TEXT,
            timestamp TEXT, value TEXT, read_at TEXT, UNIQUE (device_id, reading_type, timestamp));
    """)
    read_at = END.isoformat()
    started = time.process_time()
    for first in range(0, len(readings), batch):
        rows = []
        for device_id, meter_reading in enumerate(readings[first:first + batch], first + 1):
            rows += [(device_id, r.reading_type, r.timestamp.isoformat(), str(r.value), read_at)
                     for r in meter_reading.readings]
            for block in meter_reading.interval_blocks:
                rows += [(device_id, block.reading_type, i.timestamp.isoformat(), str(i.value),
                          read_at) for i in block.readings]
        with db:
            db.executemany("INSERT OR IGNORE INTO reading (device_id, reading_type, timestamp, "
                           "value, read_at) VALUES (?, ?, ?, ?, ?)", rows)
    elapsed = time.process_time() - started
    db.close()
    return elapsed


def cimhes_store(path: Path, devices, readings, batch: int) -> float:
    store = Store(f"sqlite:///{path}")
    store.load_inventory(devices)
    started = time.process_time()
    for first in range(0, len(readings), batch):
        store.save_meter_readings(readings[first:first + batch], END)
    elapsed = time.process_time() - started
    store.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000, help="meters saved per call")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is shown")
    args = parser.parse_args()

    devices, readings = fleet(args.meters)
    rows = sum(len(m.readings) + sum(len(b.readings) for b in m.interval_blocks)
               for m in readings)
    print(f"machine: Python {platform.python_version()}, SQLAlchemy {version('sqlalchemy')}, "
          f"SQLite {sqlite3.sqlite_version}; command: {' '.join(sys.argv)}")
    print(f"{args.meters} meters, {rows} rows, saved {args.batch} meters per call, "
          f"best of {args.repeat} (CPU seconds of this process)")
    best = {"cimhes Store": float("inf"), "plain sqlite3": float("inf")}
    for run in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            best["cimhes Store"] = min(best["cimhes Store"], cimhes_store(
                Path(folder) / "store.sqlite", devices, readings, args.batch))
            best["plain sqlite3"] = min(best["plain sqlite3"], floor_sqlite3(
                Path(folder) / "floor.sqlite", readings, args.batch))
    print(f"{'':16}{'CPU s':>8}{'us/row':>9}{'ms/meter':>10}")
    for name, seconds in best.items():
        print(f"{name:16}{seconds:8.3f}{seconds / rows * 1e6:9.2f}{seconds / args.meters * 1e3:10.3f}")
    print(f"cimhes Store / plain sqlite3: {best['cimhes Store'] / best['plain sqlite3']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
