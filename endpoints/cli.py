"""The `cimhes` command: `demo`, `serve`, `simulate`, `db`, `collect`, `jobs`, and users and
audit administration.

Scripts drive these commands, so their output is a contract: once a server accepts requests it
prints one JSON line on stdout (`{"ready": true, "base_url": ..., ...}`); logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from twisted.internet.error import CannotListenError

from cimhes.drivers import DeviceAddress
from cimhes.engine import redaction
from cimhes.endpoints.process_log import start_logging
from cimhes.drivers.limits import SPARE_DESCRIPTORS
from cimhes.engine.garbage_collection import tune_for_throughput
from cimhes.engine.ready_sockets import bound_events_per_turn
from cimhes.engine.rate_limits import DEFAULT_CONTROL_LIMITS, ControlLimit
from cimhes.engine.users import Role
from cimhes.endpoints.admin_cli import (
    add_admin_commands,
    add_store_arguments,
    run_admin,
    secret_key_file,
)
from cimhes.endpoints.engine_cli import (
    add_engine_commands,
    add_engine_options,
    engine_settings,
    run_engine_command,
)
from cimhes.endpoints.amqp_options import add_amqp_options, amqp_settings
from cimhes.endpoints.facade_options import add_facade_options, facade_settings
from cimhes.endpoints.limit_options import add_limit_options, limit_settings
from cimhes.endpoints.push_options import (
    DEMO_PUSH_PORT,
    add_push_options,
    listen_for_pushes,
    push_settings,
)
from cimhes.endpoints.reply_options import add_reply_options, reply_settings
from cimhes.endpoints.scale_options import add_scale_options, scale_settings
from cimhes.endpoints.session_options import add_session_options, ensure_descriptors, session_settings

DEMO_USER = "demo"
from cimhes.endpoints.db import add_db_commands, run_db_command
from cimhes.endpoints import config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cimhes", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cimhes {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="simulated IDIS meters and the head-end in one process, embedded defaults")
    demo.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    demo.add_argument("--host", default="127.0.0.1", help="HTTP interface (default 127.0.0.1)")
    demo.add_argument("--meters", type=int, default=10, help="simulated meters (default 10)")
    demo.add_argument("--meter-port", type=int, default=4059,
                      help="DLMS port of every simulated meter (default 4059)")
    demo.add_argument("--delay", type=float, default=0.0,
                      help="simulated meter response delay in seconds (a WAN meter)")
    demo.add_argument("--security", choices=["low", "hls-gmac", "mixed"], default="low",
                      help="how the simulated meters associate (default low; hls-gmac: HLS-GMAC "
                           "with suite 0, keys in the inventory file)")
    demo.add_argument("--inventory", default="var/cimhes-demo-inventory.json",
                      help="where the demo writes its fleet's inventory (with keys: mode 0600)")
    add_store_arguments(demo, "var/cimhes-demo.sqlite")
    add_session_options(demo)
    add_engine_options(demo)
    add_limit_options(demo)
    add_reply_options(demo)
    _tls_arguments(demo)
    add_facade_options(demo)
    add_amqp_options(demo)
    add_push_options(demo, DEMO_PUSH_PORT)
    demo.add_argument("--tls-self-signed", action="store_true",
                      help="serve HTTPS with a self-signed pair made beside the database "
                           "(<db>.tls-cert.pem, <db>.tls-key.pem); the ready line names the "
                           "certificate, which clients use as their CA bundle")

    serve = commands.add_parser("serve", help="the head-end alone, devices from an inventory file")
    serve.add_argument("--inventory", help="inventory JSON (from cimhes simulate); required "
                                           "unless --role engine")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--schedules", help="read schedules file (JSON): run them as they fall due")
    add_store_arguments(serve, "var/cimhes.sqlite")
    add_session_options(serve)
    add_engine_options(serve)
    add_limit_options(serve)
    add_reply_options(serve)
    _tls_arguments(serve)
    add_facade_options(serve)
    add_amqp_options(serve)
    add_push_options(serve)
    add_scale_options(serve)

    add_admin_commands(commands, "var/cimhes.sqlite")
    add_db_commands(commands)
    add_engine_commands(commands, "var/cimhes.sqlite")
    configured = {name: commands.choices[name] for name in config.COMMANDS}
    for command in configured.values():
        config.add_config_options(command)
    shown = commands.add_parser(
        "config", help="the configuration file: `config show [serve|demo|collect [FLAGS]]`")
    shown.add_argument("action", choices=["show"])
    shown.add_argument("flags", nargs=argparse.REMAINDER,
                       help="a command and its flags (--config FILE among them)")

    commands.add_parser("simulate", help="a fleet of simulated IDIS meters (see simulate -h)",
                        add_help=False)
    commands.add_parser("harness", help="test an IEC 61968-9 head-end or MDM (see harness -h)",
                        add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["harness"]:
        from cimhes.endpoints.harness import harness_main
        return harness_main(argv[1:])
    if argv[:1] == ["simulate"]:
        from cimhes.fixtures.fleet import simulate_main
        return simulate_main(argv[1:])
    try:
        if argv[:2] == ["config", "show"]:
            print(config.show(configured, argv[2:]))
            return 0
        args = config.parse(parser, configured, argv)
    except config.ConfigError as exc:
        print(f"cimhes: error: {exc}", file=sys.stderr)
        return 2
    start_logging(getattr(args, "log_level", "info"),
                  json_lines=getattr(args, "log_format", "text") == "json")
    # Alembic narrates its set-up at INFO; cimhes.engine.schema logs what an upgrade applied.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Imported here: `simulate` needs no database, and starts faster without one.
    from cimhes.engine.schema import SchemaOutOfDate
    from cimhes.engine.store import StoreUnavailable

    try:
        if args.command in ("user", "audit"):
            return run_admin(args, _database_url)
        if args.command == "db":
            return run_db_command(args, _database_url)
        if args.command in ("collect", "jobs"):
            return run_engine_command(args, _database_url, _read_inventory)
        return _demo(args) if args.command == "demo" else _serve(args)
    except (CannotListenError, OSError, ValueError, StoreUnavailable, SchemaOutOfDate) as exc:
        # What a user can fix (a port in use, a bad inventory file, a database down or without
        # its driver) is said in one line.
        print(f"cimhes {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        # A locked or unreachable database: one line, never the SQL and its parameters.
        print(f"cimhes {args.command}: error: {redaction.summary(exc)}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cimhes")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def _database_url(value: str) -> str:
    if "://" in value:
        return value
    path = Path(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _tls_arguments(parser) -> None:
    parser.add_argument("--tls-cert", help="PEM certificate (chain) to serve HTTPS with")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--ca-bundle",
                        help="PEM CAs trusted for outgoing callbacks (default: the system's)")
    parser.add_argument("--control-limit", action="append", type=ControlLimit.parse,
                        metavar="KIND:user|group:COUNT/SECONDS",
                        help="a rate limit on controls, e.g. disconnect:user:10/60 "
                             "(repeatable; given any, they replace the defaults)")


def _demo(args) -> int:
    from twisted.internet import reactor

    from cimhes.endpoints.site import HeadEnd
    from cimhes.fixtures.fleet import start_fleet, write_inventory

    # The simulated meters' listening and accepted sockets live in this process too.
    # HTTP connections count too: each is a descriptor up to the door's cap.
    ensure_descriptors(args.sessions,
                       SPARE_DESCRIPTORS + args.max_connections + 2 * args.meters)
    fleet = start_fleet(reactor, args.meters, response_delay=args.delay, port=args.meter_port,
                        security=args.security)
    inventory = fleet.inventory()
    Path(args.inventory).parent.mkdir(parents=True, exist_ok=True)
    write_inventory(args.inventory, fleet)
    head_end = HeadEnd(reactor, _settings(args),
                       [DeviceAddress.from_inventory(e) for e in inventory["meters"]])
    reactor.addSystemEventTrigger("before", "shutdown", fleet.stop_all)
    if args.tls_self_signed and not args.tls_cert:
        from cimhes.endpoints.tls import make_self_signed

        args.tls_cert, args.tls_key = f"{args.db}.tls-cert.pem", f"{args.db}.tls-key.pem"
        make_self_signed(args.tls_cert, args.tls_key, [args.host])
    # A demo works with no set-up: a user holding every role, with a new password each run.
    password = secrets.token_urlsafe(12)
    head_end.users.add_user(DEMO_USER, password, list(Role), digest=True, actor="cimhes demo",
                            source="local", replace=True)
    extra = {"tls_cert": str(Path(args.tls_cert).resolve())} if args.tls_self_signed else {}
    return _run(reactor, head_end, args,
                meters=[entry["mrid"] for entry in inventory["meters"]],
                inventory=str(args.inventory), user=DEMO_USER, password=password, **extra)


def _serve(args) -> int:
    from twisted.internet import reactor

    from cimhes.endpoints.site import HeadEnd

    ensure_descriptors(args.sessions, SPARE_DESCRIPTORS + args.max_connections)
    settings = _settings(args)
    settings.scale.check(settings.database_url, settings.amqp_url)
    if args.inventory is None and settings.scale.role != "engine":
        raise ValueError("--inventory is required (an engine alone may go without)")
    inventory = _read_inventory(Path(args.inventory)) if args.inventory else None
    head_end = HeadEnd(reactor, settings, inventory)
    return _run(reactor, head_end, args, role=settings.scale.role,
                meters=[d.address.mrid for d in inventory.devices] if inventory else [])


def _settings(args):
    from cimhes.endpoints.site import HeadEndSettings

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    return HeadEndSettings(database_url=_database_url(args.db),
                           secret_key_file=secret_key_file(args.db, args.secret_key_file),
                           callback_ca_bundle=args.ca_bundle,
                           control_limits=tuple(args.control_limit or DEFAULT_CONTROL_LIMITS),
                           engine=engine_settings(args),
                           schedules_file=getattr(args, "schedules", None),
                           **session_settings(args), **facade_settings(args),
                           **limit_settings(args), **amqp_settings(args),
                           **reply_settings(args), **push_settings(args),
                           **scale_settings(args))


def _read_inventory(path: Path):
    """An inventory file (README, "Inventory file"; `cimhes simulate` writes one)."""
    from cimhes.engine.inventory import Inventory

    try:
        return Inventory.from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an inventory: {exc}") from None


def _run(reactor, head_end, args, meters: list[str], **extra) -> int:
    host = args.host
    try:
        if args.tls_cert:
            from cimhes.endpoints.tls import server_options

            listening = reactor.listenSSL(args.port, head_end.site,
                                          server_options(args.tls_cert, args.tls_key),
                                          interface=host)
        else:
            listening = reactor.listenTCP(args.port, head_end.site, interface=host)
        push = listen_for_pushes(reactor, head_end, args)
    except (CannotListenError, OSError, ValueError):
        head_end.store_runner.stop()  # its thread would keep the process alive
        raise
    tune_for_throughput()
    bound_events_per_turn(reactor)  # thousands of sessions' answers in bounded turns
    base_url = f"{'https' if args.tls_cert else 'http'}://{host}:{listening.getHost().port}"
    from cimhes.queue.connection import redact

    broker = head_end.amqp.connection if head_end.amqp is not None else \
        getattr(head_end, "job_connection", None)  # an engine's: jobs only (endpoints/scale.py)
    amqp = redact(broker.url) if broker is not None else "off"
    if broker is None:
        logging.getLogger("cimhes.queue").info(
            "AMQP is off (no --amqp-url): events are stored and kept in the outbox")
    ready = {"ready": True, "base_url": base_url, "meters": meters, "amqp": amqp, "push": push,
             # An engine-role process has no CIM doors, so it names none.
             "services": {} if extra.get("role") == "engine" else {
                 name: f"{base_url}/cim/{name}" for name in (
                     "GetMeterReadings", "GetEndDeviceEvents", "ExecuteEndDeviceControls")},
             "pid": os.getpid(), **extra}
    # Said once the reactor runs, so a caller that signals the process as soon as it reads the
    # line finds Twisted's SIGINT/SIGTERM handlers installed (a clean stop, exit code 0).
    reactor.callWhenRunning(print, json.dumps(ready), flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
