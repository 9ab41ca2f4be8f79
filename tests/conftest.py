"""Fixtures every test module may use: the databases (see tests/databases.py)."""
from __future__ import annotations

import os
import signal

import pytest

from .databases import POSTGRES_ENV, PostgresServer, postgres_or_skip

# Started in the background by a non-interactive shell (`cmd &`, as CI runners may), pytest
# inherits SIGINT ignored, and so would every cimhes process a test starts: Python installs no
# KeyboardInterrupt handler, Twisted then none of its own, and the tests that stop `demo` or
# `serve` with Ctrl-C (SIGINT) would wait for an exit that never comes. A handled SIGINT here is
# reset to the default in each child at exec, as in an interactive shell.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def postgres_server():
    """The run's PostgreSQL server, or None when CIMHES_TEST_POSTGRES names none."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        yield None
        return
    server = PostgresServer(admin_url)
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A database `Store` opens as it is (SQLite: a new file it migrates itself; PostgreSQL: a
    new database already at every head revision, as `cimhes db upgrade` leaves it)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
        return
    server = postgres_or_skip(request)
    url = server.new_database(migrated=True)
    yield url
    server.drop(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path):
    """A database with no tables at all, on each kind of server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite'}"
        return
    server = postgres_or_skip(request)
    url = server.new_database(migrated=False)
    yield url
    server.drop(url)


@pytest.fixture(autouse=True)
def _fresh_meter_configurations():
    """Each test starts with no remembered meter configuration: fleets of different tests
    reuse mRIDs with other scaler_units and profiles (cimhes.drivers.meter_configuration)."""
    from cimhes.drivers.meter_configuration import CONFIGURATIONS

    CONFIGURATIONS.clear()
    yield
    CONFIGURATIONS.clear()
