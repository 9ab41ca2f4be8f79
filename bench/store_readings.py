"""Benchmark: storing the readings of 1,000 full meter reads, on SQLite and PostgreSQL.

The rows are those of `bench/read_fleet.py`'s read: per meter 4 register readings and two
96-interval blocks (196 rows), built as the driver builds them (cim dataclasses, Decimal values,
aware UTC datetimes), saved by `Store.save_meter_readings` in batches of `--batch` meters. Paths,
each on a fresh database, in the same run:

- insert, ignore duplicates: the store's previous statement (INSERT .. ON CONFLICT DO NOTHING:
  a repeated value is kept once, a corrected one is lost), swapped into the same Store (both
  its forms: the DB-API executemany used on SQLite, the Core statement elsewhere);
- upsert, new rows: the store's statement (INSERT .. ON CONFLICT DO UPDATE .. WHERE the value
  differs), every row new;
- upsert, all repeated: the same rows saved again (a re-read of intervals already stored);
- upsert, 1% corrected: saved again with every hundredth value changed (each leaves a trace in
  reading_correction, written by the database's trigger);
- plain sqlite3 (SQLite only): the same rows with the sqlite3 module into an equivalent table,
  one executemany per batch, the floor under any SQLAlchemy path;
- upsert through Core executemany (PostgreSQL only): the store's upsert as it was sent before
  the COPY path (engine/reading_copy.py), new rows.

Figures: wall seconds, rows per second (wall), this process's CPU seconds and per row, and on
PostgreSQL the CPU of the server backend that did the work (from /proc, when the server runs on
this machine).

    python bench/store_readings.py [--meters 1000] [--batch 1000] [--repeat 2]
        [--postgres ADMIN_URL | --no-postgres]

PostgreSQL: `--postgres` (default: $CIMHES_TEST_POSTGRES, as scripts/test sets it; else
`scripts/postgres` is run to start the test server) names a server on which the bench creates
and drops its own databases.
"""
from __future__ import annotations

import argparse
import os
import platform
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from cimhes.cim.meter_readings import (
    DeviceRef,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    Reading,
)
from cimhes.drivers import DeviceAddress
from cimhes.engine import schema
from cimhes.engine.store import ReadingCorrection, ReadingRecord, Store, _positional_sql

UTC = timezone.utc
REGISTERS = ["0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0",
             "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0", "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0"]
PROFILES = ["0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"]
END = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


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


def corrected(readings: list[MeterReading]) -> tuple[list[MeterReading], int]:
    """The same readings with every hundredth interval value changed."""
    changed, out = 0, []
    for meter_reading in readings:
        blocks = []
        for block in meter_reading.interval_blocks:
            intervals = []
            for interval in block.readings:
                changed += 1
                if changed % 100 == 0:
                    interval = replace(interval, value=interval.value + Decimal("0.001"))
                intervals.append(interval)
            blocks.append(replace(block, readings=intervals))
        out.append(replace(meter_reading, interval_blocks=blocks))
    return out, changed // 100


def insert_ignoring_duplicates(dialect: str):
    """The statement save_meter_readings used before corrections were kept."""
    insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[dialect]
    return insert(ReadingRecord.__table__).on_conflict_do_nothing(
        index_elements=["device_id", "reading_type", "timestamp"])


def timed(store: Store, readings: list[MeterReading], batch: int, read_at: datetime):
    """(wall, this process's CPU, the server backend's CPU or 0.0 on SQLite) in seconds."""
    backend = None
    if store.engine.dialect.name == "postgresql":
        # The store's one pooled connection (one thread): its backend does the server's work.
        with store.engine.connect() as connection:
            backend = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    server = _backend_cpu(backend)
    started, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(readings), batch):
        store.save_meter_readings(readings[first:first + batch], read_at)
    return (time.perf_counter() - started, time.process_time() - cpu,
            _backend_cpu(backend) - server)


def _backend_cpu(pid: int | None) -> float:
    """CPU seconds of a PostgreSQL backend on this machine (0.0 if none, or not here)."""
    if pid is None or not os.path.exists(f"/proc/{pid}/stat"):
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_paths(new_database, devices, readings, fixed, batch: int) -> dict[str, tuple[float, float]]:
    """Each path, the previous statement and the upsert each on a database of its own."""
    results = {}
    store = Store(new_database())
    try:
        store.load_inventory(devices)
        store._upsert_readings = insert_ignoring_duplicates(store.engine.dialect.name)
        store._upsert_readings_positional = _positional_sql(store._upsert_readings, store.engine)
        store._copy_readings = None  # PostgreSQL: the statement itself, through Core
        results["insert, ignore duplicates"] = timed(store, readings, batch, END)
    finally:
        store.close()
    if _is_postgresql(new_database):
        store = Store(new_database())
        try:
            store.load_inventory(devices)
            store._copy_readings = None
            results["upsert via Core executemany"] = timed(store, readings, batch, END)
        finally:
            store.close()
    store = Store(new_database())
    try:
        store.load_inventory(devices)
        results["upsert, new rows"] = timed(store, readings, batch, END)
        results["upsert, all repeated"] = timed(store, readings, batch, END + timedelta(hours=1))
        results["upsert, 1% corrected"] = timed(store, fixed, batch, END + timedelta(hours=2))
        _check(store, len(readings) * 196, len(readings) * 192 // 100)
    finally:
        store.close()
    return results


def _is_postgresql(new_database) -> bool:
    return getattr(new_database, "postgresql", False)


def _check(store: Store, rows: int, corrections: int) -> None:
    with store.engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(ReadingRecord)).scalar_one()
        traced = connection.execute(
            select(func.count()).select_from(ReadingCorrection)).scalar_one()
    if (stored, traced) != (rows, corrections):
        raise SystemExit(f"bench aborted: {stored} rows and {traced} corrections stored, "
                         f"expected {rows} and {corrections}")


