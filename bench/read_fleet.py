"""Benchmark: read a simulated fleet with the cimhes engine, and the same reads with plain sync gurux.

Each meter gets one full read: association (LLS), clock, four registers (value and scaler_unit),
the load profile's capture objects and a 24-hour window of its buffer by range (96 rows, block
transfer), release. The fleet runs in its own process (`cimhes simulate`), so the CPU figures
below belong to the reading process alone:

- cimhes: one GetMeterReadings for every meter through `MeterReadingService` on a fresh store
  (`Store` + `StoreRunner`; SQLite by default, or a database of its own on the PostgreSQL server
  `--store` names), as a SOAP request would arrive at the engine; CPU is the whole reading
  process (getrusage RUSAGE_SELF: the reactor thread and the store's worker thread). On
  PostgreSQL the database server's CPU is printed beside it (`ServerCPU`): its backends for the
  bench's database, and the whole server (every process of it, other clients included).
- baseline: a synchronous, sequential gurux client (one blocking socket per meter, gurux's own
  getData/updateValue decoding), in the same process, on the same meters and window.

Every run checks that every meter answered in full and that the two sides read the same values;
a run that does not is aborted, not reported.

    python bench/read_fleet.py [--meters 1000] [--concurrency 200] [--delay 0|0.1]
        [--store postgresql+psycopg://postgres@127.0.0.1:55432/postgres]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

UTC = timezone.utc
INTERVAL = timedelta(minutes=15)
INTERVALS = 96

# The reading types of README.md: four registers, then the two 15-minute profile columns.
REGISTER_TYPES = {
    "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": "1.0.1.8.0.255",
    "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": "1.0.2.8.0.255",
    "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0": "1.0.1.8.1.255",
    "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0": "1.0.1.8.2.255",
}
PROFILE_TYPES = {  # reading type -> column of the load profile buffer (0 is the clock)
    "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0": 1,
    "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0": 2,
}
PROFILE_REGISTER = {1: "1.0.1.8.0.255", 2: "1.0.2.8.0.255"}
CLOCK_OBIS = "0.0.1.0.0.255"
LOAD_PROFILE_OBIS = "1.0.99.1.0.255"
WRAPPER_HEADER = struct.Struct(">HHHH")


class Aborted(Exception):
    """The run cannot be reported: a meter failed, a value differs, the fleet did not start."""


# -- measuring ---------------------------------------------------------------------------------

def process_cpu() -> float:
    """User + system CPU seconds of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def other_process_cpu(pid: int) -> float:
    """User + system CPU seconds of another process (the fleet), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(ident: int) -> float:
    """CPU seconds of one thread of this process (its own clock, whatever thread asks)."""
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


class ServerCPU:
    """A PostgreSQL server's CPU, from /proc (the server must run on this machine): the
    backends connected to one database (those alive at the end; one that exited meanwhile, an
    autovacuum worker, is only in the whole-server figure), and the whole server: the
    postmaster with every child it reaped, plus its live children."""

    def __init__(self, admin_url: str, database: str):
        from sqlalchemy import create_engine

        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=_null_pool())
        self._database = database
        with self._admin.connect() as connection:
            backend = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        self.postmaster = _proc_stat(backend)[1] if _proc_stat(backend) else None

    def sample(self) -> tuple[dict[int, float], float] | None:
        """(CPU seconds of each backend of the database, CPU seconds of the whole server)."""
        if self.postmaster is None:
            return None
        with self._admin.connect() as connection:
            pids = connection.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = %(d)s",
                {"d": self._database}).scalars().all()
        backends = {pid: stat[0] for pid in pids if (stat := _proc_stat(pid))}
        whole = _proc_stat(self.postmaster, children=True)[0]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) \
                    and stat[1] == self.postmaster:
                whole += stat[0]
        return backends, whole

    @staticmethod
    def spent(before, after) -> tuple[float, float]:
        (backends_before, whole_before), (backends_after, whole_after) = before, after
        backends = sum(cpu - backends_before.get(pid, 0.0) for pid, cpu in backends_after.items())
        return backends, whole_after - whole_before

    def close(self) -> None:
        self._admin.dispose()


def _null_pool():
    from sqlalchemy.pool import NullPool
    return NullPool


def _proc_stat(pid: int, children: bool = False) -> tuple[float, int] | None:
    """(user + system CPU seconds, parent pid) of a process, with its reaped children's CPU
    if `children`; None if it is not (or no longer) there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK"), int(fields[1])


