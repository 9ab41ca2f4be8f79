"""Benchmark: many sessions at once, and a fleet full of faulty meters: time, memory, file
descriptors, failures and the reactor's lateness.

The fleet runs in its own process (`cimhes simulate`, meters on their own loopback addresses),
so the figures below belong to the reading process (the engine with a fresh SQLite store, as a
GetMeterReadings reaches it). While the engine reads, a LoopingCall probe ticks every 10 ms
on the reactor and records how late each tick comes (the reactor's lag: what every other
session and request waits), and samples the process's open file descriptors and RSS.

Two kinds of run, each against a baseline in the same run:
- `--sessions N --delay S`: N meters read with N sessions at once, every answer S seconds
  late; the baseline is the ideal rate, N sessions / (exchanges per read x S).
- `--faults SHARE`: a fleet in which SHARE of the meters misbehave in each of the kinds of
  `--kinds` (by default the six of issue 5: silent, garbage, drop-mid-block, replay, bad-tag,
  refuse-association), read beside the same fleet with no faulty meter; the baseline is the
  clean run's lag.

    python bench/sessions.py --sessions 2000 --delay 1
    python bench/sessions.py --sessions 5000 --delay 1
    python bench/sessions.py --meters 1000 --faults 0.1
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from read_fleet import (  # noqa: E402  (the sibling benchmark's fleet and window)
    PROFILE_TYPES,
    REGISTER_TYPES,
    Aborted,
    FleetProcess,
    machine,
    process_cpu,
    window_now,
)

PROJECT = str(Path(__file__).resolve().parent.parent)
EVENTS_PER_TURN = 16  # cimhes.engine.ready_sockets.EVENTS_PER_TURN (imported late, as the rest)
ISSUE_FAULTS = ["silent", "garbage", "drop-mid-block", "replay", "bad-tag", "refuse-association"]
EXCHANGES = 17  # AARQ, clock, 4 x (value, scaler_unit), capture objects, buffer + 2 blocks, RLRQ
# (a first read; with the configuration remembered, 12)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Probe:
    """Ticks every `interval` s on the reactor; records lateness, fds and RSS."""

    def __init__(self, reactor, interval: float = 0.01):
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self.interval = interval
        self.late: list[float] = []
        self.fds = 0
        self.rss = 0
        self._last = None
        self.beat = None  # perf_counter of the last tick (StallSampler reads it)
        # The reactor thread's own CPU between two ticks: the lag its own work makes, whatever
        # else the machine runs (wall lag adds waiting for a core and for the GIL).
        self.turn_cpu: list[float] = []
        self._last_cpu = 0.0
        self._loop = LoopingCall(self._tick)
        # The garbage collector's pauses, by generation: a full collection over a large
        # request's results stops every thread, the reactor's too.
        self.gc_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_started = self._gc_started_cpu = 0.0
        self.gc_cpu_longest = 0.0
        self.gc_cpu = 0.0  # CPU the collections took (their wall time includes waiting for a core)

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._gc_started_cpu = time.thread_time()
        else:
            self.gc_pauses[info["generation"]].append(time.perf_counter() - self._gc_started)
            spent = time.thread_time() - self._gc_started_cpu
            self.gc_cpu += spent
            self.gc_cpu_longest = max(self.gc_cpu_longest, spent)

    def start(self):
        import gc
        gc.callbacks.append(self._on_gc)
        self._last = self.beat = time.perf_counter()
        self._last_cpu = time.thread_time()
        self._loop.start(self.interval, now=False)

    def stop(self):
        import gc
        gc.callbacks.remove(self._on_gc)
        self._loop.stop()

    def _tick(self):
        now = time.perf_counter()
        self.late.append(max(0.0, now - self._last - self.interval))
        self._last = self.beat = now
        cpu = time.thread_time()
        self.turn_cpu.append(cpu - self._last_cpu)
        self._last_cpu = cpu
        if len(self.late) % 10 == 0:
            self.fds = max(self.fds, open_fds())
            self.rss = max(self.rss, rss_kb())

    def summary(self) -> str:
        late = sorted(self.late) or [0.0]
        p99 = late[min(len(late) - 1, int(0.99 * len(late)))]
        pauses = "; ".join(
            f"gen{generation} {len(times)} x, longest {1000 * max(times):.0f} ms"
            for generation, times in self.gc_pauses.items() if times)
        busy = sorted(self.turn_cpu) or [0.0]
        over = sum(1 for cpu in busy if cpu > 0.05)
        return (f"reactor lag (10 ms probe, {len(late)} ticks): max {1000 * late[-1]:.0f} ms, "
                f"p99 {1000 * p99:.1f} ms, median {1000 * late[len(late) // 2]:.1f} ms; "
                f"collector pauses: {pauses or 'none'} (wall), {1000 * self.gc_cpu:.0f} ms CPU "
                f"in all, longest {1000 * self.gc_cpu_longest:.0f} ms CPU\n  reactor thread CPU between two ticks (its own share of the lag): "
                f"max {1000 * busy[-1]:.0f} ms, p99 {1000 * busy[int(0.99 * (len(busy) - 1))]:.1f}"
                f" ms; {over} stretches over 50 ms")


class StallSampler:
    """Where the reactor thread is while it is late: a thread of its own looks every 5 ms and,
    when the probe's last tick is more than `threshold` s old, takes the reactor thread's stack
    (each sample stands for ~5 ms of stall). Summarised by the innermost project frames."""

    def __init__(self, probe: "Probe", threshold: float = 0.05, every: float = 0.005):
        import threading
        self._probe = probe
        self._threshold = threshold
        self._every = every
        self._main = threading.get_ident()
        self._stop = threading.Event()
        self.samples: collections.Counter = collections.Counter()
        self.leaves: collections.Counter = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="stall-sampler", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self._every):
            beat = self._probe.beat
            if beat is None or time.perf_counter() - beat < self._threshold:
                continue
            frame = sys._current_frames().get(self._main)
            ours, leaf = [], None
            while frame is not None:
                code = frame.f_code
                where = f"{Path(code.co_filename).parent.name}/{Path(code.co_filename).name}" \
                        f":{code.co_name}"
                leaf = leaf or where
                if (code.co_filename.startswith(PROJECT) and "/bench/" not in code.co_filename
                        and "/.venv/" not in code.co_filename):
                    ours.append(where)
                frame = frame.f_back
            self.samples[" < ".join(ours[:3]) or "(outside the project)"] += 1
            self.leaves[leaf] += 1

    def summary(self, top: int = 12) -> str:
        total = sum(self.samples.values())
        if not total:
            return "  stalls over 50 ms: none sampled"
        lines = [f"  where the reactor thread was while over {1000 * self._threshold:.0f} ms "
                 f"late ({total} samples of ~{1000 * self._every:.0f} ms), innermost project "
                 "frames first:"]
        lines += [f"    {count:6d}  {100 * count / total:5.1f} %  {key}"
                  for key, count in self.samples.most_common(top)]
        lines.append("  innermost frames:")
        lines += [f"    {count:6d}  {100 * count / total:5.1f} %  {key}"
                  for key, count in self.leaves.most_common(top // 2)]
        return "\n".join(lines)


class TurnTimer:
    """The reactor's work, call by call: every timed call, thread call (a store result) and
    socket event is timed by the reactor thread's CPU clock, and the long ones are counted by
    what they were (the callable's name, or the protocol that read or wrote)."""

    def __init__(self, reactor, long: float = 0.02):
        self.long = long
        self.calls: collections.Counter = collections.Counter()
        self.spent: collections.Counter = collections.Counter()
        self.longest: dict[str, float] = {}
        self._reactor = reactor
        self._patched = []

    def _timed(self, name, function, *args, **kwargs):
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            if spent > self.long:
                self.calls[name] += 1
                self.spent[name] += spent
                self.longest[name] = max(self.longest.get(name, 0.0), spent)

    def start(self):
        reactor = self._reactor
        call_later, call_from_thread = reactor.callLater, reactor.callFromThread
        do_read_or_write = reactor._doReadOrWrite

        def name_of(function):
            owner = getattr(function, "__self__", None)
            qualname = getattr(function, "__qualname__", repr(function))
            return f"{type(owner).__name__}.{function.__name__}" if owner is not None and \
                "." not in qualname else qualname

        def later(delay, function, *args, **kwargs):
            return call_later(delay, self._timed, "timer " + name_of(function), function,
                              *args, **kwargs)

        def from_thread(function, *args, **kwargs):
            name = name_of(function)
            deferred = getattr(function, "__self__", None)
            callbacks = getattr(deferred, "callbacks", None)
            if callbacks:  # a store result: named by what waits for it
                name += " -> " + name_of(callbacks[0][0][0])
            return call_from_thread(self._timed, "thread call " + name, function,
                                    *args, **kwargs)

        def read_or_write(selectable, fd, event):
            protocol = getattr(selectable, "protocol", None)
            inner = getattr(protocol, "_wrappedProtocol", protocol)
            return self._timed(f"socket event {type(inner).__name__}", do_read_or_write,
                               selectable, fd, event)
        reactor.callLater, reactor.callFromThread = later, from_thread
        reactor._doReadOrWrite = read_or_write
        self._patched = [("callLater", call_later), ("callFromThread", call_from_thread),
                         ("_doReadOrWrite", do_read_or_write)]

    def stop(self):
        for name, original in self._patched:
            setattr(self._reactor, name, original)

    def summary(self, top: int = 12) -> str:
        if not self.calls:
            return f"  reactor calls over {1000 * self.long:.0f} ms CPU: none"
        lines = [f"  reactor calls over {1000 * self.long:.0f} ms CPU, by what they were "
                 "(count, CPU in all, longest):"]
        for name, spent in self.spent.most_common(top):
            lines.append(f"    {self.calls[name]:5d} x {1000 * spent:7.0f} ms, longest "
                         f"{1000 * self.longest[name]:5.0f} ms  {name}")
        return "\n".join(lines)


async def read_all(reactor, inventory, concurrency: int, limits, database: Path,
                   connections_per_second: float, stalls: bool = False):
    from cimhes.cim.message import Header
    from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
    from cimhes.drivers import DeviceAddress
    from cimhes.engine.reading import MeterReadingService
    from cimhes.engine.store import Store, StoreRunner

    store = Store(f"sqlite:///{database}")
    store.load_inventory([DeviceAddress.from_inventory(entry) for entry in inventory])
    runner = StoreRunner(reactor, store)
    start, end = window_now()
    request = GetMeterReadings(
        header=Header(verb="get", noun="MeterReadings"),
        end_devices=[DeviceRef(mrid=entry["mrid"]) for entry in inventory],
        reading_types=[*REGISTER_TYPES, *PROFILE_TYPES], start=start, end=end)
    service = MeterReadingService(reactor, runner, concurrency=concurrency, limits=limits,
                                  connections_per_second=connections_per_second)
    probe = Probe(reactor)
    fds_before, rss_before = open_fds(), rss_kb()
    probe.start()
    sampler = StallSampler(probe) if stalls else None
    turns = TurnTimer(reactor) if stalls else None
    if sampler is not None:
        sampler.start()
        turns.start()
    cpu, wall = process_cpu(), time.perf_counter()
    try:
        outcome = await service.read(request)
    finally:
        probe.stop()
        if sampler is not None:
            sampler.stop()
            turns.stop()
            print(sampler.summary(), flush=True)
            print(turns.summary(), flush=True)
        wall, cpu = time.perf_counter() - wall, process_cpu() - cpu
        runner.stop()
        store.close()
    # Let closing sockets finish before counting what is left open.
    from twisted.internet.task import deferLater
    await deferLater(reactor, 0.5, lambda: None)
    return outcome, probe, wall, cpu, fds_before, rss_before, open_fds()


def failures(outcome) -> str:
    codes = collections.Counter(str(getattr(e.code, "value", e.code)) for e in outcome.errors)
    return ", ".join(f"{code}: {count}" for code, count in sorted(codes.items())) or "none"


# What a timeout was waiting for, by the words of its reason.
TIMEOUT_KINDS = (("session deadline", "session deadline passed"),
                 ("no TCP connection", "connect timeout"),
                 ("no answer to AARQ", "no answer to the AARQ"),
                 ("no answer to", "no answer to a later request"))


def timeouts(outcome) -> str:
    kinds = collections.Counter()
    for error in outcome.errors:
        kind = next((kind for words, kind in TIMEOUT_KINDS if words in error.reason), None)
        if kind is not None:
            kinds[kind] += 1
    return ", ".join(f"{kind}: {count}" for kind, count in kinds.most_common())


def report(name, meters, outcome, probe, wall, cpu, fds_before, rss_before, fds_after):
    print(f"{name}: {meters} meters in {wall:.1f} s ({meters / wall:.0f} reads/s), "
          f"process CPU {cpu:.1f} s ({1000 * cpu / meters:.2f} ms/read); "
          f"{len(outcome.meter_readings)} read, errors by code: {failures(outcome)}")
    if timeouts(outcome):
        print(f"  timeouts by what they waited for: {timeouts(outcome)}")
    reasons = collections.Counter(
        (str(getattr(e.code, "value", e.code)), e.reason.split(": ", 1)[-1][:110])
        for e in outcome.errors)
    for (code, reason), count in reasons.most_common(4):
        print(f"  {count} x {code}: ...{reason}")
    print(f"  {probe.summary()}")
    print(f"  RSS {rss_before // 1024} MB before, peak {probe.rss // 1024} MB "
          f"({(probe.rss - rss_before) / meters:.0f} kB per session); file descriptors "
          f"{fds_before} before, peak {probe.fds}, {fds_after} after", flush=True)


async def concurrency_run(reactor, args, workdir: Path):
    from cimhes.drivers.limits import SessionLimits

    fleet = FleetProcess(args.sessions, args.port, args.delay, workdir)
    try:
        fleet.wait_ready(300)
        inventory = json.loads(fleet.inventory_path.read_text())["meters"]
        print(f"fleet: {shlex.join(fleet.command)}", flush=True)
        limits = SessionLimits(response_timeout=max(20.0, 10 * args.delay),
                               session_deadline=max(60.0, 4 * EXCHANGES * args.delay))
        fleet_cpu = fleet.cpu()
        result = await read_all(reactor, inventory, args.sessions, limits,
                                workdir / "sessions.sqlite", args.connections_per_second,
                                args.stalls)
        fleet_cpu = fleet.cpu() - fleet_cpu
    finally:
        fleet.stop()
    outcome, probe, wall = result[0], result[1], result[2]
    report(f"{args.sessions} sessions at once, answers {args.delay:g} s late", args.sessions,
           *result)
    ideal = args.sessions / (EXCHANGES * args.delay)
    print(f"  ideal rate {ideal:.0f} reads/s ({args.sessions} sessions / ({EXCHANGES} exchanges "
          f"x {args.delay:g} s)); measured {args.sessions / wall:.0f} = "
          f"{100 * args.sessions / wall / ideal:.0f}% of it; fleet process CPU {fleet_cpu:.1f} s")


async def fault_runs(reactor, args, workdir: Path):
    from cimhes.drivers.limits import SessionLimits

    per_kind = max(1, int(args.faults * args.meters))
    if per_kind * len(args.kinds) > args.meters:
        raise Aborted(f"{len(args.kinds)} kinds x {per_kind} meters exceed the fleet")
    specs, first = [], 1
    for kind in args.kinds:
        specs += ["--fault", f"{kind}:{first}-{first + per_kind - 1}"]
        first += per_kind
    limits = SessionLimits(connect_timeout=5.0, response_timeout=args.timeout,
                           session_deadline=4 * args.timeout)
    for name, extra in (("clean fleet", []), (f"{per_kind} faulty meters of each of "
                                               f"{len(args.kinds)} kinds", specs)):
        fleet = FleetProcess(args.meters, args.port, 0.0, workdir, extra)
        try:
            fleet.wait_ready(120)
            inventory = json.loads(fleet.inventory_path.read_text())["meters"]
            print(f"fleet: {shlex.join(fleet.command)}", flush=True)
            result = await read_all(reactor, inventory, args.concurrency, limits,
                                    workdir / f"{len(extra)}.sqlite",
                                    args.connections_per_second)
        finally:
            fleet.stop()
        report(name, args.meters, *result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, help="meters read all at once (concurrency run)")
    parser.add_argument("--delay", type=float, default=1.0, help="answer delay, s (1)")
    parser.add_argument("--meters", type=int, default=1000, help="fleet of the fault runs (1000)")
    parser.add_argument("--faults", type=float, help="share of the fleet faulty in each kind")
    parser.add_argument("--kinds", nargs="+", default=ISSUE_FAULTS, help="fault kinds")
    parser.add_argument("--concurrency", type=int, default=200, help="fault runs' bound (200)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="fault runs' response timeout, s (5)")
    parser.add_argument("--connections-per-second", type=float, default=1000.0,
                        help="connection pacing, as the product default (1000)")
    parser.add_argument("--port", type=int, default=14059)
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="sys.setswitchinterval for the run (0: the process's own)")
    parser.add_argument("--events-per-turn", type=int, default=EVENTS_PER_TURN,
                        help=f"ready sockets handled per reactor turn ({EVENTS_PER_TURN}, as "
                        "cimhes serve; 0: all, as Twisted does)")
    parser.add_argument("--gc-thresholds", help="the collector's thresholds for the run, "
                        "e.g. 10000,10,200 (default: the product's, engine/garbage_collection.py)")
    parser.add_argument("--stalls", action="store_true",
                        help="sample where the reactor thread is while it is over 50 ms late")
    args = parser.parse_args(argv)
    if (args.sessions is None) == (args.faults is None):
        parser.error("give either --sessions N or --faults SHARE")

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from cimhes.drivers.limits import raise_descriptor_limit
    from cimhes.engine.garbage_collection import tune_for_throughput

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.events_per_turn:  # as cimhes serve and demo do
        from cimhes.engine.ready_sockets import bound_events_per_turn
        bounded = bound_events_per_turn(reactor, args.events_per_turn)
        print(f"ready sockets per reactor turn: at most {args.events_per_turn}"
              if bounded else "ready sockets per reactor turn: all (not the epoll reactor)")
    else:
        print("ready sockets per reactor turn: all (Twisted as shipped)")
    limit = raise_descriptor_limit(args.sessions or args.concurrency)
    tune_for_throughput()
    if args.gc_thresholds:
        import gc
        gc.set_threshold(*(int(part) for part in args.gc_thresholds.split(",")))
    print(machine())
    import gc
    print(f"collector thresholds: {gc.get_threshold()}")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(limit.explain())
    if not limit.sufficient:
        return 2
    exit_code = [1]

    async def run():
        with tempfile.TemporaryDirectory(prefix="cimhes-sessions-") as workdir:
            if args.sessions:
                await concurrency_run(reactor, args, Path(workdir))
            else:
                await fault_runs(reactor, args, Path(workdir))
        exit_code[0] = 0

    def start():
        done = Deferred.fromCoroutine(run())
        done.addErrback(lambda failure: print(
            f"sessions: aborted: {failure.value}" if failure.check(Aborted)
            else failure.getTraceback(), file=sys.stderr))
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return exit_code[0]


if __name__ == "__main__":
    sys.exit(main())
