"""Benchmark: the floor under a full read: the head-end's own DLMS and conversion work, no sockets,
no reactor, no engine, no store.

The IDIS driver's conversation (clock, registers, scaler_units, capture objects, profile by
range with block transfer) and its conversion to a CIM MeterReading run against the simulator's
sans-IO meter session in the same thread: each request's bytes go straight to
`MeterSession.receive_data` and its answer straight back to `ClientSession.receive_data`. The
simulator's own CPU is timed apart and taken out, so the figure is what the head-end spends per
read beside Twisted (reactor, TCP, Deferred plumbing per exchange), the engine (jobs) and the
store. Compare with `bench/read_fleet.py` in the same run of the machine.

    python bench/read_floor.py [--reads 2000] [--known] [--security hls-gmac] [--profile N]

`--known`: with scaler_units and capture objects remembered (every read after the first).
`--security hls-gmac`: the meter and the session use HLS-GMAC with suite 0 (the head-end's
counters given to each session as a counter book would, no store). `--profile N`: the N
costliest functions of the head-end's side (cProfile, own time).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta, timezone

UTC = timezone.utc
NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=UTC)
REGISTERS = ["0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0",
             "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0", "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0"]
PROFILES = ["0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"]


class LoopbackConnection:
    """`DlmsConnection.request` without a socket: the meter answers at once, in this thread."""

    def __init__(self, session, meter):
        self.session = session
        self.meter = meter
        self.meter_cpu = 0.0
        self.exchanges = 0

    def _meter(self, data: bytes) -> bytes:
        started = time.thread_time()
        answer = self.meter.receive_data(data)
        while self.meter.next_event() is not None:
            pass
        self.meter_cpu += time.thread_time() - started
        return answer

    def request(self, data: bytes, what: str):
        from twisted.internet.defer import fail, succeed

        from cimhes.drivers.dlms_session import NextBlockRequest
        from cimhes.drivers.errors import DeviceError

        while True:
            self.exchanges += 1
            [event] = self.session.receive_data(self._meter(data))
            if isinstance(event, NextBlockRequest):
                data = event.data
                continue
            return fail(event) if isinstance(event, DeviceError) else succeed(event)


class Counters:
    """What the counter book would hand each session: a fresh block, and the meter's last."""

    def __init__(self):
        self.next = 1
        self.last_server = -1

    def settings(self, device, security):
        from cimhes.drivers.security import COUNTERS_PER_SESSION, CounterReservation, _hls_gmac
        reservation = CounterReservation(self.next, self.next + COUNTERS_PER_SESSION,
                                         self.last_server)
        self.next += COUNTERS_PER_SESSION
        return _hls_gmac(device, security, reservation)


def one_read(driver, device, identity, window, meter_security=None, counters=None,
             head_end=None):
    from twisted.internet.defer import Deferred

    from cimhes.drivers.dlms_session import ClientSession
    from cimhes.drivers.idis import _meter_read_result
    from cimhes.drivers.idis_association import Conversation
    from cimhes.fixtures.meter_session import MeterSession

    from cimhes.drivers.dlms_session import AuthenticationRequired

    meter = MeterSession(identity, clock=lambda: NOW, security=meter_security)
    hls = counters.settings(device, head_end) if counters is not None else None
    session = ClientSession(device.mrid, device.client_address, device.server_address,
                            device.security, device.password, hls)
    connection = LoopbackConnection(session, meter)
    plan = driver._plan(device, REGISTERS + PROFILES, with_profile=True)
    outcome = []

    async def read():
        if isinstance(await connection.request(session.associate(), "AARQ"),
                      AuthenticationRequired):
            await connection.request(session.authenticate(), "HLS pass 3")
        answers = await driver._converse(Conversation(connection, session), plan, *window)
        await connection.request(session.release(), "RLRQ")
        outcome.append(_meter_read_result(device, plan, answers))
        if counters is not None:
            counters.last_server = session.last_server_counter

    Deferred.fromCoroutine(read()).addErrback(lambda f: outcome.append(f))
    result = outcome[0]
    if not hasattr(result, "meter_reading") or result.errors:
        raise SystemExit(f"read_floor: the read failed: {result}")
    return result, connection


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--known", action="store_true",
                        help="scaler_units and capture objects remembered (warm reads)")
    parser.add_argument("--security", choices=["low", "hls-gmac"], default="low",
                        help="LLS (default) or HLS-GMAC with suite 0")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N costliest functions (own time, cProfile)")
    args = parser.parse_args(argv)

    from cimhes.drivers import DeviceAddress
    from cimhes.drivers.security import HeadEndSecurity
    from cimhes.fixtures.meter_cipher import MeterSecurity
    from cimhes.drivers.idis import IdisMeterDriver
    from cimhes.drivers.meter_configuration import ConfigurationCache
    from cimhes.engine.garbage_collection import tune_for_throughput
    from cimhes.fixtures.meter_model import meter_identity

    identity = meter_identity(1)
    if args.security == "low":
        device = DeviceAddress(identity.mrid, identity.serial, "idis-meter", identity.host,
                               identity.port, security="low", password=identity.password,
                               client_address=1)
        meter_security = counters = head_end = None
    else:
        meter_security = MeterSecurity.generate(1)
        device = DeviceAddress(
            identity.mrid, identity.serial, "idis-meter", identity.host, identity.port,
            security="hls-gmac", client_address=1,
            system_title=meter_security.system_title.hex(),
            encryption_key=meter_security.encryption_key.hex(),
            authentication_key=meter_security.authentication_key.hex())
        counters = Counters()
        head_end = HeadEndSecurity(bytes.fromhex("43494d4845530001"), None)
    extra = (meter_security, counters, head_end)
    window = (NOW - timedelta(hours=24, minutes=7, seconds=31), NOW - timedelta(minutes=7, seconds=31))
    cache = ConfigurationCache(max_age=0 if not args.known else 86400)
    driver = IdisMeterDriver(cache)
    result, connection = one_read(driver, device, identity, window, *extra)  # warm-up (and the cache)
    blocks = [len(b.readings) for b in result.meter_reading.interval_blocks]
    tune_for_throughput()
    best = None
    for _ in range(3):
        meter_cpu = exchanges = 0
        started = time.thread_time()
        for _ in range(args.reads):
            _, connection = one_read(driver, device, identity, window, *extra)
            meter_cpu += connection.meter_cpu
            exchanges += connection.exchanges
        spent = time.thread_time() - started - meter_cpu
        best = spent if best is None else min(best, spent)
    if args.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
        for _ in range(args.reads):
            one_read(driver, device, identity, window, *extra)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    print(f"command: {' '.join(sys.orig_argv)}")
    print(f"{args.reads} full reads (4 registers, 2 profile columns of {blocks} intervals, "
          f"{exchanges // args.reads} exchanges each, security {args.security}, configuration "
          f"{'remembered' if args.known else 'read each time'}), best of 3, the simulator's "
          "CPU taken out:")
    print(f"  head-end DLMS session + driver + conversion to CIM: {1e6 * best / args.reads:.0f} "
          f"us CPU per read ({args.reads / best:.0f} reads per CPU-second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