class PostgresDatabases:
    """Databases of the bench's own on the server `--store` names (made, migrated, dropped)."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        self.admin_url = make_url(url)
        self._admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT",
                                    poolclass=_null_pool())
        self._made: list[str] = []

    def create(self) -> tuple[str, str]:
        """A new database at every head revision: (its URL, its name)."""
        import secrets

        from sqlalchemy import create_engine

        from cimhes.engine import schema

        name = f"cimhes_bench_{os.getpid()}_{secrets.token_hex(3)}"
        with self._admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self._made.append(name)
        url = self.admin_url.set(database=name).render_as_string(hide_password=False)
        engine = create_engine(url)
        try:
            schema.upgrade(engine)
        finally:
            engine.dispose()
        return url, name

    def server_version(self) -> str:
        with self._admin.connect() as connection:
            return connection.exec_driver_sql("SHOW server_version").scalar_one()

    def drop_all(self) -> None:
        with self._admin.connect() as connection:
            for name in self._made:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._made.clear()
        self._admin.dispose()


class CollectorPauses:
    """Time spent in Python's cyclic collector, per generation, while it is installed."""

    def __init__(self) -> None:
        import gc
        self._gc = gc
        self.spent = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self.longest = 0.0
        self.cpu = 0.0
        self._started = self._started_cpu = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started, self._started_cpu = time.perf_counter(), time.thread_time()
            return
        pause = time.perf_counter() - self._started
        self.cpu += time.thread_time() - self._started_cpu
        generation = info["generation"]
        self.spent[generation] += pause
        self.count[generation] += 1
        self.longest = max(self.longest, pause)

    def stop(self) -> None:
        self._gc.callbacks.remove(self._callback)

    def summary(self, reads: int) -> str:
        total = sum(self.spent)
        runs = ", ".join(f"gen{g} {self.count[g]} x {1000 * self.spent[g]:.0f} ms"
                         for g in range(3) if self.count[g])
        return (f"cyclic collector: {1000 * total:.0f} ms wall, {1000 * self.cpu:.0f} ms CPU "
                f"({1e6 * self.cpu / reads:.0f} us CPU/read; {runs or 'did not run'}; longest "
                f"pause {1000 * self.longest:.1f} ms)")


# Where a function's own CPU is counted in the profile by part: the first pattern its file
# matches. Built-in functions (sockets, epoll, isinstance, ...) count for the part that called
# them, in proportion to the calls.
PARTS = (
    ("/twisted/", "Twisted (reactor, Deferreds, TCP transport)"),
    ("/drivers/transport.py", "driver: transport (timers, request/answer)"),
    ("/drivers/stepping.py", "driver: stepping (coroutine per read, Answer per exchange)"),
    ("/drivers/dlms_session.py", "driver: DLMS session (requests, frames, APDUs)"),
    ("/drivers/axdr.py", "driver: A-XDR decoding"),
    ("/drivers/ciphering.py", "driver: ciphering (AES-GCM)"),
    ("/drivers/", "driver: IDIS association + conversion to CIM"),
    ("/gurux_dlms/", "gurux-dlms (AARQ/AARE, RLRQ)"),
    ("/cim/", "CIM objects (MeterReading, IntervalReading)"),
    ("/sqlalchemy/", "SQLAlchemy"),
    ("/engine/store.py", "engine: store"),
    ("/engine/reading_copy.py", "engine: store"),
    ("/engine/jobs.py", "engine: job store"),
    ("/engine/", "engine: dispatch, reading, outcomes"),
    ("sqlite3", "sqlite3"),
    ("/psycopg", "psycopg"),
    ("/decimal", "decimal"),
    ("/datetime", "datetime"),
)


def part_of(filename: str) -> str:
    for pattern, part in PARTS:
        if pattern in filename:
            return part
    return "other Python"


