"""Benchmark: full reads of HLS-GMAC meters against LLS meters, in one run, and both against gurux.

One fleet process (`cimhes simulate --security mixed`): odd meters use HLS-GMAC with security
suite 0, even meters LLS. In this process, on a fresh SQLite store with the counter book:

1. cimhes, LLS meters: one GetMeterReadings through `MeterReadingService` (the full read of
   bench/read_fleet.py: association, clock, four registers with scaler_unit, capture objects,
   96-row profile by range, release);
2. cimhes, HLS meters, first time: the head-end knows no counter yet, so each meter is first
   read as the public client (its invocation counter), then the ciphered full read;
3. cimhes, HLS meters again: counters known (steady state, what a head-end does every day);
4. baseline: a synchronous sequential gurux client, HLS-GMAC with gurux's own cipher, on a
   sample of the HLS meters (public-client counter read, then the same full read);
5. the cipher alone: seal + open of a 64-octet APDU by `cimhes.drivers.ciphering` and by
   gurux's `GXDLMSChippering`.

CPU is this process's (getrusage: reactor and store threads). A run where a meter fails or a
value is wrong is aborted, not reported.

    python bench/read_fleet_security.py [--meters 1000] [--concurrency 200] [--sample 20] [--gc tuned]

Each phase prints its reactor-thread and store-thread CPU per read and the counter book's share.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

UTC = timezone.utc
REGISTER_TYPES = {
    "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": "1.0.1.8.0.255",
    "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": "1.0.2.8.0.255",
    "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0": "1.0.1.8.1.255",
    "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0": "1.0.1.8.2.255",
}
PROFILE_TYPES = ["0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"]
WRAPPER_HEADER = struct.Struct(">HHHH")
CLIENT_TITLE = bytes.fromhex("43494d4845530001")


class Aborted(Exception):
    pass


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu(ident: int) -> float:
    """CPU seconds of one thread of this process (its own clock, whatever thread asks)."""
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def store_thread_ident(runner) -> int:
    """The ident of the store's one worker thread (asked on that thread)."""
    import threading
    return runner.call(threading.get_ident)


class TimedCounterStore:
    """Adds up the store thread's CPU inside the counter book's transactions."""

    def __init__(self, counter_store):
        self.cpu = 0.0
        self._batch = counter_store.batch

        def batch(operations):
            started = time.thread_time()
            try:
                return self._batch(operations)
            finally:
                self.cpu += time.thread_time() - started
        counter_store.batch = batch


def window_now() -> tuple[datetime, datetime]:
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    end -= timedelta(minutes=end.minute % 15)
    return end - timedelta(hours=24), end


