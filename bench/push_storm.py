"""An outage storm through the push listener: N alarm pushes (default 10,000) from as many meters,
each on its own TCP connection, parsed, attributed and stored as EndDeviceEvents in SQLite.

Prints pushes/s from the first connection to the last event committed, the process CPU per push,
the p99 latency from a push's send to the commit of the batch holding it, and the same pushes
decoded and interpreted alone (no socket, no store) in the same process as the baseline.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from twisted.internet import defer, reactor, task

from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_push import interpret, sender
from cimhes.drivers.push import decode
from cimhes.endpoints.push_listener import PushListenerFactory
from cimhes.engine.events import EventStore
from cimhes.engine.push import PushIntake
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import raise_file_limit
from cimhes.fixtures.meter_model import meter_identity
from cimhes.fixtures.push import alarm_body, data_notification, send

NOW = datetime(2024, 6, 15, 3, 0, tzinfo=timezone.utc)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TimedEventStore(EventStore):
    """Notes when each batch commits and how many events it held."""

    commits: list[tuple[float, int]]

    def save_events(self, events, received_by, recorded_at):
        stored = super().save_events(events, received_by, recorded_at)
        self.commits.append((time.perf_counter(), len(events)))
        return stored


retries = [0]


@defer.inlineCallbacks
def deliver(target, apdu):
    """One push, tried again after 50 ms if the connection fails (as a meter retries)."""
    for _ in range(20):
        try:
            yield send(reactor, "127.0.0.1", target, [apdu])
            return
        except Exception:
            retries[0] += 1
            yield task.deferLater(reactor, 0.05, lambda: None)
    raise RuntimeError("push not delivered after 20 tries")


@defer.inlineCallbacks
def run(args):
    meters = [meter_identity(k) for k in range(1, args.pushes + 1)]
    devices = [DeviceAddress(m.mrid, m.serial, "idis-meter", m.host, m.port, 1, 1, "low",
                             m.password) for m in meters]
    folder = Path(tempfile.mkdtemp(prefix="cimhes-push-"))
    store = Store(f"sqlite:///{folder / 'storm.sqlite'}")
    store.load_inventory(devices)
    runner = StoreRunner(reactor, store)
    events = TimedEventStore(store)
    events.commits = []
    intake = PushIntake(runner, events, devices, now=lambda: NOW)
    port = reactor.listenTCP(0, PushListenerFactory(reactor, intake, max_connections=args.wave * 2),
                             backlog=args.wave * 2, interface="127.0.0.1")
    target = port.getHost().port
    apdus = [data_notification(alarm_body(m.serial, 1 << 2), NOW, invoke_id=i)
             for i, m in enumerate(meters)]  # power up after the outage

    # Baseline: the same pushes decoded and interpreted alone.
    started, cpu0 = time.perf_counter(), cpu()
    for apdu, device in zip(apdus, devices):
        notification = decode(apdu, lambda title: None)
        sender(notification)
        interpret(notification, device.mrid, device.name)
    base_wall, base_cpu = time.perf_counter() - started, cpu() - cpu0

    sent_at = []
    started, cpu0 = time.perf_counter(), cpu()
    for first in range(0, len(apdus), args.wave):
        wave = apdus[first:first + args.wave]
        now = time.perf_counter()
        sent_at.extend([now] * len(wave))
        yield defer.gatherResults([deliver(target, apdu) for apdu in wave])
    while sum(n for _, n in events.commits) < len(apdus):
        yield task.deferLater(reactor, 0.01, lambda: None)
    yield intake.idle()
    wall, used = time.perf_counter() - started, cpu() - cpu0
    stored = store.engine.connect().exec_driver_sql("select count(*) from end_device_event").scalar()

    # Latency: push i is committed with the batch that brings the count past i.
    latencies, done, commits = [], 0, iter(events.commits)
    for index, at in enumerate(sent_at):
        while done <= index:
            committed, size = next(commits)
            done += size
        latencies.append(committed - at)
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"pushes: {len(apdus)} alarm pushes, one TCP connection each, {args.wave} at a time")
    print(f"listener: {len(apdus) / wall:,.0f} pushes/s socket to store ({wall:.2f} s), "
          f"CPU {1e6 * used / len(apdus):.0f} us/push, p99 send-to-commit {1e3 * p99:.0f} ms, "
          f"{len(events.commits)} commits, {stored} events stored, {retries[0]} connection retries, "
          f"counts {dict(intake.counts)}")
    print(f"baseline (decode + interpret only): {len(apdus) / base_wall:,.0f} pushes/s, "
          f"CPU {1e6 * base_cpu / len(apdus):.0f} us/push; listener/baseline CPU per push "
          f"{used / base_cpu:.1f}x")
    if stored != len(apdus):
        print("FAILED: not every push was stored", file=sys.stderr)
    port.stopListening()
    runner.stop()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=10_000)
    parser.add_argument("--wave", type=int, default=500, help="connections at once")
    args = parser.parse_args()
    raise_file_limit(4 * args.wave + 256)

    def go():
        d = run(args)
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()


if __name__ == "__main__":
    main()