class ThreadProfilers:
    """cProfile on the reactor thread and on the store thread, timed by each thread's CPU
    clock (waiting in epoll or for the GIL costs nothing), reported by part."""

    def __init__(self) -> None:
        import cProfile
        self.reactor = cProfile.Profile(time.thread_time)
        self.store = cProfile.Profile(time.thread_time)

    def report(self, reads: int, top: int) -> None:
        import pstats
        keep = os.environ.get("CIMHES_BENCH_PROFILE_DIR")
        if keep:  # for pstats browsing afterwards
            self.reactor.dump_stats(Path(keep) / "reactor.prof")
            self.store.dump_stats(Path(keep) / "store.prof")
        print("profile of a full read, by part (cProfile on thread CPU time; cProfile's own "
              "overhead inflates small functions, so read the shares):")
        for name, profiler in (("reactor thread", self.reactor), ("store thread", self.store)):
            stats = pstats.Stats(profiler)
            parts: dict[str, float] = {}
            for (filename, _, _), (_, _, own, _, callers) in stats.stats.items():
                if filename != "~":
                    part = part_of(filename)
                    parts[part] = parts.get(part, 0.0) + own
                    continue
                calls = sum(entry[1] for entry in callers.values()) or 1
                for (caller_file, _, _), entry in callers.items():
                    part = part_of(caller_file)
                    parts[part] = parts.get(part, 0.0) + own * entry[1] / calls
            total = sum(parts.values())
            print(f"  {name}: {1000 * total / reads:.2f} ms/read under the profiler")
            for part, spent in sorted(parts.items(), key=lambda item: -item[1]):
                print(f"    {1e6 * spent / reads:8.0f} us/read {100 * spent / total:5.1f} %  {part}")
        print(f"  the reactor thread's {top} costliest functions (own time):")
        pstats.Stats(self.reactor).sort_stats("tottime").print_stats(top)
        print(f"  the store thread's {top // 2} costliest functions (own time):")
        pstats.Stats(self.store).sort_stats("tottime").print_stats(top // 2)


@dataclass
class Phase:
    """One side's figures for one run."""

    name: str
    meters: int
    concurrency: int
    wall: float
    cpu: float
    fleet_cpu: float
    notes: list[str] = field(default_factory=list)

    @property
    def reads_per_second(self) -> float:
        return self.meters / self.wall

    @property
    def cpu_per_read(self) -> float:
        return self.cpu / self.meters

    @property
    def reads_per_cpu_second(self) -> float:
        return self.meters / self.cpu


# -- the simulated fleet, in its own process ---------------------------------------------------

class FleetProcess:
    """`cimhes simulate` as a child process: started, waited for, always stopped."""

    def __init__(self, meters: int, port: int, delay: float, workdir: Path,
                 extra: list[str] = ()):
        name = f"{delay:g}-{len(extra)}"
        self.inventory_path = workdir / f"inventory-{name}.json"
        self._log = open(workdir / f"simulate-{name}.log", "w+b")
        cimhes = Path(sys.executable).with_name("cimhes")
        command = ([str(cimhes)] if cimhes.exists()
                   else [sys.executable, "-m", "cimhes.endpoints.cli"])
        command += ["simulate", "--meters", str(meters), "--port", str(port),
                    "--inventory", str(self.inventory_path), "--delay", repr(delay), *extra]
        self.command = command
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log)

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Aborted(f"the fleet printed no ready line within {seconds:g} s")
            readable, _, _ = select.select([self.process.stdout], [], [], left)
            if not readable:
                continue
            line = self.process.stdout.readline()
            if not line:
                self._log.seek(0)
                tail = self._log.read()[-2000:].decode(errors="replace")
                raise Aborted(f"the fleet exited ({self.process.wait()}) before it was ready:\n"
                              f"{tail}")
            if b'"ready": true' in line:
                return

    def cpu(self) -> float:
        return other_process_cpu(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self._log.close()


# -- cimhes: the engine, as a request reaches it -----------------------------------------------

def timed_store_class():
    """A Store that notes wall and thread CPU time of each unit of work (it runs on the store
    thread, so thread_time there is the store thread's own CPU)."""
    from cimhes.engine.store import Store

    class TimedStore(Store):
        def __init__(self, url: str):
            super().__init__(url)
            self.timings: dict[str, list[float]] = {}

        def _timed(self, name, method, *args):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return method(*args)
            finally:
                spent = self.timings.setdefault(name, [0.0, 0.0, 0])
                spent[0] += time.perf_counter() - wall
                spent[1] += time.thread_time() - cpu
                spent[2] += 1

        def find_devices(self, *args):
            return self._timed("find_devices", super().find_devices, *args)

        def save_meter_readings(self, *args):
            return self._timed("save_meter_readings", super().save_meter_readings, *args)

    return TimedStore


# The store thread's units of job bookkeeping, timed like the store's own (`timed_units`).
JOB_UNITS = (("cimhes.engine.jobs", "JobStore", "create_request"),
             ("cimhes.engine.jobs", "JobStore", "claim"),
             ("cimhes.engine.dispatch", "Dispatcher", "_decide_and_settle"))


class timed_units:
    """While in use, JOB_UNITS note their wall and thread CPU time in `store.timings` (they run
    on the store thread; `_decide_and_settle` includes `JobStore.settle`)."""

    def __init__(self, store) -> None:
        import importlib
        self._patched = []
        for module, owner, name in JOB_UNITS:
            cls = getattr(importlib.import_module(module), owner)
            original = getattr(cls, name)

            def timed(*args, _original=original, _name=name, **kwargs):
                return store._timed(_name, lambda: _original(*args, **kwargs))
            self._patched.append((cls, name, original))
            setattr(cls, name, timed)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, original in self._patched:
            setattr(cls, name, original)


async def read_with_cimhes(reactor, inventory: list[dict], window, concurrency: int,
                           timeout: float, database: Path, fleet: FleetProcess,
                           profile: int = 0, name: str = "cimhes engine",
                           postgres: PostgresDatabases | None = None):
    from sqlalchemy import func, select

    from cimhes.cim.message import Header
    from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
    from cimhes.drivers import DeviceAddress
    from cimhes.engine.reading import MeterReadingService
    from cimhes.engine.store import ReadingRecord, StoreRunner

    server = None
    if postgres is not None:
        url, database_name = postgres.create()
        server = ServerCPU(postgres.admin_url.render_as_string(hide_password=False), database_name)
    else:
        url = f"sqlite:///{database}"
    store = timed_store_class()(url)
    store.load_inventory([DeviceAddress(**entry) for entry in inventory])
    runner = StoreRunner(reactor, store)
    units = timed_units(store)
    try:
        service = MeterReadingService(reactor, runner, concurrency=concurrency, timeout=timeout)
        request = GetMeterReadings(
            header=Header(verb="get", noun="MeterReadings"),
            end_devices=[DeviceRef(mrid=entry["mrid"]) for entry in inventory],
            reading_types=[*REGISTER_TYPES, *PROFILE_TYPES], start=window[0], end=window[1])

        store_thread = await runner.call(threading.get_ident)
        profilers = None
        if profile:
            profilers = ThreadProfilers()
            await runner.call(profilers.store.enable)
            profilers.reactor.enable()
        pauses = CollectorPauses()
        server_before = server.sample() if server else None
        fleet_cpu, cpu, wall = fleet.cpu(), process_cpu(), time.perf_counter()
        store_cpu = thread_cpu(store_thread)
        outcome = await service.read(request)
        wall, cpu = time.perf_counter() - wall, process_cpu() - cpu
        store_cpu = thread_cpu(store_thread) - store_cpu
        server_after = server.sample() if server else None
        if await runner.call(threading.get_ident) != store_thread:
            raise Aborted("the store's worker thread changed during the read")
        fleet_cpu = fleet.cpu() - fleet_cpu
        pauses.stop()
        if profilers is not None:
            profilers.reactor.disable()
            await runner.call(profilers.store.disable)
            profilers.report(len(inventory), profile)

        check_outcome(outcome, inventory)
        with store.engine.connect() as connection:
            stored = connection.execute(select(func.count()).select_from(ReadingRecord)).scalar()
        expected = len(inventory) * (len(REGISTER_TYPES) + len(PROFILE_TYPES) * INTERVALS)
        if stored != expected:
            raise Aborted(f"cimhes stored {stored} readings, {expected} expected")
    finally:
        units.__exit__()
        runner.stop()
        store.close()
        if server is not None:
            server.close()

    phase = Phase(name, len(inventory), concurrency, wall, cpu, fleet_cpu)
    if server is not None and server_before and server_after:
        backends, whole = ServerCPU.spent(server_before, server_after)
        reads = len(inventory)
        phase.notes.append(
            f"database server (PostgreSQL): {backends:.2f} s CPU in this database's backends "
            f"({1000 * backends / reads:.2f} ms/read), {whole:.2f} s in the whole server "
            f"({1000 * whole / reads:.2f} ms/read, every process of it: other clients' work "
            f"included); reading process + backends: {1000 * (cpu + backends) / reads:.2f} ms "
            f"CPU per read ({reads / (cpu + backends):.0f} reads per CPU-second)")
    elif server is not None:
        phase.notes.append("database server's CPU not measured: it is not on this machine")
    save_wall, save_cpu, saves = store.timings["save_meter_readings"]
    phase.notes.append(
        f"store thread: {store_cpu:.2f} s CPU ({1000 * store_cpu / len(inventory):.2f} ms/read: "
        f"jobs created, claimed and settled, readings saved), of which save_meter_readings "
        f"{save_wall:.2f} s wall / {save_cpu:.2f} s CPU for {stored} rows in {saves} "
        "transactions, written while meters were still being read")
    reads = len(inventory)
    timings = store.timings
    timed_cpu = sum(timings.get(n, (0, 0))[1] for n in ("save_meter_readings", "create_request",
                                                        "claim", "_decide_and_settle"))
    phase.notes.append(
        "store thread by unit, ms CPU/read: " + ", ".join(
            f"{label} {1000 * timings[n][1] / reads:.2f}" for n, label in (
                ("save_meter_readings", "readings saved"),
                ("create_request", "jobs created"), ("claim", "jobs claimed"),
                ("_decide_and_settle", "outcomes settled")) if n in timings)
        + f", the rest {1000 * (store_cpu - timed_cpu) / reads:.2f}")
    reactor_cpu = cpu - store_cpu
    phase.notes.append(
        f"reactor thread (DLMS sessions, driver, engine) and the rest of the process: "
        f"{reactor_cpu:.2f} s CPU ({1000 * reactor_cpu / len(inventory):.2f} ms/read)")
    phase.notes.append(pauses.summary(len(inventory)))
    return phase, {m.meter.mrid: m for m in outcome.meter_readings}


def check_outcome(outcome, inventory: list[dict]) -> None:
    if outcome.errors:
        shown = "\n  ".join(f"{e.code} {e.id}: {e.reason}" for e in outcome.errors[:10])
        raise Aborted(f"cimhes: {len(outcome.errors)} error(s), e.g.\n  {shown}")
    read = {m.meter.mrid for m in outcome.meter_readings}
    missing = [entry["mrid"] for entry in inventory if entry["mrid"] not in read]
    if missing or len(outcome.meter_readings) != len(inventory):
        raise Aborted(f"cimhes returned {len(outcome.meter_readings)} meter readings for "
                      f"{len(inventory)} meters; missing e.g. {missing[:3]}")
    for meter in outcome.meter_readings:
        sizes = sorted(len(block.readings) for block in meter.interval_blocks)
        if len(meter.readings) != len(REGISTER_TYPES) or sizes != [INTERVALS] * len(PROFILE_TYPES):
            raise Aborted(f"cimhes: meter {meter.meter.mrid} gave {len(meter.readings)} register "
                          f"readings and interval blocks of {sizes} readings")


# -- the baseline: plain synchronous gurux, one meter after the other --------------------------

@dataclass
class GuruxRead:
    """What the gurux client holds after reading one meter: gurux's own objects."""

    entry: dict
    clock: object
    registers: dict[str, object]
    profile: object


def receive_frame(sock: socket.socket) -> bytes:
    """One DLMS wrapper frame: 8-byte header, then as many bytes as it says."""
    data = b""
    while len(data) < WRAPPER_HEADER.size:
        data += _recv(sock, WRAPPER_HEADER.size - len(data))
    length = WRAPPER_HEADER.unpack(data)[3]
    while len(data) < WRAPPER_HEADER.size + length:
        data += _recv(sock, WRAPPER_HEADER.size + length - len(data))
    return data


def _recv(sock: socket.socket, size: int) -> bytes:
    chunk = sock.recv(size)
    if not chunk:
        raise ConnectionError("the meter closed the connection")
    return chunk


def read_with_gurux(entry: dict, start: datetime, end: datetime, timeout: float) -> GuruxRead:
    from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
    from gurux_dlms.enums import Authentication, InterfaceType
    from gurux_dlms.objects import GXDLMSClock, GXDLMSProfileGeneric, GXDLMSRegister

    client = GXDLMSClient(True, entry["client_address"], entry["server_address"],
                          Authentication.LOW, entry["password"], InterfaceType.WRAPPER)
    with socket.create_connection((entry["host"], entry["port"]), timeout=timeout) as sock:

        def exchange(frames) -> GXReplyData:
            reply = GXReplyData()
            for frame in frames:
                sock.sendall(frame)
                client.getData(GXByteBuffer(receive_frame(sock)), reply)
            while reply.isMoreData():
                sock.sendall(client.receiverReady(reply))
                client.getData(GXByteBuffer(receive_frame(sock)), reply)
            return reply

        def read(target, attribute) -> None:
            client.updateValue(target, attribute, exchange(client.read(target, attribute)).value)

        client.parseAareResponse(exchange(client.aarqRequest()).data)
        clock = GXDLMSClock(CLOCK_OBIS)
        read(clock, 2)
        registers = {}
        for obis in REGISTER_TYPES.values():
            register = GXDLMSRegister(obis)
            read(register, 3)
            read(register, 2)
            registers[obis] = register
        profile = GXDLMSProfileGeneric(LOAD_PROFILE_OBIS)
        read(profile, 3)
        client.updateValue(profile, 2, exchange(client.readRowsByRange(profile, start, end)).value)
        exchange(client.releaseRequest())
    return GuruxRead(entry, clock, registers, profile)


def read_sample_with_gurux(sample: list[dict], window, timeout: float, fleet: FleetProcess):
    reads = []
    fleet_cpu, cpu, wall = fleet.cpu(), process_cpu(), time.perf_counter()
    for entry in sample:
        try:
            reads.append(read_with_gurux(entry, *window, timeout))
        except Exception as failure:
            raise Aborted(f"baseline: meter {entry['name']} ({entry['host']}): "
                          f"{failure.__class__.__name__}: {failure}") from failure
    wall, cpu = time.perf_counter() - wall, process_cpu() - cpu
    phase = Phase("sync gurux baseline", len(sample), 1, wall, cpu, fleet.cpu() - fleet_cpu)
    return phase, reads


# -- do both sides read the same thing? --------------------------------------------------------

def cross_check(reads: list[GuruxRead], engine: dict, window) -> str:
    """Compare every meter the baseline read with what cimhes returned for it.

    Profile rows and scaler/unit must be equal. Registers keep counting between the two reads,
    so each side's register value is checked against the simulator's closed-form model at the
    meter clock that side read (the register is read a moment after the clock: up to 10 s
    later is accepted).
    """
    from cimhes.fixtures.meter_model import register_raw

    start, end = window
    compared = 0
    for read in reads:
        mrid, serial = read.entry["mrid"], read.entry["name"]
        meter = engine[mrid]
        scalers = {}
        for obis, register in read.registers.items():
            scaler = round(math.log10(register.scaler))
            if int(register.unit) != 30:
                raise Aborted(f"{serial} {obis}: gurux read unit {register.unit}, not Wh (30)")
            scalers[obis] = scaler
        gurux_time = _aware(read.clock.time.value)
        for reading in meter.readings:
            obis = REGISTER_TYPES[reading.reading_type]
            _check_register(serial, obis, "cimhes", reading.value * 1000, reading.timestamp,
                            scalers[obis], register_raw)
            _check_register(serial, obis, "gurux", Decimal(str(read.registers[obis].value)),
                            gurux_time, scalers[obis], register_raw)
        rows = [(at, row) for row in read.profile.buffer
                if start < (at := _aware(row[0].value)) <= end]
        for block in meter.interval_blocks:
            column = PROFILE_TYPES[block.reading_type]
            scaler = scalers[PROFILE_REGISTER[column]]
            theirs = [(at, Decimal(row[column]).scaleb(scaler - 3)) for at, row in rows]
            ours = [(r.timestamp, r.value) for r in block.readings]
            if ours != theirs:
                first = next((a, b) for a, b in zip(ours + [None] * 97, theirs + [None] * 97)
                             if a != b)
                raise Aborted(f"{serial} {block.reading_type}: cimhes and gurux differ, first "
                              f"at {first}")
            compared += len(ours)
    return (f"cross-check: {len(reads)} meters read by both sides: {compared} interval values "
            f"and all scaler/units equal; {len(reads) * 4 * 2} register values match the "
            "simulator's model at each side's meter clock")


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _check_register(serial, obis, side, wh: Decimal, at: datetime, scaler, register_raw):
    low = register_raw(serial, obis, at) * 10 ** scaler
    high = register_raw(serial, obis, at + timedelta(seconds=10)) * 10 ** scaler
    if not low <= wh <= high:
        raise Aborted(f"{serial} {obis}: {side} read {wh} Wh at meter time {at.isoformat()}, the "
                      f"meter holds {low}..{high} Wh then")


# -- one run: fleet up, cimhes, baseline, fleet down -------------------------------------------

def window_now() -> tuple[datetime, datetime]:
    """24 hours ending at the last quarter-hour boundary before now."""
    now = datetime.now(UTC)
    end = now.replace(second=0, microsecond=0, minute=now.minute - now.minute % 15)
    if end == now:
        end -= INTERVAL
    return end - INTERVALS * INTERVAL, end


def spread(entries: list[dict], count: int) -> list[dict]:
    """`count` entries spread evenly over the list (all of them if count is 0 or too big)."""
    if count <= 0 or count >= len(entries):
        return list(entries)
    return [entries[i * len(entries) // count] for i in range(count)]


async def one_run(reactor, args, delay: float, workdir: Path) -> None:
    import json

    print(f"\n== simulator response delay {delay:g} s ==", flush=True)
    fleet = FleetProcess(args.meters, args.port, delay, workdir)
    try:
        fleet.wait_ready(120)
        inventory = json.loads(fleet.inventory_path.read_text())["meters"]
        if len(inventory) != args.meters:
            raise Aborted(f"the fleet's inventory lists {len(inventory)} meters")
        window = window_now()
        print(f"fleet: {shlex.join(fleet.command)}  (pid {fleet.process.pid})")
        print(f"window: {window[0].isoformat()} .. {window[1].isoformat()} "
              f"({INTERVALS} intervals); reading types: {len(REGISTER_TYPES)} registers + "
              f"{len(PROFILE_TYPES)} profile columns", flush=True)

        # First with nothing known of the meters (a head-end's first read of them), then again
        # with their scaler_units and capture objects remembered (every later read), each on a
        # fresh store.
        from cimhes.drivers.meter_configuration import CONFIGURATIONS
        CONFIGURATIONS.clear()
        cold, _ = await read_with_cimhes(
            reactor, inventory, window, args.concurrency, args.timeout,
            workdir / f"cimhes-{delay:g}-cold.sqlite", fleet, 0,
            "cimhes, first read", args.postgres)
        print(f"cimhes first read (configuration unknown) done in {cold.wall:.1f} s",
              flush=True)
        ours, engine = await read_with_cimhes(
            reactor, inventory, window, args.concurrency, args.timeout,
            workdir / f"cimhes-{delay:g}.sqlite", fleet, args.profile,
            "cimhes, config known", args.postgres)
        sample_size = args.sample_delayed if delay > 0 else args.sample
        sample = spread(inventory, sample_size)
        print(f"cimhes done in {ours.wall:.1f} s; baseline reads {len(sample)} meters "
              "sequentially ...", flush=True)
        theirs, reads = read_sample_with_gurux(sample, window, args.timeout, fleet)
        if window_now() != window:
            print("note: a quarter-hour boundary passed during the run; both sides used the "
                  "window above")
        check = cross_check(reads, engine, window)
    finally:
        fleet.stop()
    report([cold, ours], theirs, check)


def report(phases: list[Phase], theirs: Phase, check: str) -> None:
    print(f"{'':22}{'meters':>7}{'concurrency':>13}{'wall s':>9}{'reads/s':>9}"
          f"{'CPU s/read':>12}{'reads/CPU-s':>13}{'fleet CPU s/read':>18}")
    for phase in (*phases, theirs):
        print(f"{phase.name:22}{phase.meters:>7}{phase.concurrency:>13}{phase.wall:>9.2f}"
              f"{phase.reads_per_second:>9.1f}{phase.cpu_per_read:>12.4f}"
              f"{phase.reads_per_cpu_second:>13.0f}{phase.fleet_cpu / phase.meters:>18.4f}")
    for phase in phases:
        print(f"{phase.name} / baseline: throughput "
              f"{phase.reads_per_second / theirs.reads_per_second:.2f}x, reads per CPU-second "
              f"{phase.reads_per_cpu_second / theirs.reads_per_cpu_second:.2f}x "
              f"({phase.reads_per_cpu_second:.0f} against {theirs.reads_per_cpu_second:.0f})")
        for note in phase.notes:
            print(f"  {note}")
    ours = phases[-1]
    print(f"  fleet process CPU: {ours.fleet_cpu:.2f} s during cimhes "
          f"({100 * ours.fleet_cpu / ours.wall:.0f}% of one core), {theirs.fleet_cpu:.2f} s during "
          f"the baseline ({100 * theirs.fleet_cpu / theirs.wall:.0f}% of one core)")
    print(f"  {check}", flush=True)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return (f"machine: nproc {len(os.sched_getaffinity(0))} ({cpu}), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, gurux_dlms "
            f"{version('gurux_dlms')}, Twisted {version('twisted')}, SQLAlchemy "
            f"{version('sqlalchemy')}, SQLite {__import__('sqlite3').sqlite_version}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000, help="simulated meters (1000)")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="cimhes sessions at once (the product default, 200)")
    parser.add_argument("--delay", type=float, action="append",
                        help="simulator response delay in s; repeat for several runs "
                             "(default: 0 and 0.1)")
    parser.add_argument("--port", type=int, default=14059,
                        help="DLMS port of the simulated meters (14059, away from a demo's 4059)")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="per-exchange timeout of both clients, s (the engine default, 20)")
    parser.add_argument("--sample", type=int, default=0,
                        help="meters the baseline reads in an undelayed run (0: all)")
    parser.add_argument("--sample-delayed", type=int, default=50,
                        help="meters the baseline reads in a delayed run (50)")
    parser.add_argument("--gc", choices=["tuned", "default"], default="tuned",
                        help="garbage collector as cimhes serve runs it (tuned), or Python's "
                             "default thresholds")
    parser.add_argument("--store", default="sqlite", metavar="sqlite|URL",
                        help="the engine's store: a fresh SQLite file (sqlite, the default), or "
                             "a PostgreSQL server's URL (postgresql+psycopg://user@host:port/db, "
                             "db an existing database to connect to): each read gets a database "
                             "of its own there, made and dropped by the bench")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N costliest functions of the reactor thread (cProfile)")
    args = parser.parse_args(argv)
    args.delay = args.delay or [0.0, 0.1]
    if args.meters < 1 or args.concurrency < 1:
        parser.error("--meters and --concurrency must be at least 1")

    from twisted.internet import reactor

    from cimhes.engine.garbage_collection import tune_for_throughput
    from cimhes.fixtures.fleet import raise_file_limit

    args.postgres = None
    if args.store != "sqlite":
        if not args.store.startswith("postgresql"):
            parser.error("--store takes sqlite or a postgresql+psycopg:// URL")
        args.postgres = PostgresDatabases(args.store)
    limit = raise_file_limit(args.concurrency + 256)
    if args.gc == "tuned":
        tune_for_throughput()  # as cimhes serve and demo do before serving
    print(machine() + (f", PostgreSQL {args.postgres.server_version()} at "
                       f"{args.postgres.admin_url.render_as_string(hide_password=True)}"
                       if args.postgres else ""))
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"file descriptor limit: {limit}; engine timeout {args.timeout:g} s; garbage collector "
          f"{args.gc}; the fleet runs in a separate process on the same machine")
    exit_code = 1

    async def run_all() -> None:
        nonlocal exit_code
        try:
            with tempfile.TemporaryDirectory(prefix="cimhes-bench-") as workdir:
                for delay in args.delay:
                    await one_run(reactor, args, delay, Path(workdir))
        finally:
            if args.postgres is not None:
                args.postgres.drop_all()
        exit_code = 0

    def start() -> None:
        from twisted.internet.defer import Deferred

        def failed(failure):
            if failure.check(Aborted):
                print(f"\nread_fleet: aborted: {failure.value}", file=sys.stderr)
            else:
                print(failure.getTraceback(), file=sys.stderr)

        done = Deferred.fromCoroutine(run_all())
        done.addErrback(failed)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