class Fleet:
    def __init__(self, meters: int, workdir: Path):
        self.inventory = workdir / "inventory.json"
        cimhes = Path(sys.executable).with_name("cimhes")
        self.process = subprocess.Popen(
            [str(cimhes), "simulate", "--meters", str(meters), "--port", "0", "--security",
             "mixed", "--inventory", str(self.inventory)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        readable, _, _ = select.select([self.process.stdout], [], [], 120)
        if not readable or b'"ready": true' not in self.process.stdout.readline():
            self.stop()
            raise Aborted("the fleet did not start")

    def entries(self) -> list[dict]:
        return json.loads(self.inventory.read_text())["meters"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(15)


async def engine_read(reactor, service, entries, window) -> tuple[float, float]:
    from cimhes.cim.message import Header
    from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings

    request = GetMeterReadings(
        header=Header(verb="get", noun="MeterReadings"),
        end_devices=[DeviceRef(mrid=entry["mrid"]) for entry in entries], usage_points=[],
        reading_types=[*REGISTER_TYPES, *PROFILE_TYPES], start=window[0], end=window[1])
    cpu, wall = process_cpu(), time.perf_counter()
    outcome = await service.read(request)
    cpu, wall = process_cpu() - cpu, time.perf_counter() - wall
    if outcome.errors:
        raise Aborted(f"{len(outcome.errors)} errors, e.g. {outcome.errors[0].reason}")
    for meter in outcome.meter_readings:
        if len(meter.readings) != 4 or [len(b.readings) for b in meter.interval_blocks] != [96, 96]:
            raise Aborted(f"meter {meter.meter.mrid}: incomplete read")
    if len(outcome.meter_readings) != len(entries):
        raise Aborted(f"{len(outcome.meter_readings)} of {len(entries)} meters read")
    return wall, cpu


def gurux_hls_read(entry: dict, window, timeout: float = 10.0) -> None:
    """Public-client counter read, then the full read, HLS-GMAC with gurux's own cipher."""
    from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
    from gurux_dlms.enums import Authentication, Conformance, InterfaceType, Security
    from gurux_dlms.GXCiphering import GXCiphering
    from gurux_dlms.objects import GXDLMSClock, GXDLMSData, GXDLMSProfileGeneric, GXDLMSRegister

    def session(client, body):
        with socket.create_connection((entry["host"], entry["port"]), timeout=timeout) as sock:
            def exchange(frames):
                reply = GXReplyData()
                for frame in frames:
                    sock.sendall(frame)
                    client.getData(GXByteBuffer(receive_frame(sock)), reply)
                while reply.isMoreData():
                    sock.sendall(client.receiverReady(reply))
                    client.getData(GXByteBuffer(receive_frame(sock)), reply)
                return reply

            def read(target, attribute):
                client.updateValue(target, attribute, exchange(client.read(target, attribute)).value)

            client.parseAareResponse(exchange(client.aarqRequest()).data)
            body(client, exchange, read)
            exchange(client.releaseRequest())

    public = GXDLMSClient(True, 16, 1, Authentication.NONE, None, InterfaceType.WRAPPER)
    counter = GXDLMSData("0.0.43.1.0.255")
    session(public, lambda client, exchange, read: read(counter, 2))

    client = GXDLMSClient(True, 1, 1, Authentication.HIGH_GMAC, None, InterfaceType.WRAPPER)
    client.settings.cipher = cipher = GXCiphering(CLIENT_TITLE)
    cipher.security = Security.AUTHENTICATION_ENCRYPTION
    cipher.blockCipherKey = bytes.fromhex(entry["encryption_key"])
    cipher.authenticationKey = bytes.fromhex(entry["authentication_key"])
    cipher.invocationCounter = int(counter.value) + 1
    client.proposedConformance &= ~Conformance.GENERAL_PROTECTION

    def full_read(client, exchange, read):
        client.parseApplicationAssociationResponse(
            exchange(client.getApplicationAssociationRequest()).data)
        read(GXDLMSClock("0.0.1.0.0.255"), 2)
        for obis in REGISTER_TYPES.values():
            register = GXDLMSRegister(obis)
            read(register, 3)
            read(register, 2)
        profile = GXDLMSProfileGeneric("1.0.99.1.0.255")
        read(profile, 3)
        client.updateValue(profile, 2, exchange(client.readRowsByRange(profile, *window)).value)
        if len(profile.buffer) != 97:
            raise Aborted(f"gurux read {len(profile.buffer)} rows from {entry['name']}")

    session(client, full_read)


def receive_frame(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 8 or len(data) < 8 + WRAPPER_HEADER.unpack(data[:8])[3]:
        need = 8 - len(data) if len(data) < 8 else 8 + WRAPPER_HEADER.unpack(data[:8])[3] - len(data)
        chunk = sock.recv(need)
        if not chunk:
            raise ConnectionError("the meter closed the connection")
        data += chunk
    return data


def cipher_alone(seconds: float = 0.5) -> tuple[float, float]:
    """(cimhes seal+open per second, gurux encrypt+decrypt per second) for a 64-octet APDU."""
    from gurux_dlms import GXByteBuffer
    from gurux_dlms.AesGcmParameter import AesGcmParameter
    from gurux_dlms.enums import Command, Security
    from gurux_dlms.GXDLMSChippering import GXDLMSChippering
    from gurux_dlms.GXDLMSSettings import GXDLMSSettings

    from cimhes.drivers.ciphering import GlobalCipher, SecurityKeys

    ek, ak, apdu = bytes(range(16)), bytes(range(16, 32)), bytes(range(64))
    cipher = GlobalCipher(SecurityKeys(ek, ak))
    ours, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        cipher.open(CLIENT_TITLE, cipher.seal(CLIENT_TITLE, ours, apdu))
        ours += 1
    ours_rate = ours / (time.process_time() - start)
    settings = GXDLMSSettings(False, None)
    theirs, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        parameter = AesGcmParameter(Command.GLO_GET_REQUEST, CLIENT_TITLE, ek, ak)
        parameter.security = Security.AUTHENTICATION_ENCRYPTION
        parameter.invocationCounter = theirs
        sealed = GXDLMSChippering.encryptAesGcm(parameter, apdu)
        GXDLMSChippering.decryptAesGcm(settings, AesGcmParameter(0, CLIENT_TITLE, ek, ak),
                                       GXByteBuffer(sealed))
        theirs += 1
    return ours_rate, theirs / (time.process_time() - start)


async def run(reactor, args) -> None:
    from cimhes.drivers import DeviceAddress
    from cimhes.drivers.security import HeadEndSecurity
    from cimhes.engine.reading import MeterReadingService
    from cimhes.engine.security import CounterStore, StoredCounters
    from cimhes.engine.store import Store, StoreRunner

    workdir = Path(tempfile.mkdtemp(prefix="cimhes-bench-security-"))
    fleet = Fleet(args.meters, workdir)
    try:
        entries = fleet.entries()
        lls = [e for e in entries if e["security"] == "low"]
        hls = [e for e in entries if e["security"] == "hls-gmac"]
        store = Store(f"sqlite:///{workdir / 'bench.sqlite'}")
        store.load_inventory([DeviceAddress(**e) for e in entries])
        runner = StoreRunner(reactor, store)
        store_thread = await store_thread_ident(runner)
        counter_store = CounterStore(store)
        book_timing = TimedCounterStore(counter_store)
        security = HeadEndSecurity(CLIENT_TITLE, StoredCounters(runner, counter_store))
        service = MeterReadingService(reactor, runner, concurrency=args.concurrency,
                                      timeout=30.0, security=security)
        window = window_now()
        if args.gc == "tuned":  # as cimhes serve and demo do before serving
            from cimhes.engine.garbage_collection import tune_for_throughput
            tune_for_throughput()
        if args.gc_thresholds:
            import gc
            gc.set_threshold(*(int(part) for part in args.gc_thresholds.split(",")))
        rows = []
        split = {}
        for label, group in (("cimhes LLS", lls), ("cimhes HLS-GMAC, counters unknown", hls),
                             ("cimhes HLS-GMAC, counters known", hls), ("cimhes LLS again", lls)):
            store_cpu, book_cpu = thread_cpu(store_thread), book_timing.cpu
            wall, cpu = await engine_read(reactor, service, group, window)
            rows.append((label, len(group), wall, cpu))
            split[label] = (thread_cpu(store_thread) - store_cpu, book_timing.cpu - book_cpu)
        runner.stop()
        store.close()

        sample = hls[:: max(1, len(hls) // args.sample)][:args.sample]
        cpu, wall = process_cpu(), time.perf_counter()
        for entry in sample:
            gurux_hls_read(entry, window)
        rows.append(("sync gurux HLS-GMAC baseline", len(sample), time.perf_counter() - wall,
                     process_cpu() - cpu))
    finally:
        fleet.stop()

    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    import gc
    print(f"# {args.meters} meters (half HLS-GMAC, half LLS), concurrency {args.concurrency}, "
          f"fleet in its own process; collector {args.gc}, thresholds {gc.get_threshold()}")
    print(f"{'phase':38} {'meters':>6} {'wall s':>7} {'CPU s':>7} {'ms CPU/read':>11} "
          f"{'reads/CPU-s':>11}")
    for label, count, wall, cpu in rows:
        print(f"{label:38} {count:6d} {wall:7.2f} {cpu:7.2f} {1000 * cpu / count:11.2f} "
              f"{count / cpu:11.0f}")
    for label, count, _, cpu in rows:
        if label in split:
            store_cpu, book_cpu = split[label]
            print(f"  {label}: reactor thread {1000 * (cpu - store_cpu) / count:.2f} ms/read, "
                  f"store thread {1000 * store_cpu / count:.2f} ms/read (of which the counter "
                  f"book {1000 * book_cpu / count:.2f})")
    per = {label: cpu / count for label, count, _, cpu in rows}
    lls_cpu = (per["cimhes LLS"] + per["cimhes LLS again"]) / 2
    print(f"HLS-GMAC (counters known) / LLS CPU per read: "
          f"{per['cimhes HLS-GMAC, counters known'] / lls_cpu:.2f}x")
    print(f"gurux HLS baseline / cimhes HLS CPU per read: "
          f"{per['sync gurux HLS-GMAC baseline'] / per['cimhes HLS-GMAC, counters known']:.1f}x")
    ours, theirs = cipher_alone()
    print(f"cipher alone, 64-octet APDU seal+open: cimhes (cryptography) {ours:,.0f}/s, gurux "
          f"(pure Python) {theirs:,.0f}/s: {ours / theirs:,.0f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--sample", type=int, default=20, help="meters the gurux baseline reads")
    parser.add_argument("--gc", choices=["tuned", "default"], default="tuned",
                        help="the collector as cimhes serve runs it (tuned, "
                        "engine/garbage_collection.py) or Python's default thresholds")
    parser.add_argument("--gc-thresholds", help="other thresholds, e.g. 50000,20,20")
    args = parser.parse_args(argv)
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
