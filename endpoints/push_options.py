"""The push listener of `cimhes serve` and `cimhes demo`: where meters deliver their DataNotifications.

`--push-port P` on `--push-host` (default: the HTTP `--host`), `--no-push` to run without it.
`serve` listens on 4059 by default (the IANA port of DLMS/COSEM, where meters' push setups
point); `demo` on any free port (0), named on its ready line, so demos side by side never clash. `listen_for_pushes` starts
`PushListenerFactory` (endpoints/push_listener.py) on the head-end's `PushIntake`, whose
directory is the inventory's devices: pushed alarms become stored EndDeviceEvents (and, through
the event outbox, AMQP events to the DMS when AMQP is on), pushed readings stored readings.
What the ready line says of it: `"push": {"host": H, "port": P}`, or `"push": "off"`.
The push ingress journal (engine/push_journal.py): `--push-journal DIR` (default: beside the
SQLite database, ``<db>.push-journal``; ``var/cimhes-push-journal`` for a database URL),
`--push-journal-max-bytes` (default 64 MiB), `--push-journal-fsync` (survive a power loss, at
the cost bench/README.md gives), `--no-push-journal`. Its unfinished entries are replayed
before the listener opens; the ready line's ``push`` says how many (``"replayed"``). After an
unclean stop the meters that pushed in the last minutes are read back (engine/push_recovery.py:
`--push-recovery-lookback`, default 600 s; `--push-recovery-max-meters`, default 2,000, 0: off);
the ready line's ``"recovery"`` names how many meters and the window.
`--feeder-outage-threshold` and `--feeder-outage-window` set the feeder-outage summaries of the
pushed (and read) events (engine/feeder_outages.py).
"""
from __future__ import annotations

from datetime import timedelta

from cimhes.endpoints.push_listener import PushListenerFactory
from cimhes.engine import push_recovery
from cimhes.engine.push_journal import DEFAULT_MAX_BYTES, PushJournal
from cimhes.engine.feeder_outages import DEFAULT_THRESHOLD, DEFAULT_WINDOW, FeederOutageSettings

# Connections the kernel queues before the listener accepts them: a storm's last-gasp pushes
# arrive together, and a full queue drops a meter's (unconfirmed) push (with the default of 50,
# half of a 5,000-push storm was lost: tests/test_amqp_faults.py).
PUSH_BACKLOG = 1024

DEFAULT_PUSH_PORT = 4059  # serve
DEMO_PUSH_PORT = 0  # demo: any free port


def add_push_options(parser, default_port: int = DEFAULT_PUSH_PORT) -> None:
    parser.add_argument("--push-port", type=int, default=default_port,
                        help=f"TCP port of the push listener (DataNotifications, TCP wrapper; "
                             f"default {default_port}; 0: any free port)")
    parser.add_argument("--push-host", default=None,
                        help="interface of the push listener (default: --host)")
    parser.add_argument("--no-push", action="store_true",
                        help="do not listen for pushes")
    parser.add_argument("--push-journal", default=None, metavar="DIR",
                        help="directory of the push ingress journal (default: <db>.push-journal "
                             "beside a SQLite --db, var/cimhes-push-journal otherwise)")
    parser.add_argument("--push-journal-max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        metavar="BYTES", help="past this the journal takes no new push (logged; "
                        f"default {DEFAULT_MAX_BYTES})")
    parser.add_argument("--push-journal-fsync", action="store_true",
                        help="fsync the journal on a thread of its own as records are written (survives a power loss; "
                             "costs CPU and latency, bench/README.md)")
    parser.add_argument("--no-push-journal", action="store_true",
                        help="take pushes without the journal (a killed process loses the ones "
                             "read and not yet committed)")
    parser.add_argument("--push-recovery-lookback", type=float,
                        default=push_recovery.DEFAULT_LOOKBACK.total_seconds(), metavar="SECONDS",
                        help="after an unclean stop, read the event logs of the meters that pushed "
                             "this long before the last committed push, from then on (default "
                             f"{push_recovery.DEFAULT_LOOKBACK.total_seconds():g})")
    parser.add_argument("--push-recovery-max-meters", type=int,
                        default=push_recovery.DEFAULT_MAX_METERS, metavar="METERS",
                        help="at most this many meters read back after an unclean stop (0: none; "
                             f"default {push_recovery.DEFAULT_MAX_METERS})")
    parser.add_argument("--feeder-outage-threshold", type=int, default=DEFAULT_THRESHOLD,
                        metavar="METERS",
                        help="meters of one feeder losing (or getting back) power within the "
                             "window that make one feeder-outage (restored) event "
                             f"(default {DEFAULT_THRESHOLD})")
    parser.add_argument("--feeder-outage-window", type=float,
                        default=DEFAULT_WINDOW.total_seconds(), metavar="SECONDS",
                        help="the window of --feeder-outage-threshold, by the events' times "
                             f"(default {DEFAULT_WINDOW.total_seconds():g})")


def push_settings(args) -> dict:
    return {"feeder_outages": FeederOutageSettings(
        args.feeder_outage_threshold, timedelta(seconds=args.feeder_outage_window))}


def listen_for_pushes(reactor, head_end, args):
    """Start the push listener the options ask for; what the ready line says of it."""
    if args.no_push:
        return "off"
    if not 0 <= args.push_port < 65536:
        raise ValueError(f"--push-port {args.push_port} is not 0..65535")
    host = args.push_host or args.host
    said = {"host": host}
    if not args.no_push_journal:
        journal = PushJournal(journal_directory(args), max_bytes=args.push_journal_max_bytes,
                              fsync=args.push_journal_fsync)
        reactor.addSystemEventTrigger("after", "shutdown", journal.close)
        head_end.push_intake.use_journal(journal)
        # Before the listener opens: what a killed process had read is taken first.
        said["replayed"] = head_end.push_intake.replay()
        if not journal.stopped_cleanly and args.push_recovery_max_meters > 0:
            said["recovery"] = _recover(reactor, head_end, args, journal)
    listening = reactor.listenTCP(args.push_port, PushListenerFactory(reactor, head_end.push_intake),
                                  backlog=PUSH_BACKLOG, interface=host)
    reactor.addSystemEventTrigger("before", "shutdown", listening.stopListening)
    said["port"] = listening.getHost().port
    return said


def _recover(reactor, head_end, args, journal) -> dict:
    """Plan the read-back of what the kernel took and the killed process never read, and start it
    once the reactor runs; what the ready line says of it."""
    from datetime import datetime, timezone

    from cimhes.endpoints.session_options import session_settings

    now = datetime.now(timezone.utc)
    last = datetime.fromtimestamp(journal.last_commit, timezone.utc) if journal.last_commit \
        else now
    lookback = timedelta(seconds=args.push_recovery_lookback)
    plan = push_recovery.plan(head_end.store, last, now, lookback=lookback,
                              max_meters=args.push_recovery_max_meters)
    recovery = push_recovery.PushRecovery(
        reactor, head_end.store_runner, head_end.events, head_end.push_intake.devices(),
        limits=session_settings(args)["session_limits"],
        security=getattr(head_end, "meter_security", None))
    head_end.push_intake.guard(plan.mrids, plan.since, plan.until)
    reactor.callWhenRunning(recovery.run, plan)
    return {"meters": len(plan.mrids), "skipped": plan.skipped, "since": plan.since.isoformat(),
            "until": plan.until.isoformat()}


def journal_directory(args) -> str:
    if args.push_journal:
        return args.push_journal
    db = getattr(args, "db", None) or "var/cimhes.sqlite"
    return "var/cimhes-push-journal" if "://" in db else f"{db}.push-journal"
