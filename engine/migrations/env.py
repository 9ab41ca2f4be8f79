"""Alembic's environment for cimhes: run by cimhes.engine.schema, never by an alembic.ini.

Runs the migrations on the connection cimhes.engine.schema hands over (or on a new engine for
`sqlalchemy.url`), one run at a time per database, against the metadata of every model module.
"""
from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.types import TypeDecorator

from cimhes.engine.schema import metadata

# Any constant: the key of the PostgreSQL advisory lock that serialises concurrent upgrades.
_UPGRADE_LOCK = 0x63696D686573  # "cimhes"


def _serialise(connection) -> None:
    if connection.dialect.name == "sqlite":
        # pysqlite opens no transaction for DDL; an immediate one takes the write lock now, so
        # a second process waits here and then finds the revisions applied.
        if not connection.connection.dbapi_connection.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})


def _render_item(kind, item, autogen_context):
    # A revision is frozen text: a cimhes column type is written as the plain type it stores
    # (EpochMillis is a BIGINT), so old revisions never import code that may change.
    if kind == "type" and isinstance(item, TypeDecorator):
        return f"sa.{item.impl.__class__.__name__}()"
    return False


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata(),
        compare_type=True,
        render_item=_render_item,
        # SQLite alters a table by copying it; batch mode makes op.alter_column etc. do that.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    _serialise(connection)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()
