"""The databases the tests run on: SQLite files, and PostgreSQL databases on a real server.

`scripts/test` starts the server (`scripts/postgres`) and names it in CIMHES_TEST_POSTGRES (an
admin URL); without it the PostgreSQL cases skip, saying so. Each test gets its own database,
copied from a template migrated once per run, and every database a run made is dropped at its
end; databases left by a run that was killed are dropped by the next one.
"""
from __future__ import annotations

import os
import secrets

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cimhes.engine import schema

POSTGRES_ENV = "CIMHES_TEST_POSTGRES"
_PREFIX = "cimhes_test_"


class PostgresServer:
    """Makes and drops uniquely named databases on the test server, one run's worth."""

    def __init__(self, admin_url: str):
        self.admin_url = make_url(admin_url)
        self._admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self._run = f"{_PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
        self._count = 0
        self._template: str | None = None
        self._drop_abandoned()

    def new_database(self, migrated: bool) -> str:
        """The URL of a new, empty database, or of one at every head revision."""
        self._count += 1
        name = f"{self._run}_{self._count}"
        template = ""
        if migrated:
            template = f" TEMPLATE {self._migrated_template()}"
        self._execute(f'CREATE DATABASE "{name}"{template}')
        return self.url(name)

    def url(self, database: str) -> str:
        return self.admin_url.set(database=database).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    def close(self) -> None:
        if self._template:
            self._execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
        self._admin.dispose()

    def _migrated_template(self) -> str:
        if self._template is None:
            name = f"{self._run}_template"
            self._execute(f'CREATE DATABASE "{name}"')
            engine = create_engine(self.url(name))
            try:
                schema.upgrade(engine)
            finally:
                engine.dispose()  # a template must have no connections when it is copied
            self._template = name
        return self._template

    def _drop_abandoned(self) -> None:
        with self._admin.connect() as connection:
            names = connection.execute(text(
                "SELECT datname FROM pg_database WHERE datname LIKE :p"),
                {"p": f"{_PREFIX}%"}).scalars().all()
        for name in names:
            pid = name[len(_PREFIX):].split("_")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _execute(self, statement: str) -> None:
        with self._admin.connect() as connection:
            connection.exec_driver_sql(statement)


def postgres_or_skip(request) -> PostgresServer:
    server = request.getfixturevalue("postgres_server")
    if server is None:
        pytest.skip(f"{POSTGRES_ENV} is not set: no PostgreSQL server for this run "
                    "(scripts/test starts one)")
    return server