def floor_sqlite3(path: Path, readings: list[MeterReading], batch: int) -> tuple[float, float]:
    """The same rows through the plain sqlite3 module: ISO text times, one executemany a batch."""
    db = sqlite3.connect(path)
    db.executescript("""
        PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
        CREATE TABLE reading (id INTEGER PRIMARY KEY, device_id INTEGER, reading_type TEXT,
            timestamp TEXT, value TEXT, read_at TEXT, UNIQUE (device_id, reading_type, timestamp));
    """)
    read_at = END.isoformat()
    started, cpu = time.perf_counter(), time.process_time()
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
    elapsed = time.perf_counter() - started, time.process_time() - cpu, 0.0
    db.close()
    return elapsed


class PostgresDatabases:
    def __init__(self, admin_url: str):
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self._url = make_url(admin_url)

    def create(self) -> str:
        name = f"cimhes_bench_{os.getpid()}_{secrets.token_hex(3)}"
        with self._admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = self._url.set(database=name).render_as_string(hide_password=False)
        engine = create_engine(url)
        schema.upgrade(engine)
        engine.dispose()
        return url

    def drop(self, url: str) -> None:
        with self._admin.connect() as connection:
            connection.exec_driver_sql(
                f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    def server_version(self) -> str:
        with self._admin.connect() as connection:
            return connection.exec_driver_sql("SHOW server_version").scalar_one()


def best(runs: list[dict[str, tuple[float, ...]]]) -> dict[str, tuple[float, ...]]:
    return {name: min(run[name] for run in runs) for name in runs[0]}


def show(title: str, figures: dict[str, tuple[float, float]], rows: int) -> None:
    print(f"\n== {title} ==")
    server = any(figure[2] for figure in figures.values())
    print(f"{'':28}{'wall s':>8}{'rows/s':>10}{'CPU s':>8}{'us/row':>8}"
          + (f"{'server CPU s':>14}{'us/row':>8}" if server else ""))
    for name, (wall, cpu, backend) in figures.items():
        print(f"{name:28}{wall:8.3f}{rows / wall:10.0f}{cpu:8.3f}{1e6 * cpu / rows:8.2f}"
              + (f"{backend:14.3f}{1e6 * backend / rows:8.2f}" if server else ""))
    base = figures["insert, ignore duplicates"][0]
    print("wall time against the previous path (insert, ignore duplicates): " + ", ".join(
        f"{name} {wall / base:.2f}x" for name, (wall, _, _) in figures.items()
        if name != "insert, ignore duplicates"))


def postgres_admin_url(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("CIMHES_TEST_POSTGRES"):
        return os.environ["CIMHES_TEST_POSTGRES"]
    return subprocess.run(["bash", str(ROOT / "scripts" / "postgres")], check=True,
                          capture_output=True, text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000, help="meters saved per call")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is shown")
    parser.add_argument("--postgres", help="admin URL of a PostgreSQL server")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    devices, readings = fleet(args.meters)
    fixed, changes = corrected(readings)
    rows = args.meters * 196
    postgres = None if args.no_postgres else PostgresDatabases(postgres_admin_url(args.postgres))
    print(f"machine: nproc {os.cpu_count()}, Python {platform.python_version()}, SQLAlchemy "
          f"{version('sqlalchemy')}, SQLite {sqlite3.sqlite_version}"
          + (f", PostgreSQL {postgres.server_version()}" if postgres else "")
          + f"; command: {' '.join(sys.argv)}")
    print(f"{args.meters} meters, {rows} rows ({changes} changed in the corrected set), saved "
          f"{args.batch} meters per call, best of {args.repeat}")

    sqlite_runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            names = iter(range(10))
            figures = run_paths(lambda: f"sqlite:///{Path(folder) / f'store{next(names)}.sqlite'}",
                                devices, readings, fixed, args.batch)
            figures["plain sqlite3 (floor)"] = floor_sqlite3(Path(folder) / "floor.sqlite",
                                                             readings, args.batch)
            sqlite_runs.append(figures)
    show("SQLite (file, WAL, synchronous=NORMAL)", best(sqlite_runs), rows)

    if postgres:
        postgres_runs = []
        for _ in range(args.repeat):
            made: list[str] = []

            def new_database():
                made.append(postgres.create())
                return made[-1]
            new_database.postgresql = True

            try:
                postgres_runs.append(run_paths(new_database, devices, readings, fixed, args.batch))
            finally:
                for url in made:
                    postgres.drop(url)
        show("PostgreSQL (loopback TCP, psycopg 3)", best(postgres_runs), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
