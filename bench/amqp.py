"""Alarms from a DataNotification on the socket to a message on the DMS's queue, through one
cimhes process: push listener, store (SQLite) with the outbox row in the events' transaction,
and the AMQP relay with publisher confirms to RabbitMQ.

An outage storm of N alarm pushes (default 10,000, from 1,000 simulated meters, one TCP
connection each, 250 at a time) is sent by a meters process; a DMS process consumes the queue
bound to ``restore.#``. Three processes, so the figures' CPU is cimhes's alone. Printed:

- alarms/s from the first push sent to the last alarm at the DMS, cimhes CPU per alarm;
- latency per alarm, its push's send to its arrival at the DMS consumer (which follows the
  broker's confirm to cimhes, so it bounds the confirm latency from above): p50, p99, max; and
  the part of it spent before the commit of the event and its outbox row;
- the baseline, in the same run: the same storm with AMQP off (push to committed event only),
  and the ratios.

Every run checks that the DMS received every alarm (distinct MessageIDs) and prints duplicates.
The broker: ``--amqp-url`` (default the test broker, amqp://guest:guest@127.0.0.1:5672/); the
bench makes its own vhost there (rabbitmqctl) and deletes it. See bench/README.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

START = datetime(2026, 7, 1, 4, 0, tzinfo=timezone.utc)
QUEUE = "dms.bench"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


# ------------------------------------------------------------------ the meters' process


def meters_process(host, port, pushes, meters, wave, rate, go, results):
    from twisted.internet import reactor

    from cimhes.fixtures.alarm_storm import AlarmStorm, StormMeters
    from cimhes.fixtures.fleet import raise_file_limit

    raise_file_limit(4 * wave + 256)
    storm = AlarmStorm(reactor, StormMeters(meters), pushes, START, host=host, port=port,
                       wave=wave, clock=time.time)
    go.wait()

    def run():
        d = storm.run_paced(rate) if rate else storm.run()
        d.addErrback(lambda f: results.put(("error", f.getTraceback())))
        d.addCallback(lambda _: results.put(("sent", {f"{m}|{at.isoformat()}": t for (m, at), t
                                                      in storm.sent_at.items()},
                                             storm.retries, getattr(storm, "started", 0.0),
                                             getattr(storm, "finished", 0.0))))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()


# ------------------------------------------------------------------ the DMS's process


def dms_process(url, count, timeout, results):
    from lxml import etree

    from cimhes.fixtures.dms import DmsConsumer

    consumer = DmsConsumer(url, QUEUE).start()
    consumer.wait_for(count, timeout)
    time.sleep(0.5)
    consumer.stop()
    arrivals, keys = {}, {}
    for message_id, _key, body, at in consumer.messages:
        event = etree.fromstring(body).find(".//{*}EndDeviceEvent")
        created = datetime.fromisoformat(event.findtext("{*}createdDateTime").replace("Z", "+00:00"))
        key = f"{event.findtext('{*}Assets/{*}mRID')}|{created.isoformat()}"
        arrivals.setdefault(key, at - time.perf_counter() + time.time())
        keys[message_id] = key
    results.put(("received", arrivals, len(consumer.messages), consumer.distinct(),
                 len(consumer.duplicates_differ()), keys))


# ------------------------------------------------------------------ the cimhes process


def cimhes_run(args, url, with_amqp: bool, fsync: bool = False):
    """One storm through this process; returns the figures."""
    from twisted.internet import defer, reactor, task
    from twisted.internet.threads import deferToThread

    from cimhes.drivers import DeviceAddress
    from cimhes.endpoints.push_listener import PushListenerFactory
    from cimhes.endpoints.push_options import PUSH_BACKLOG
    from cimhes.engine.events import EventStore
    from cimhes.engine.push import PushIntake
    from cimhes.engine.push_journal import PushJournal
    from cimhes.engine.store import Store, StoreRunner
    from cimhes.fixtures.alarm_storm import StormMeters
    from cimhes.fixtures.dms import declare_dms_queue
    from cimhes.queue.connection import BrokerConnection
    from cimhes.queue.events import EventRelay

    committed: dict[str, float] = {}
    confirmed: dict[str, float] = {}  # MessageID -> the broker's confirm to cimhes

    class TimedEventStore(EventStore):
        def save_events(self, events, received_by, recorded_at):
            stored = super().save_events(events, received_by, recorded_at)
            at = time.time()
            for event in events:
                committed[f"{event.device_mrid}|{event.created.isoformat()}"] = at
            return stored

    devices = [DeviceAddress.from_inventory(m)
               for m in StormMeters(args.meters).inventory()["meters"]]
    folder = Path(tempfile.mkdtemp(prefix="cimhes-bench-amqp-"))
    store = Store(f"sqlite:///{folder / 'storm.sqlite'}")
    store.load_inventory(devices)
    runner = StoreRunner(reactor, store)
    intake = PushIntake(runner, TimedEventStore(store), devices)
    journal = PushJournal(folder / "push-journal", fsync=fsync)
    intake.use_journal(journal)  # as `cimhes serve` takes pushes (endpoints/push_options.py)
    listening = reactor.listenTCP(0, PushListenerFactory(reactor, intake), backlog=PUSH_BACKLOG,
                                  interface="127.0.0.1")
    context = multiprocessing.get_context("spawn")
    results, go = context.Queue(), context.Event()
    meters = context.Process(target=meters_process, args=(
        "127.0.0.1", listening.getHost().port, args.pushes, args.meters, args.wave, args.rate, go,
        results))
    meters.start()
    dms = connection = relay = None
    if with_amqp:
        declare_dms_queue(url, QUEUE, ["restore.#"])
        dms = context.Process(target=dms_process, args=(url, args.pushes, args.timeout, results))
        dms.start()
        connection = BrokerConnection(reactor, url)
        relay = EventRelay(reactor, connection, runner,
                           on_confirmed=lambda message_id: confirmed.setdefault(message_id,
                                                                                time.time()))
        connection.start()
    figures = {}

    @defer.inlineCallbacks
    def storm():
        if connection is not None:
            yield connection.connected()
        yield task.deferLater(reactor, 2.0, lambda: None)  # both children are up and listening
        cpu0, started = cpu(), time.time()
        go.set()
        outcome = {}
        for _ in range(2 if with_amqp else 1):
            got = yield deferToThread(results.get, True, args.timeout + 60)
            if got[0] == "error":
                raise RuntimeError(got[1])
            outcome[got[0]] = got[1:]
        deadline = time.time() + args.timeout
        while len(committed) < args.pushes and time.time() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield intake.idle()
        figures.update(cpu=cpu() - cpu0, started=started, outcome=outcome,
                       relay=dict(relay.counts) if relay else None, counts=dict(intake.counts))

    def go_storm():
        d = storm()
        d.addErrback(lambda f: figures.update(error=f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go_storm)
    reactor.run()
    meters.join(timeout=30)
    if dms is not None:
        dms.join(timeout=30)
    runner.stop()
    store.close()
    journal.close()
    if "error" in figures:
        raise RuntimeError(figures["error"])
    sent, retries, first_sent, last_sent = figures["outcome"]["sent"]
    to_commit = [committed[k] - sent[k] for k in sent if k in committed]
    arrival = (len(sent) - 1) / (last_sent - first_sent) if last_sent > first_sent else None
    result = {"sent": len(sent), "retries": retries, "committed": len(committed),
              "arrival": arrival, "journal": dict(journal.counts),
              "cpu": figures["cpu"], "commit_p50": percentile(to_commit, 0.5),
              "commit_p99": percentile(to_commit, 0.99), "counts": figures["counts"],
              "relay": figures["relay"]}
    if with_amqp:
        arrivals, received, distinct, differing, keys = figures["outcome"]["received"]
        latency = [arrivals[k] - sent[k] for k in sent if k in arrivals]
        confirm = [at - sent[keys[m]] for m, at in confirmed.items() if keys.get(m) in sent]
        result.update(received=received, distinct=distinct, differing=differing,
                      wall=max(arrivals.values()) - figures["started"],
                      p50=percentile(latency, 0.5), p99=percentile(latency, 0.99),
                      worst=max(latency), confirmed=len(confirm),
                      confirm_p50=percentile(confirm, 0.5), confirm_p99=percentile(confirm, 0.99),
                      confirm_worst=max(confirm),
                      confirm_wall=max(confirmed.values()) - figures["started"])
    else:
        result["wall"] = max(committed.values()) - figures["started"]
    return result


def vhost_url(base: str) -> tuple[str, str]:
    name = f"cimhes-bench-{os.getpid()}-{secrets.token_hex(3)}"
    parts = urlsplit(base)
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, parts.username or "guest",
                    ".*", ".*", ".*"], check=True)
    return urlunsplit(parts._replace(path="/" + quote(name, safe=""))), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=10_000, help="alarms in the storm")
    parser.add_argument("--meters", type=int, default=10_000,
                        help="meters sending them (default: one alarm each)")
    parser.add_argument("--rate", type=float, default=2_000.0,
                        help="alarms started per second (open loop; 0: waves of --wave as fast "
                             "as the head-end's kernel accepts them)")
    parser.add_argument("--wave", type=int, default=500, help="push connections open at once")
    parser.add_argument("--fsync", action="store_true",
                        help="also run with the push journal fsynced (--push-journal-fsync)")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--run", choices=["amqp", "baseline", "fsync"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is None:
        # Each run in a fresh process of its own: one reactor per process, run once.
        import json

        url, vhost = vhost_url(args.amqp_url)
        print(f"machine: nproc {os.cpu_count()}, Python {platform.python_version()}, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"command: python bench/amqp.py --pushes {args.pushes} --meters {args.meters} "
              f"--rate {args.rate:g} --wave {args.wave}{' --fsync' if args.fsync else ''}")
        try:
            figures = {}
            for run in ("amqp", "baseline") + (("fsync",) if args.fsync else ()):
                done = subprocess.run([sys.executable, __file__, "--run", run, "--pushes",
                                       str(args.pushes), "--meters", str(args.meters), "--wave",
                                       str(args.wave), "--rate", str(args.rate), "--timeout",
                                       str(args.timeout), "--amqp-url", url],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{run} run failed:\n{done.stderr[-3000:]}")
                figures[run] = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)
        report(args, figures["amqp"], figures["baseline"], figures.get("fsync"))
        return
    import json

    print(json.dumps(cimhes_run(args, args.amqp_url, args.run != "baseline",
                                fsync=args.run == "fsync")))


def line(name, run, n) -> str:
    return (f"{name}: {n / run['confirm_wall']:,.0f} alarms/s socket to confirmed "
            f"({run['confirm_wall']:.2f} s), CPU {1e6 * run['cpu'] / n:.0f} us/alarm; latency "
            f"push sent to the broker's confirm (the message on the DMS queue) p50 "
            f"{1e3 * run['confirm_p50']:.0f} ms, p99 {1e3 * run['confirm_p99']:.0f} ms, max "
            f"{1e3 * run['confirm_worst']:.0f} ms ({run['confirmed']} confirms timed); of which "
            f"send-to-commit p50 {1e3 * run['commit_p50']:.0f} ms, p99 "
            f"{1e3 * run['commit_p99']:.0f} ms; to the DMS consumer's hands p50 "
            f"{1e3 * run['p50']:.0f} ms, p99 {1e3 * run['p99']:.0f} ms")


def report(args, amqp, base, fsync=None) -> None:
    n = amqp["sent"]
    shape = (f"started at {args.rate:,.0f}/s (arrival rate as sent: {amqp['arrival']:,.0f}/s), "
             f"at most {args.wave} open" if args.rate else f"{args.wave} at a time, each wave "
             "after the last closed")
    print(f"storm: {n} power-up alarm pushes from {args.meters} meters, one TCP connection each, "
          f"{shape}; meters and DMS in their own processes; push journal on")
    print(line("cimhes with AMQP", amqp, n))
    print(f"  DMS: {amqp['received']} messages, {amqp['distinct']} distinct MessageIDs, "
          f"{amqp['received'] - amqp['distinct']} duplicates ({amqp['differing']} differing); "
          f"relay {amqp['relay']}; {amqp['retries']} push retries; committed {amqp['committed']}")
    print(f"baseline, AMQP off (socket to committed event): {n / base['wall']:,.0f} alarms/s "
          f"({base['wall']:.2f} s), CPU {1e6 * base['cpu'] / n:.0f} us/alarm, send-to-commit "
          f"p50 {1e3 * base['commit_p50']:.0f} ms, p99 {1e3 * base['commit_p99']:.0f} ms")
    print(f"with AMQP / baseline: throughput {base['wall'] / amqp['confirm_wall']:.2f}x, CPU per alarm "
          f"{amqp['cpu'] / base['cpu']:.2f}x; p99 target 2 s: "
          f"{'met' if amqp['confirm_p99'] < 2.0 else 'NOT met'} (p99 {amqp['confirm_p99']:.2f} s)")
    if fsync is not None:
        print(line("with the journal fsynced (--push-journal-fsync)", fsync, n))
        print(f"fsync / no fsync: CPU per alarm {fsync['cpu'] / amqp['cpu']:.2f}x, p99 "
              f"{fsync['confirm_p99'] / amqp['confirm_p99']:.2f}x; journal {fsync['journal']}")
    if amqp["distinct"] != n:
        print(f"FAILED: the DMS received {amqp['distinct']} of {n} alarms", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
