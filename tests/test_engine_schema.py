"""Schema migrations: the revisions make exactly the models' tables on SQLite and PostgreSQL, no
module's tables escape them, concurrent upgrades are safe, and a database the code cannot use is
one line on stderr and exit code 2."""
from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

import cimhes
from cimhes.engine import schema
from cimhes.engine.store import Base, Store, StoreUnavailable

CIMHES = Path(sys.executable).with_name("cimhes")


def _upgraded(url: str):
    engine = create_engine(url)
    schema.upgrade(engine)
    return engine


def test_the_migrations_make_exactly_the_models_schema(empty_database_url):
    engine = _upgraded(empty_database_url)
    try:
        with engine.connect() as connection:
            assert schema.differences(connection) == []
            assert schema.applied_revisions(connection) == schema.all_revisions()
    finally:
        engine.dispose()


def test_downgrading_to_base_and_upgrading_again_gives_the_same_schema(empty_database_url):
    engine = _upgraded(empty_database_url)
    try:
        from alembic import command

        with engine.connect() as connection:
            command.downgrade(schema.alembic_config(connection), "base")
            connection.commit()
            assert set(inspect(connection).get_table_names()) == {schema.VERSION_TABLE}
        schema.upgrade(engine)
        with engine.connect() as connection:
            assert schema.differences(connection) == []
    finally:
        engine.dispose()


def test_every_module_with_tables_is_a_model_module():
    """A table defined in a module missing from MODEL_MODULES would be invisible to the
    migrations check (and to autogenerate): import all of cimhes and compare."""
    only_listed = subprocess.run(
        [sys.executable, "-c", "from cimhes.engine import schema; "
                               "print(' '.join(sorted(schema.metadata().tables)))"],
        capture_output=True, text=True, check=True).stdout.split()
    for module in pkgutil.walk_packages(cimhes.__path__, "cimhes."):
        if ".migrations" not in module.name:
            importlib.import_module(module.name)
    assert sorted(Base.metadata.tables) == only_listed


def test_two_processes_upgrading_one_new_database_at_once_both_succeed(empty_database_url):
    upgrades = [subprocess.Popen([str(CIMHES), "db", "upgrade", "--db", empty_database_url],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    results = [(p.wait(timeout=60), p.stdout.read(), p.stderr.read()) for p in upgrades]
    for code, out, err in results:
        assert code == 0, err
        assert json.loads(out)["current"] is True
    current = _cimhes("db", "current", "--db", empty_database_url)
    assert current.returncode == 0, current.stderr
    report = json.loads(current.stdout)
    assert set(report["applied"]) == schema.all_revisions()
    assert report["missing"] == []
    engine = create_engine(empty_database_url)
    try:
        with engine.connect() as connection:
            assert schema.differences(connection) == []
    finally:
        engine.dispose()


def test_store_on_a_server_database_not_upgraded_says_to_run_db_upgrade(request):
    from .databases import postgres_or_skip

    server = postgres_or_skip(request)
    url = server.new_database(migrated=False)
    try:
        with pytest.raises(StoreUnavailable, match=r"cimhes db upgrade"):
            Store(url)
    finally:
        server.drop(url)


def test_a_sqlite_file_made_before_migrations_is_refused_with_a_reason(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = create_engine(url)
    Base.metadata.tables["device"].create(engine)
    engine.dispose()
    with pytest.raises(StoreUnavailable, match="no migration history"):
        Store(url)


def _cimhes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CIMHES), *args], capture_output=True, text=True, timeout=60)


UNREACHABLE = "postgresql+psycopg://cimhes:s3cret-pw@127.13.0.1:1/cimhes"


@pytest.mark.parametrize("command, url, says", [
    (["db", "upgrade"], UNREACHABLE, "is not reachable"),
    (["db", "upgrade"], "postgresql+psycopg2://cimhes:s3cret-pw@127.13.0.1/cimhes",
     "no driver for 'postgresql+psycopg2'"),
    (["serve", "--inventory", "{inventory}"], UNREACHABLE, "is not reachable"),
    (["serve", "--inventory", "{inventory}"], "mysql+nodriver://cimhes:s3cret-pw@127.13.0.1/x",
     "no driver for 'mysql+nodriver'"),
])
def test_an_unusable_database_is_one_line_and_exit_code_2(tmp_path, command, url, says):
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"meters": []}))
    result = _cimhes(*[a.format(inventory=inventory) for a in command], "--db", url)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cimhes {command[0]}: error: database ")
    assert says in lines[0]
    assert "s3cret-pw" not in result.stderr
