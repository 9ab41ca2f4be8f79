"""Benchmark: 200 concurrent small on-demand GetMeterReadings calls against a fleet whose meters
answer every request 500 ms late, and WSDL fetches during the run.

Three processes on one machine: the fleet (`cimhes simulate --delay 0.5`), the head-end
(`cimhes serve`, SQLite, a user made with `cimhes user add`), and this script as the callers
(Twisted's HTTP client, one persistent connection per caller). Each call is a real SOAP POST:
one meter (each caller its own), one register ReadingType, `Request.Option DataSource=meter`, so
every call is one DLMS session (association, clock, value, scaler_unit, release) with 500 ms per
answer. The head-end runs with `--max-pending-per-caller` raised to the caller count (its
default of 8 per user would refuse the run with 3.2: that limit is the point of it).

Figures: calls/s, latency p50/p99/max over every call, and the WSDL fetches p50/p99/max and how
many of them answered in under 100 ms (the issue's target). The fetches come from a client thread
of their own (blocking sockets, a new connection each, one every ``--wsdl-every`` = 50 ms), from
just before the first burst of POSTs to the last answer, so the first burst is in the figure.
``--profile FILE`` records the head-end with py-spy (per thread) during the first seconds of load. Baseline in the same run: the same call made alone,
sequentially (``--alone`` times) before the load; the ideal concurrent rate is concurrency /
that latency, and the ratio achieved / ideal is printed.

    python bench/concurrent_calls.py [--callers 200] [--rounds 3] [--delay 0.5]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

REGISTER = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
USER, PASSWORD = "bench", "bench-password-1"


def envelope(mrid: str, n: int) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
    xmlns:m="http://iec.ch/TC57/2011/GetMeterReadingsMessage"
    xmlns:h="http://iec.ch/TC57/2011/schema/message"
    xmlns:g="http://iec.ch/TC57/2011/GetMeterReadings#"><soapenv:Body><m:GetMeterReadings>
  <m:Header><h:Verb>get</h:Verb><h:Noun>MeterReadings</h:Noun><h:MessageID>bench-{n}</h:MessageID></m:Header>
  <m:Request><m:Option><h:name>DataSource</h:name><h:value>meter</h:value></m:Option>
    <g:GetMeterReadings><g:EndDevice><g:mRID>{mrid}</g:mRID></g:EndDevice>
    <g:ReadingType><g:mRID>{REGISTER}</g:mRID></g:ReadingType></g:GetMeterReadings></m:Request>
</m:GetMeterReadings></soapenv:Body></soapenv:Envelope>""".encode()


