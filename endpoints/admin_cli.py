"""The administrative commands of `cimhes`: `user add|list|disable|enable|grant|revoke|roles`
and `audit export`. They work on the store directly (no server needs to run); each change is
audited with the operating-system user as actor."""
from __future__ import annotations

import argparse
import getpass
import sys
from datetime import datetime, timezone
from pathlib import Path


def add_store_arguments(parser: argparse.ArgumentParser, default_db: str) -> None:
    parser.add_argument("--db", default=default_db,
                        help=f"SQLite file or SQLAlchemy URL (default {default_db})")
    parser.add_argument("--secret-key-file", default=None,
                        help="key of the secrets kept at rest (default: beside the SQLite file, "
                             "<db>.secret-key; var/cimhes-secret.key for a URL)")


def secret_key_file(db: str, given: str | None) -> str:
    """The key file a head-end and its admin commands share for one database."""
    if given:
        return given
    return "var/cimhes-secret.key" if "://" in db else f"{db}.secret-key"


def add_admin_commands(commands, default_db: str) -> None:
    from cimhes.engine.users import Role

    user = commands.add_parser("user", help="users and their roles (see user -h)")
    actions = user.add_subparsers(dest="user_command", required=True)
    add = actions.add_parser("add", help="add a user (password asked, or read from stdin)")
    add.add_argument("name")
    add.add_argument("--role", action="append", default=[], choices=[r.value for r in Role],
                     help="a role to grant (repeatable); `cimhes user roles` lists them")
    add.add_argument("--digest", action="store_true",
                     help="also keep the password encrypted so WS-Security PasswordDigest works")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.add_argument("--replace", action="store_true",
                     help="reset an existing user's password and roles")
    listing = actions.add_parser("list", help="users, their roles, disabled or not")
    actions.add_parser("roles", help="the roles and what each allows")
    disable = actions.add_parser("disable", help="refuse every login of a user")
    disable.add_argument("name")
    enable = actions.add_parser("enable", help="allow a disabled user again")
    enable.add_argument("name")
    grant = actions.add_parser("grant", help="grant a role to a user")
    grant.add_argument("name")
    grant.add_argument("role", choices=[r.value for r in Role])
    revoke = actions.add_parser("revoke", help="take a role from a user")
    revoke.add_argument("name")
    revoke.add_argument("role", choices=[r.value for r in Role])
    for parser in (add, listing, disable, enable, grant, revoke):
        add_store_arguments(parser, default_db)

    audit = commands.add_parser("audit", help="the audit trail (see audit -h)")
    audit_actions = audit.add_subparsers(dest="audit_command", required=True)
    export = audit_actions.add_parser("export", help="the audit trail as CSV")
    export.add_argument("--since", help="ISO 8601 time (UTC if no zone), inclusive")
    export.add_argument("--until", help="ISO 8601 time (UTC if no zone), exclusive")
    export.add_argument("--out", help="CSV file to write (default: standard output)")
    add_store_arguments(export, default_db)


def run_admin(args, database_url) -> int:
    """Run a `user` or `audit` command; returns the exit code."""
    from cimhes.engine.store import Store
    from cimhes.engine.users import Role, SecretBox, UserStore

    if args.command == "user" and args.user_command == "roles":
        for role in Role:
            print(f"{role.value:<20} {role.meaning}")
        return 0
    secret_box = SecretBox.from_file(Path(secret_key_file(args.db, args.secret_key_file)))
    store = Store(database_url(args.db), secret_box)
    try:
        users = UserStore(store, secret_box)
        actor = f"cli:{getpass.getuser()}"
        if args.command == "audit":
            return _export(users, args)
        command = args.user_command
        if command == "add":
            password = _password(args.password_stdin)
            info = users.add_user(args.name, password, args.role, digest=args.digest,
                                  actor=actor, source="local", replace=args.replace)
            print(f"user {info.name} added with roles "
                  f"{', '.join(sorted(r.value for r in info.roles)) or '(none)'}")
        elif command == "list":
            for info in users.users():
                state = "disabled" if info.disabled else "enabled"
                digest = " digest" if info.digest else ""
                roles = ",".join(sorted(r.value for r in info.roles)) or "-"
                print(f"{info.name}\t{state}{digest}\t{roles}")
        elif command in ("disable", "enable"):
            users.set_disabled(args.name, command == "disable", actor=actor, source="local")
            print(f"user {args.name} {command}d")
        elif command in ("grant", "revoke"):
            users.grant(args.name, args.role, actor=actor, source="local",
                        revoke=command == "revoke")
            print(f"user {args.name}: role {args.role} {command}d")
        return 0
    finally:
        store.close()


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ValueError("no terminal to ask the password on; use --password-stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _export(users, args) -> int:
    since, until = _time(args.since), _time(args.until)
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as out:
            rows = users.export_audit_csv(out, since, until)
        print(f"{rows} audit rows written to {args.out}", file=sys.stderr)
    else:
        users.export_audit_csv(sys.stdout, since, until)
    return 0

