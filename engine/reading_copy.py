"""Readings into PostgreSQL by COPY: the rows cost the reading process only psycopg's C encoder.

`Store.save_meter_readings` hands a batch's rows (tuples in `_READING_COLUMNS` order, times as
epoch milliseconds) to `copy_readings` on PostgreSQL. They go by one binary COPY into a
temporary staging table of this connection, then one INSERT .. SELECT .. ON CONFLICT moves them
into `reading` with the store's rule (issue 8): a value already stored is kept once (nothing
written), a different one replaces it (the database's trigger traces the correction). Through
SQLAlchemy's executemany the same rows cost the client ~20 us each (bench/README.md, issue 5);
here ~2.

One INSERT .. ON CONFLICT DO UPDATE may not touch one row twice, so a batch giving the same
(device, reading type, time) twice (two reads of one meter written together) is refused by the
server; that batch is then upserted row by row in order, as if each row were saved after the
one before (the later value wins, with its trace). A savepoint around the INSERT keeps the
transaction usable for that.

The staging table is the connection's own (TEMP), emptied at each commit (ON COMMIT DELETE
ROWS), and made if missing at the start of each batch (IF NOT EXISTS: a catalog look-up, not a
round trip's worth of work), so a rolled-back first batch or a reconnect leaves nothing to
track.
"""
from __future__ import annotations

from collections.abc import Sequence

import psycopg
from sqlalchemy.exc import DBAPIError

STAGE = "cimhes_reading_stage"
# The columns of `reading` that save_meter_readings writes, with their types (engine/store.py:
# ReadingRecord; EpochMillis is bigint).
_COLUMNS = (("device_id", "integer", "int4"), ("reading_type", "varchar(64)", "text"),
            ("timestamp", "bigint", "int8"), ("value", "varchar(40)", "text"),
            ("read_at", "bigint", "int8"), ("source", "varchar(32)", "text"))
_NAMES = ", ".join(name for name, _, _ in _COLUMNS)
_CREATE = (f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} ("
           + ", ".join(f"{name} {sql}" for name, sql, _ in _COLUMNS)
           + ") ON COMMIT DELETE ROWS")
_COPY = f"COPY {STAGE} ({_NAMES}) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = [binary for _, _, binary in _COLUMNS]
# The store's upsert (engine/store.py: _upsert_readings), spelled for a SELECT and for one row.
_ON_CONFLICT = ("ON CONFLICT (device_id, reading_type, timestamp) DO UPDATE SET "
                "value = excluded.value, read_at = excluded.read_at, source = excluded.source "
                "WHERE reading.value <> excluded.value")
_MERGE = (f"SAVEPOINT {STAGE}; INSERT INTO reading ({_NAMES}) SELECT {_NAMES} FROM {STAGE} "
          f"{_ON_CONFLICT}; RELEASE SAVEPOINT {STAGE}")
_ONE_BY_ONE = (f"INSERT INTO reading ({_NAMES}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
               f"{_ON_CONFLICT}")


def copy_readings(connection, rows: Sequence[tuple]) -> None:
    """Upsert `rows` into `reading` within the transaction of `connection` (a SQLAlchemy
    Connection on psycopg 3). The driver's errors are raised as SQLAlchemy's (DataError,
    OperationalError, ...), as from the store's other statements."""
    try:
        _copy(connection.connection.driver_connection, rows)
    except psycopg.Error as exc:
        raise DBAPIError.instance(_COPY, None, exc, psycopg.Error, hide_parameters=True,
                                  dialect=connection.dialect) from exc


def _copy(driver, rows: Sequence[tuple]) -> None:
    with driver.cursor() as cursor:
        cursor.execute(_CREATE)
        with cursor.copy(_COPY) as copy:
            copy.set_types(_COPY_TYPES)
            write_row = copy.write_row
            for row in rows:
                write_row(row)
        try:
            cursor.execute(_MERGE)
        except psycopg.errors.CardinalityViolation:
            # The same key twice in this batch: back to before the INSERT, then row by row.
            cursor.execute(f"ROLLBACK TO SAVEPOINT {STAGE}")
            cursor.executemany(_ONE_BY_ONE, rows)
            cursor.execute(f"RELEASE SAVEPOINT {STAGE}")