class WsdlFetcher(threading.Thread):
    """GET ?wsdl every `every` seconds on a fresh connection (blocking http.client), recording
    (start, seconds) of each fetch."""

    def __init__(self, url: str, every: float):
        super().__init__(name="wsdl-fetcher", daemon=True)
        parts = urlsplit(url)
        self._host, self._port = parts.hostname, parts.port
        self._target = f"{parts.path}?{parts.query}"
        self._every = every
        self._stopping = threading.Event()
        self.fetches: list[tuple[float, float]] = []
        self.error: str | None = None
        self.load_started = self.load_ended = None

    def run(self) -> None:
        while not self._stopping.is_set():
            started = time.perf_counter()
            connection = http.client.HTTPConnection(self._host, self._port, timeout=30)
            try:
                connection.request("GET", self._target)
                response = connection.getresponse()
                body = response.read()
            except OSError as exc:
                self.error = f"WSDL fetch failed: {exc}"
                return
            finally:
                connection.close()
            elapsed = time.perf_counter() - started
            if response.status != 200 or b"definitions" not in body:
                self.error = f"WSDL fetch failed: HTTP {response.status}"
                return
            self.fetches.append((started, elapsed))
            self._stopping.wait(max(0.0, self._every - elapsed))

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def during_load(self) -> list[float]:
        """Seconds of every fetch that overlapped the load (first burst included)."""
        return [elapsed for started, elapsed in self.fetches
                if started + elapsed >= self.load_started and started <= self.load_ended]


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Process:
    """A cimhes command in its own process, up once it printed its ready line."""

    def __init__(self, args, log: Path, timeout: float = 120.0):
        self._log = log.open("w")
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise SystemExit(f"{args[1]} ended before it was ready; see {log}")
            if line.startswith("{"):
                self.ready = json.loads(line)
                return
        raise SystemExit(f"{args[1]} not ready within {timeout} s; see {log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self._log.close()


@defer.inlineCallbacks
def post(agent, url: str, body: bytes, auth: bytes):
    started = time.perf_counter()
    response = yield agent.request(b"POST", url.encode(), Headers({
        b"content-type": [b"text/xml; charset=utf-8"], b"authorization": [auth],
        b"soapaction": [b'"http://iec.ch/TC57/2011/GetMeterReadings/GetMeterReadings"']}),
        _Body(body))
    answer = yield readBody(response)
    elapsed = time.perf_counter() - started
    ok = response.code == 200 and re.search(rb"Result>OK</", answer) is not None
    return elapsed, ok, answer


@implementer(IBodyProducer)
class _Body:
    """An IBodyProducer of fixed bytes."""

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def stopProducing(self):
        pass


@defer.inlineCallbacks
def run(args, base_url: str, mrids: list[str], head_end_pid: int, profiler: list):
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.callers + 10
    agent = Agent(reactor, pool=pool)
    auth = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
    url = f"{base_url}/cim/GetMeterReadings"

    # Baseline: the call alone (each time another meter: the per-device gap never counts).
    alone = []
    for n in range(args.alone):
        elapsed, ok, answer = yield post(agent, url, envelope(mrids[n], n), auth)
        if not ok:
            raise SystemExit(f"a call alone failed: {answer[:600]!r}")
        alone.append(elapsed)
    yield task.deferLater(reactor, args.gap, lambda: None)  # meters' minimum gap between sessions

    latencies, failures = [], []

    @defer.inlineCallbacks
    def caller(k: int):
        for r in range(args.rounds):
            n = 1000 + r * args.callers + k
            elapsed, ok, answer = yield post(agent, url, envelope(mrids[k], n), auth)
            (latencies if ok else failures).append(elapsed if ok else answer[:300])
            yield task.deferLater(reactor, args.gap, lambda: None)

    # The WSDL fetcher: its own thread and blocking sockets, so what it measures is the
    # head-end's answer, not this process's reactor (busy with the 200 callers). It starts
    # before the first burst of POSTs is sent and runs until the last call has answered.
    fetcher = WsdlFetcher(f"{url}?wsdl", args.wsdl_every)
    fetcher.start()
    yield task.deferLater(reactor, 3 * args.wsdl_every, lambda: None)
    if args.profile:
        py_spy = str(Path(sys.executable).parent / "py-spy")
        profiler.append(subprocess.Popen(
            [py_spy, "record", "--pid", str(head_end_pid), "--duration",
             str(max(1, round(args.profile_seconds))), "--rate", "250", "--threads",
             "--nonblocking", "--idle", "--format",
             "chrometrace" if args.profile.endswith(".json") else "raw", "--output", args.profile],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    started = time.perf_counter()
    fetcher.load_started = started
    yield defer.gatherResults([caller(k) for k in range(args.callers)])
    wall = time.perf_counter() - started
    fetcher.load_ended = time.perf_counter()
    yield deferToThread(fetcher.stop)
    yield pool.closeCachedConnections()
    return alone, latencies, failures, wall, fetcher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="calls per caller, one after another")
    parser.add_argument("--delay", type=float, default=0.5, help="meter answer delay, s")
    parser.add_argument("--alone", type=int, default=5, help="calls made alone first (baseline)")
    parser.add_argument("--gap", type=float, default=0.6,
                        help="a caller's pause between calls (the head-end's --min-device-gap is 0.5 s)")
    parser.add_argument("--wsdl-every", type=float, default=0.05,
                        help="seconds between two WSDL fetches of the fetcher thread")
    parser.add_argument("--first-burst", type=float, default=2.0,
                        help="seconds after the start of the load reported apart")
    parser.add_argument("--profile", metavar="FILE",
                        help="record the head-end with py-spy (per thread, idle included) during "
                             "the first --profile-seconds of the load into FILE: collapsed stacks, "
                             "or a timeline (chrometrace) when FILE ends in .json")
    parser.add_argument("--profile-seconds", type=float, default=4.0,
                        help="seconds recorded by --profile from the start of the load")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--meter-port", type=int, default=14159)
    args = parser.parse_args()
    cimhes = str(Path(sys.executable).parent / "cimhes")
    work = Path(tempfile.mkdtemp(prefix="cimhes-bench-calls-"))
    inventory, db = work / "inventory.json", work / "bench.sqlite"
    print(f"machine: nproc {os.cpu_count()}, Python {platform.python_version()}, Twisted "
          f"{version('twisted')}, spyne {version('spyne')}, lxml {version('lxml')}; load "
          f"{os.getloadavg()[0]:.1f}")
    print("command: python bench/concurrent_calls.py " + " ".join(sys.argv[1:]))
    fleet = Process([cimhes, "simulate", "--meters", str(args.callers), "--port",
                     str(args.meter_port), "--inventory", str(inventory), "--delay",
                     str(args.delay)], work / "fleet.log")
    head_end = None
    try:
        subprocess.run([cimhes, "user", "add", USER, "--role", "readings-reader",
                        "--password-stdin", "--db", str(db)], input=PASSWORD + "\n", text=True,
                       check=True, capture_output=True)
        head_end = Process([cimhes, "serve", "--inventory", str(inventory), "--db", str(db),
                            "--port", str(args.port), "--max-pending-per-caller",
                            str(args.callers + 10), "--sessions", str(args.callers)],
                           work / "head-end.log")
        mrids = [m["mrid"] for m in json.loads(inventory.read_text())["meters"]]
        result, profilers = {}, []

        def done(value):
            result["value"] = value
            reactor.stop()

        def failed(failure):
            result["error"] = failure
            reactor.stop()

        reactor.callWhenRunning(lambda: run(args, head_end.ready["base_url"], mrids,
                                            head_end.process.pid, profilers)
                                .addCallbacks(done, failed))
        reactor.run()
        if "error" in result:
            result["error"].raiseException()
        alone, latencies, failures, wall, fetcher = result["value"]
    finally:
        if head_end is not None:
            head_end.stop()
        fleet.stop()
    calls = len(latencies) + len(failures)
    single = statistics.median(alone)
    ideal = args.callers / (single + args.gap)
    rate = calls / wall
    print(f"fleet: {args.callers} meters, every answer {args.delay * 1000:.0f} ms late; "
          f"{args.callers} callers x {args.rounds} calls, {args.gap} s pause between a caller's calls")
    print(f"alone (baseline, {len(alone)} calls): median {single * 1000:.0f} ms")
    print(f"concurrent: {calls} calls in {wall:.1f} s = {rate:.1f} calls/s; failed {len(failures)}")
    if latencies:
        print(f"latency: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 "
              f"{percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    print(f"ideal rate (callers / (alone latency + pause)): {ideal:.1f} calls/s; "
          f"achieved / ideal: {rate / ideal:.2f}")
    if fetcher.error:
        raise SystemExit(fetcher.error)
    wsdl = fetcher.during_load()
    first = [elapsed for started, elapsed in fetcher.fetches
             if fetcher.load_started - elapsed <= started <= fetcher.load_started + args.first_burst]
    print(f"WSDL fetches during the run (a client thread, one every {args.wsdl_every * 1000:.0f} ms, "
          f"first burst included): {len(wsdl)}, p50 {percentile(wsdl, 0.5) * 1000:.1f} ms, "
          f"p99 {percentile(wsdl, 0.99) * 1000:.1f} ms, max {max(wsdl) * 1000:.1f} ms; "
          f"under 100 ms: {sum(t < 0.1 for t in wsdl)} of {len(wsdl)}")
    if first:
        print(f"  of which in the first {args.first_burst:g} s (the first burst of {args.callers} "
              f"POSTs): {len(first)}, max {max(first) * 1000:.1f} ms, under 100 ms: "
              f"{sum(t < 0.1 for t in first)} of {len(first)}")
    slow = [(started - fetcher.load_started, elapsed) for started, elapsed in fetcher.fetches
            if elapsed >= 0.1]
    if slow:
        print("  fetches of 100 ms or more (start after the load began, s: ms): " + ", ".join(
            f"{offset:.2f}: {elapsed * 1000:.0f}" for offset, elapsed in slow))
    for profiler in profilers:
        profiler.wait()
        print(f"py-spy profile of the head-end's first {args.profile_seconds:g} s of load: "
              f"{args.profile}")
    if failures:
        print(f"first failure: {failures[0]!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
