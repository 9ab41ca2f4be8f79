"""Benchmark: reads per second through one data concentrator (PLC latency, a narrow segment)
against the same meters reached directly.

Every run reads the same M meters (indexes 1..M) with one GetMeterReadings through the engine
(`MeterReadingService` on a fresh SQLite store, as a SOAP request reaches it): association
(LLS), clock, the +A register (value and scaler_unit), the load profile's capture objects and
24 hours of its buffer by range (96 rows, block transfer), release. The meters are simulated in
this process (loopback TCP); each run checks every meter answered in full and aborts otherwise.

Runs, in order:
- direct: the meters on their own addresses, no delay, the engine's default bounds (baseline);
- direct, delayed: each answer `--latency` seconds late, at most `--sessions` at once (the
  concentrator's bound), i.e. the same wire time and concurrency without the gateway;
- concentrator, no latency: every meter behind one concentrator, PLC latency 0 (the gateway's
  own cost: framing, the extra hop, the route's bound);
- concentrator: PLC latency `--latency` on a segment of `--sessions` (the route's bound too).

"TCP connections" is what the meters (direct) or the concentrator accepted during the run: one
per session direct, one for the whole run through the concentrator (its sessions share it,
drivers/concentrator_link.py).

    python bench/concentrator.py [--meters 24] [--latency 0.2] [--sessions 4]
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from cimhes.cim.message import Header, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.engine.inventory import Inventory
from cimhes.engine.limits import EngineSettings
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.concentrator import start_concentrators
from cimhes.fixtures.fleet import start_fleet

PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
NOW = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
CONCENTRATOR_HOST = "127.0.21.200"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def read_all(document: dict, sessions: int, workdir: Path, name: str) -> dict:
    """One GetMeterReadings for every meter of the inventory `document`; its figures."""
    store = Store(f"sqlite:///{workdir / (name + '.sqlite')}")
    runner = StoreRunner(reactor, store)
    try:
        inventory = Inventory.from_json(document)
        store.load_inventory(inventory)
        service = MeterReadingService(reactor, runner, concurrency=sessions, timeout=30.0,
                                      settings=EngineSettings(min_device_gap=0))
        mrids = [d.address.mrid for d in inventory.devices]
        request = GetMeterReadings(
            header=Header(verb="get", noun="MeterReadings"),
            end_devices=[DeviceRef(mrid=m) for m in mrids], usage_points=[],
            reading_types=[PLUS_A, PLUS_A_PROFILE], start=NOW - timedelta(days=1), end=NOW)
        started, cpu_started = time.perf_counter(), cpu()
        outcome = await service.read(request)
        seconds, cpu_seconds = time.perf_counter() - started, cpu() - cpu_started
        service.dispatcher.stop()
        complete = (outcome.result is ReplyResult.OK and len(outcome.meter_readings) == len(mrids)
                    and all(len(r.interval_blocks[0].readings) == 96
                            for r in outcome.meter_readings))
        if not complete:
            raise SystemExit(f"{name}: not every meter answered in full: {outcome.errors[:3]}")
        return {"run": name, "meters": len(mrids), "seconds": seconds,
                "reads_per_s": len(mrids) / seconds, "cpu_ms_per_read": 1000 * cpu_seconds / len(mrids)}
    finally:
        runner.stop()
        store.close()


async def main(args) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, delay, sessions in (("direct", 0.0, 200),
                                      ("direct, delayed", args.latency, args.sessions)):
            fleet = start_fleet(reactor, args.meters, port=0, response_delay=delay)
            try:
                results.append(await read_all(fleet.inventory(), sessions, workdir, name))
                results[-1]["connections"] = fleet.accepted()
            finally:
                await fleet.stop_all()
        for name, latency in (("concentrator, no latency", 0.0), ("concentrator", args.latency)):
            concentrators = start_concentrators(
                reactor, 1, args.meters, hosts=[CONCENTRATOR_HOST], port=0, latency=latency,
                segment_sessions=args.sessions)
            try:
                results.append(await read_all(concentrators.inventory(), 200, workdir, name))
                results[-1]["segment_peak"] = concentrators[0].segment.peak
                results[-1]["connections"] = concentrators[0].accepted
            finally:
                await concentrators.stop_all()
    return results


def run(args) -> None:
    print(f"# bench/concentrator.py --meters {args.meters} --latency {args.latency} "
          f"--sessions {args.sessions}  (Python {platform.python_version()}, "
          f"{platform.machine()}, one process)")
    outcome: list = []

    def go():
        d = ensureDeferred(main(args))
        d.addCallbacks(outcome.append, lambda f: (outcome.append(f), None))
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.run()
    if not outcome or not isinstance(outcome[0], list):
        print(outcome[0].getTraceback() if outcome else "no result", file=sys.stderr)
        raise SystemExit(1)
    results = outcome[0]
    baseline = results[0]["reads_per_s"]
    delayed = results[1]["reads_per_s"]
    print(f"{'run':28} {'meters':>6} {'seconds':>8} {'reads/s':>8} {'vs direct':>9} "
          f"{'vs delayed':>10} {'CPU ms/read':>11} {'segment peak':>12} {'TCP connections':>15}")
    for r in results:
        print(f"{r['run']:28} {r['meters']:>6} {r['seconds']:>8.2f} {r['reads_per_s']:>8.2f} "
              f"{r['reads_per_s'] / baseline:>9.3f} {r['reads_per_s'] / delayed:>10.3f} "
              f"{r['cpu_ms_per_read']:>11.2f} {r.get('segment_peak', '-'):>12} "
              f"{r['connections']:>15}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=24)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--sessions", type=int, default=4)
    run(parser.parse_args())
