"""The engine's commands and options: `cimhes collect`, `cimhes jobs`, and the engine's flags.

`cimhes collect --schedules FILE --schedule NAME` runs one schedule's collection now, in this
process, and prints its progress while it runs (one line every `--progress-every` seconds:
done, failed, pending) and at the end what failed and what stays missing per meter. Run again
after a crash, it resumes the same run (the run is keyed by its fire time) and finishes only
what was not finished. `cimhes jobs` shows the job requests in a store and their progress;
`cimhes jobs --request KEY` one request's failed and incomplete meters.

Exit codes: 0 when every meter is complete, 1 when some failed or stay incomplete, 2 for a
usage error.
"""
from __future__ import annotations

import argparse
import logging
from datetime import datetime, timezone
from pathlib import Path

from cimhes.engine.limits import EngineSettings

log = logging.getLogger(__name__)

# Flag help for each EngineSettings field (the defaults are the dataclass's).
_ENGINE_FLAGS: dict[str, str] = {
    "max_sessions_per_route": "meter sessions open at once on one route (cell, segment)",
    "min_device_gap": "seconds between two connections to one meter",
    "prefetch": "jobs claimed ahead of free sessions",
    "max_attempts": "tries of a scheduled read before it fails",
    "on_demand_attempts": "tries of an on-demand read (its caller waits)",
    "retry_delay": "seconds before the first retry; doubled on each",
    "retry_delay_max": "longest wait between two tries, s",
    "retry_jitter": "random share added to each wait (0.2: up to 20%%)",
    "reread_delay": "seconds between re-reads of missing intervals",
    "poll_interval": "seconds between looks for jobs other processes wrote",
    "request_session_share": "part of --sessions one request may hold while another waits",
}


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (jobs, retries, re-reads)")
    defaults = EngineSettings()
    for name in EngineSettings.names():
        default = getattr(defaults, name)
        group.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                           help=f"{_ENGINE_FLAGS[name]} (default {default:g})")


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """EngineSettings from the parsed options; ValueError naming a bad one."""
    return EngineSettings(**{name: getattr(args, name) for name in EngineSettings.names()})


def add_engine_commands(commands, default_db: str) -> None:
    from cimhes.endpoints.admin_cli import add_store_arguments
    from cimhes.endpoints.session_options import add_session_options

    collect = commands.add_parser(
        "collect", help="run one read schedule's collection now and show its progress")
    collect.add_argument("--schedules", required=True, help="schedules file (JSON)")
    collect.add_argument("--schedule", required=True, help="name of the schedule to run")
    collect.add_argument("--inventory", help="inventory JSON to load into the store first")
    collect.add_argument("--at", help="the run's time, ISO 8601 UTC (default now): the "
                                      "schedule's last fire time at or before it is run")
    collect.add_argument("--progress-every", type=float, default=2.0,
                         help="seconds between progress lines (default 2)")
    add_store_arguments(collect, default_db)
    add_session_options(collect)
    add_engine_options(collect)

    jobs = commands.add_parser("jobs", help="job requests in the store and their progress")
    jobs.add_argument("--request", help="one request's key: its failed and incomplete meters")
    jobs.add_argument("--limit", type=int, default=20, help="requests listed (default 20)")
    add_store_arguments(jobs, default_db)


def run_engine_command(args: argparse.Namespace, database_url, read_inventory) -> int:
    """Run `collect` or `jobs`; `database_url` and `read_inventory` are the CLI's readers of
    --db and of an inventory file."""
    if args.command == "collect":
        devices = read_inventory(Path(args.inventory)) if args.inventory else None
        return _collect(args, database_url(args.db), devices)
    return _jobs(args, database_url(args.db))


def _jobs(args, url: str) -> int:
    from cimhes.engine.jobs import JobStore
    from cimhes.engine.store import Store

    store = Store(url)
    try:
        jobs = JobStore(store)
        if args.request:
            try:
                progress = jobs.progress(args.request)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
            print(progress.line())
            for line in report_lines(jobs.reports(args.request)):
                print(line)
            return 0
        for key, kind, created_at in jobs.requests(args.limit):
            print(f"{created_at.strftime('%Y-%m-%dT%H:%M:%SZ')} {kind:9} "
                  f"{jobs.progress(key).line()}")
        return 0
    finally:
        store.close()


