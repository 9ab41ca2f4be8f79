"""Benchmark: the daily collection of a simulated fleet, end to end, in real cimhes processes.

Every scenario reads yesterday's 15-minute profile (96 intervals x 2 reading types: +A and -A)
from every meter of a fresh simulated fleet (`cimhes simulate`, its own process, 100 ms response
delay per request by default) into a fresh store, and measures the engine process(es):

1. sqlite: one engine, `cimhes collect` on SQLite: wall time from the run's creation to 100 %
   complete, CPU seconds and peak RSS of the process, readings stored per second;
2. sqlite-fail-first: the same with 5 % of the meters dropping their first connection (retried
   after --retry-delay) and 5 % leaving an hour out of their first profile read (re-read after
   --reread-delay): time to 100 % through retries and re-reads;
3. postgres: scenario 1 on PostgreSQL (the test server, scripts/postgres);
4. scale-1 and scale-2: `cimhes serve --role api` plus one, then two, `--role engine`
   processes over PostgreSQL and RabbitMQ (scripts/rabbitmq); the speed-up is scale-1 / scale-2
   wall time, measured in the same run.

Each scenario checks, before it is reported, that every meter's 192 values are stored once.
Figures are printed as one table, then the derived meters per engine-hour.

    python bench/collect.py [--meters 10000] [--delay 0.1] [--sessions 200]
                            [--scenarios sqlite,sqlite-fail-first,postgres,scale-1,scale-2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import create_engine, text

PLUS_A = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MINUS_A = "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
VALUES_PER_METER = 2 * 96
SCENARIOS = ("sqlite", "sqlite-fail-first", "postgres", "scale-1", "scale-2")
TICK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def cimhes(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cimhes.endpoints.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            **kwargs)


def first_line(process: subprocess.Popen, timeout: float = 300.0) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got or not got[0]:
        raise SystemExit(f"{process.args[3:5]} printed nothing within {timeout:g} s")
    return got[0]


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS in kB) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    peak = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
                .splitlines() if line.startswith("VmHWM:"))
    return cpu, peak


class Fleet:
    def __init__(self, workdir: Path, meters: int, delay: float, faulty: float):
        self.inventory = workdir / f"inventory-{secrets.token_hex(3)}.json"
        args = ["simulate", "--meters", str(meters), "--port", "0", "--delay", str(delay),
                "--inventory", str(self.inventory)]
        if faulty:
            args += ["--fail-first", str(faulty), "--gaps", str(faulty)]
        self.process = cimhes(*args)
        json.loads(first_line(self.process))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def schedules_file(workdir: Path) -> tuple[Path, str]:
    fire = datetime.now(timezone.utc) - timedelta(minutes=1)
    path = workdir / "schedules.json"
    path.write_text(json.dumps({"schedules": [{
        "name": "daily-profile", "cron": f"{fire.minute} {fire.hour} * * *", "group": "all",
        "reading_types": [PLUS_A, MINUS_A], "window": "previous-day", "deadline_hours": 20}]}))
    return path, fire.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_stored(url: str, meters: int) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            types = {"a": PLUS_A, "b": MINUS_A}
            rows = connection.scalar(text(
                "SELECT count(*) FROM reading WHERE reading_type IN (:a, :b)"), types)
            distinct = connection.scalar(text(
                "SELECT count(*) FROM (SELECT DISTINCT device_id, reading_type, timestamp "
                "FROM reading WHERE reading_type IN (:a, :b)) AS once"), types)
            devices = connection.scalar(text(
                "SELECT count(DISTINCT device_id) FROM reading WHERE reading_type IN (:a, :b)"),
                {"a": PLUS_A, "b": MINUS_A})
    finally:
        engine.dispose()
    if rows != meters * VALUES_PER_METER or distinct != rows or devices != meters:
        raise SystemExit(f"incomplete collection: {rows} values ({distinct} distinct) from "
                         f"{devices} meters, expected {meters * VALUES_PER_METER}")
    return rows


def postgres_database(admin_url: str) -> tuple[str, callable]:
    from sqlalchemy.engine import make_url

    name = f"cimhes_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    upgrade = subprocess.run([sys.executable, "-m", "cimhes.endpoints.cli", "db", "upgrade",
                              "--db", url], capture_output=True, text=True)
    if upgrade.returncode:
        raise SystemExit(upgrade.stderr)

    def drop():
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    return url, drop


def engine_flags(args) -> list[str]:
    return ["--sessions", str(args.sessions), "--min-device-gap", "0",
            "--retry-delay", str(args.wait), "--retry-jitter", "0",
            "--reread-delay", str(args.wait), "--connections-per-second", "0"]


def run_collect(args, workdir: Path, url: str, faulty: float, key_file: Path) -> dict:
    fleet = Fleet(workdir, args.meters, args.delay, faulty)
    try:
        schedules, at = schedules_file(workdir)
        process = cimhes("collect", "--schedules", str(schedules), "--schedule", "daily-profile",
                         "--inventory", str(fleet.inventory), "--db", url, "--at", at,
                         "--secret-key-file", str(key_file), "--progress-every", "5",
                         *engine_flags(args))
        line = first_line(process)
        if "created" not in line:
            raise SystemExit(f"collect: {line}")
        start = time.monotonic()
        for _ in process.stdout:
            pass
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"collect exited {os.waitstatus_to_exitcode(status)}")
        process.returncode = 0
        stored = check_stored(url, args.meters)
        return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                "rss_mb": usage.ru_maxrss / 1024, "stored": stored, "engines": 1}
    finally:
        fleet.stop()


def run_scale(args, workdir: Path, admin_url: str, engines: int, key_file: Path) -> dict:
    from tests.brokers import TestVhost

    url, drop = postgres_database(admin_url)
    vhost = TestVhost(os.environ["CIMHES_TEST_RABBITMQ"])
    fleet = Fleet(workdir, args.meters, args.delay, 0.0)
    processes: list[subprocess.Popen] = []
    try:
        common = ["--db", url, "--amqp-url", vhost.url, "--host", "127.0.25.9", "--port", "0",
                  "--secret-key-file", str(key_file), "--no-push", *engine_flags(args)]
        workers = []
        for _ in range(engines):  # the engines first: the jobs are handed out as they come
            worker = cimhes("serve", "--role", "engine", "--job-prefetch",
                            str(2 * args.sessions), *common)
            processes.append(worker)
            workers.append(worker)
        for worker in workers:
            first_line(worker)
        schedules, _ = schedules_file(workdir)
        api = cimhes("serve", "--role", "api", "--inventory", str(fleet.inventory),
                     "--schedules", str(schedules), *common)
        processes.append(api)
        first_line(api)
        start = time.monotonic()
        store = create_engine(url)
        total = None
        while True:
            with store.connect() as connection:
                counts = dict(connection.execute(text(
                    "SELECT state, count(*) FROM job GROUP BY state")).all())
            total = sum(counts.values())
            if total == args.meters and counts.get("done", 0) == total:
                break
            if counts.get("failed"):
                raise SystemExit(f"jobs failed: {counts}")
            time.sleep(0.2)
        wall = time.monotonic() - start
        usages = [proc_usage(worker.pid) for worker in workers]
        api_cpu, api_rss = proc_usage(api.pid)
        store.dispose()
        stored = check_stored(url, args.meters)
        return {"wall": wall, "cpu": sum(u[0] for u in usages),
                "rss_mb": max(u[1] for u in usages) / 1024, "stored": stored,
                "engines": engines, "api_cpu": api_cpu, "api_rss_mb": api_rss / 1024}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        fleet.stop()
        vhost.delete()
        drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=0.1, help="meter response delay, s")
    parser.add_argument("--sessions", type=int, default=200, help="sessions per engine")
    parser.add_argument("--wait", type=float, default=5.0,
                        help="--retry-delay and --reread-delay of the runs, s (default 5)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    admin_url = os.environ.get("CIMHES_TEST_POSTGRES")
    if any(s != "sqlite" and s != "sqlite-fail-first" for s in chosen):
        if not admin_url or not os.environ.get("CIMHES_TEST_RABBITMQ"):
            parser.error("PostgreSQL and RabbitMQ scenarios need CIMHES_TEST_POSTGRES and "
                         "CIMHES_TEST_RABBITMQ (scripts/postgres, scripts/rabbitmq print them)")
    sys.path.insert(0, str(REPO))
    print(f"# {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"# {platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"Python {platform.python_version()}; {args.meters} meters x {VALUES_PER_METER} "
          f"values, {args.delay * 1000:g} ms per answer, {args.sessions} sessions per engine")
    results = {}
    with tempfile.TemporaryDirectory(prefix="cimhes-bench-") as tmp:
        workdir = Path(tmp)
        key_file = workdir / "secret.key"
        for scenario in chosen:
            if scenario in ("sqlite", "sqlite-fail-first"):
                url = f"sqlite:///{workdir / (scenario + '.sqlite')}"
                result = run_collect(args, workdir, url, 5.0 if "fail" in scenario else 0.0,
                                     key_file)
            elif scenario == "postgres":
                url, drop = postgres_database(admin_url)
                try:
                    result = run_collect(args, workdir, url, 0.0, key_file)
                finally:
                    drop()
            else:
                result = run_scale(args, workdir, admin_url, int(scenario[-1]), key_file)
            results[scenario] = result
            print(f"{scenario:18} wall {result['wall']:7.1f} s  CPU {result['cpu']:7.1f} s  "
                  f"peak RSS {result['rss_mb']:6.0f} MB  {result['stored'] / result['wall']:8.0f} "
                  f"readings/s  {args.meters / result['wall'] * 3600:9.0f} meters/h"
                  + (f"  (api CPU {result['api_cpu']:.1f} s, RSS {result['api_rss_mb']:.0f} MB)"
                     if "api_cpu" in result else ""), flush=True)
    if "scale-1" in results and "scale-2" in results:
        print(f"speed-up, two engines over one: "
              f"{results['scale-1']['wall'] / results['scale-2']['wall']:.2f}x")
    for scenario, result in results.items():
        per_cpu = args.meters / result["cpu"] * 3600
        print(f"{scenario:18} {per_cpu:9.0f} meters per engine CPU-hour, "
              f"{result['cpu'] / args.meters * 1000:.1f} ms CPU per meter")


if __name__ == "__main__":
    main()
