"""The database schema and its versions: which modules' models make it, and Alembic run from Python.

Every table is a model on `cimhes.engine.store.Base`, in the module that owns it, and every
module with tables is named in `MODEL_MODULES` so that migrations and the schema check see all of
them. The revisions live in `engine/migrations/versions/` (inside the package, so an installed
cimhes carries them). Each owning module has its own Alembic branch, labelled with its name
(`store`, `jobs`, ...): a module's revisions form one line, branches never need merging, and
`upgrade("heads")` applies every branch. docs/architecture.md ("Schema migrations") says how a
module adds a revision.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import Connection, Engine

# The modules whose models are tables; a module that adds tables adds itself here.
MODEL_MODULES = (
    "cimhes.engine.store",
    "cimhes.engine.users",
    "cimhes.engine.security",
    "cimhes.engine.events",
    "cimhes.engine.jobs",
    "cimhes.engine.device_status",
    "cimhes.engine.controls",
    "cimhes.engine.feeder_outages",
    "cimhes.engine.route_leases",
    "cimhes.engine.pending_replies",
)

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"


class SchemaOutOfDate(Exception):
    """The database is not at the revisions this code expects (one line, for the operator)."""


def metadata() -> MetaData:
    """The metadata of every table, with all model modules imported."""
    for name in MODEL_MODULES:
        importlib.import_module(name)
    from cimhes.engine.store import Base

    return Base.metadata


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic configuration for cimhes's migrations, without an alembic.ini. Given a
    connection, the migrations run on it (env.py takes it from `attributes`)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(MIGRATIONS / "versions"))
    if url is not None:
        # ConfigParser interpolation: a literal % in a URL (an escaped password) must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Apply every revision not yet applied, on every branch (`alembic upgrade heads`).

    Safe when several processes start at once: env.py serialises the runs (SQLite: an
    immediate transaction; PostgreSQL: an advisory lock), so the second finds the work done."""
    with engine.connect() as connection:
        _refuse_unversioned(connection)
        before = applied_revisions(connection)
        command.upgrade(alembic_config(connection), "heads")
        connection.commit()
        applied = applied_revisions(connection) - before
    if applied:
        log.info("database schema upgraded: applied %s", ", ".join(sorted(applied)))


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def all_revisions() -> set[str]:
    """Every revision of every branch: what a current database has applied."""
    return {r.revision for r in _script().walk_revisions()}


def applied_revisions(connection: Connection) -> set[str]:
    """The revisions a database has applied: those alembic_version names and everything below
    them (Alembic records only heads, and leaves out a revision another depends on)."""
    heads = MigrationContext.configure(connection).get_current_heads()
    if not heads:
        return set()
    return {r.revision for r in _script().iterate_revisions(heads, "base")}


def require_current(engine: Engine) -> None:
    """Raise SchemaOutOfDate unless the database has applied every revision."""
    with engine.connect() as connection:
        applied = applied_revisions(connection)
    missing = all_revisions() - applied
    if missing:
        raise SchemaOutOfDate(
            f"the database schema is not current (missing revisions {', '.join(sorted(missing))})"
            f"; run `cimhes db upgrade --db URL`")


def differences(connection: Connection) -> list:
    """What Alembic's autogenerate finds between the database and the models (`alembic check`):
    an empty list when the migrations made exactly the models' schema."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, metadata())


def _refuse_unversioned(connection: Connection) -> None:
    # A database made by create_all before migrations existed: upgrading would fail half-way on
    # "table already exists"; say what it is instead.
    tables = set(inspect(connection).get_table_names())
    if tables and VERSION_TABLE not in tables and tables & set(metadata().tables):
        raise SchemaOutOfDate(
            "the database has cimhes tables but no migration history (it predates migrations); "
            "move it away and start afresh, or stamp it with the matching revision")


def new_revision(message: str, branch: str, database_url: str) -> str:
    """Write the next revision of `branch` (revision ids are `<branch>_<number>`) holding what
    the models have and the migrations lack, compared on `database_url` brought up to every
    head first (a scratch SQLite file will do). A new branch's first revision depends on the
    store's first (the tables others refer to). Returns the new file's path: read and edit it
    before committing it."""
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        upgrade(engine)
        script = _script()
        mine = [r.revision for r in script.walk_revisions() if r.revision.startswith(f"{branch}_")]
        rev_id = f"{branch}_{len(mine) + 1:04d}"
        with engine.connect() as connection:
            config = alembic_config(connection)
            if mine:
                made = command.revision(config, message, autogenerate=True,
                                        head=f"{branch}@head", rev_id=rev_id)
            else:
                made = command.revision(config, message, autogenerate=True, head="base",
                                        branch_label=branch, rev_id=rev_id,
                                        depends_on=None if branch == "store" else "store_0001")
        return made.path
    finally:
        engine.dispose()