def report_lines(reports) -> list[str]:
    """One line per meter that failed or stays incomplete."""
    lines = []
    for report in reports:
        if report.state == "failed":
            lines.append(f"  {report.device_mrid}: failed after {report.attempts} attempts: "
                         f"{report.last_error}")
        elif report.missing:
            gaps = "; ".join(
                f"{reading_type} " + ", ".join(f"{s:%Y-%m-%dT%H:%M}Z..{e:%H:%M}Z"
                                               for s, e in ranges)
                for reading_type, ranges in report.missing.items())
            lines.append(f"  {report.device_mrid}: missing after {report.rereads} re-reads: "
                         f"{gaps}")
    return lines


def _collect(args, url: str, devices) -> int:
    from twisted.internet import reactor, task

    from cimhes.drivers.limits import SPARE_DESCRIPTORS
    from cimhes.drivers.security import DEFAULT_CLIENT_SYSTEM_TITLE, HeadEndSecurity
    from cimhes.endpoints.admin_cli import secret_key_file
    from cimhes.endpoints.session_options import ensure_descriptors, session_settings
    from cimhes.engine.dispatch import Dispatcher
    from cimhes.engine.event_fetches import EventFetchService
    from cimhes.engine.events import EventStore
    from cimhes.engine.schedule import ScheduleConfig, Scheduler
    from cimhes.engine.security import CounterStore, StoredCounters
    from cimhes.engine.store import Store, StoreRunner
    from cimhes.engine.users import SecretBox

    config = ScheduleConfig.from_file(args.schedules)
    schedule = config.schedule(args.schedule)
    at = _instant(args.at) if args.at else datetime.now(timezone.utc)
    settings = engine_settings(args)
    sessions = session_settings(args)
    ensure_descriptors(sessions["read_concurrency"], SPARE_DESCRIPTORS)

    # The meters' secrets are sealed with the key `serve` uses for this database.
    store = Store(url, SecretBox.from_file(secret_key_file(args.db, args.secret_key_file)))
    if devices is not None:
        store.load_inventory(devices)
    runner = StoreRunner(reactor, store)
    security = HeadEndSecurity(bytes.fromhex(DEFAULT_CLIENT_SYSTEM_TITLE),
                               StoredCounters(runner, CounterStore(store)))
    dispatcher = Dispatcher(reactor, runner, settings,
                            max_sessions=sessions["read_concurrency"],
                            session_limits=sessions["session_limits"],
                            connections_per_second=sessions["connections_per_second"],
                            security=security)
    # A schedule's event-log fetches ("event_logs") run here too, stored as serve stores them.
    EventFetchService(reactor, runner, dispatcher, EventStore(store))
    scheduler = Scheduler(reactor, runner, dispatcher, config)
    outcome = {"code": 1, "over": False}

    def show(key, only_when_finished=False):
        def report(progress):
            if outcome["over"] or only_when_finished and not progress.finished:
                return
            print(progress.line(), flush=True)
            log.info("collection %s", progress.line())
            if progress.finished:
                outcome["over"] = True
                for line in report_lines(dispatcher.jobs.reports(key)):
                    print(line, flush=True)
                outcome["code"] = 0 if progress.counts.get("done", 0) == progress.total \
                    and not progress.incomplete else 1
                reactor.stop()
        return runner.call(dispatcher.jobs.progress, key).addCallback(report)

    def run():
        fire = schedule.latest_fire(at)
        started = scheduler.create_run(schedule, fire)

        def created(result):
            key, ids, new = result
            print(f"{key}: {'created' if new else 'resumed'}, {len(ids)} meters", flush=True)
            ticker = task.LoopingCall(show, key)
            ticker.start(args.progress_every, now=False)
            # The last line comes as soon as the run finishes, not at the next tick.
            dispatcher.on_settled = lambda: show(key, only_when_finished=True)
            return dispatcher.start(requeue=True)

        def failed(failure):
            print(f"cimhes collect: error: {failure.getErrorMessage()}")
            outcome["code"] = 2
            reactor.stop()
        started.addCallback(created).addErrback(failed)

    reactor.callWhenRunning(run)
    reactor.run()
    dispatcher.stop()
    runner.stop()
    store.close()
    return outcome["code"]


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--at {text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise ValueError(f"--at {text!r} needs a time zone (Z for UTC)")
    return value.astimezone(timezone.utc)
