"""The `cimhes db` commands: bring a database's schema up to date, show it, write a revision.

`upgrade` is how a shared database (PostgreSQL) gets its schema before any `cimhes serve` uses
it; the embedded SQLite file is upgraded by the store itself on start. Output is one JSON line
on stdout; a database that cannot be used is one line on stderr and exit code 2 (cli.main).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DEFAULT_DB = "var/cimhes.sqlite"


def add_db_commands(commands) -> None:
    db = commands.add_parser("db", help="database schema: upgrade, current, revision")
    actions = db.add_subparsers(dest="db_command", required=True)
    upgrade = actions.add_parser("upgrade", help="apply every migration not yet applied")
    current = actions.add_parser("current", help="the applied revisions; exit 1 unless current")
    for action in (upgrade, current):
        action.add_argument("--db", default=DEFAULT_DB,
                            help=f"SQLite file or SQLAlchemy URL (default {DEFAULT_DB})")
    revision = actions.add_parser(
        "revision", help="(developers) write the next revision of a module's branch from the "
                         "difference between its models and the migrations")
    revision.add_argument("-m", "--message", required=True)
    revision.add_argument("--branch", required=True,
                          help="the owning module's branch label: store, jobs, ...")


def run_db_command(args: argparse.Namespace, database_url) -> int:
    from cimhes.engine import schema
    from cimhes.engine.store import open_database

    if args.db_command == "revision":
        with tempfile.TemporaryDirectory() as scratch:
            path = schema.new_revision(args.message, args.branch,
                                       f"sqlite:///{Path(scratch) / 'scratch.sqlite'}")
        print(json.dumps({"revision": path}))
        return 0
    engine = open_database(database_url(args.db))
    try:
        shown = engine.url.render_as_string(hide_password=True)
        if args.db_command == "upgrade":
            schema.upgrade(engine)
        with engine.connect() as connection:
            applied = schema.applied_revisions(connection)
        missing = schema.all_revisions() - applied
        print(json.dumps({"database": shown, "applied": sorted(applied),
                          "missing": sorted(missing), "current": not missing}))
        return 0 if not missing else 1
    finally:
        engine.dispose()
