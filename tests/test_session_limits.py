"""The limits an operator sets on meter sessions: their defaults and checks, the pacing of new
connections, the file-descriptor check at start, and 200 sessions at once on real sockets."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError

from cimhes.cim.message import ErrorCode, Header, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.drivers import DeviceAddress
from cimhes.drivers.limits import ConnectionPacer, SessionLimits, raise_descriptor_limit
from cimhes.endpoints.session_options import ensure_descriptors
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import Fault, parse_faults, start_fleet

NOW = datetime(2026, 11, 20, 12, 7, 31, tzinfo=timezone.utc)
REGISTER = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


def test_defaults_are_the_documented_ones():
    limits = SessionLimits()
    assert (limits.connect_timeout, limits.response_timeout, limits.session_deadline,
            limits.max_answer_bytes, limits.max_answer_blocks) == (10.0, 20.0, 60.0,
                                                                   4 * 1024 * 1024, 10_000)


@pytest.mark.parametrize("field", ["connect_timeout", "response_timeout", "session_deadline",
                                   "max_answer_bytes", "max_answer_blocks"])
def test_a_limit_that_is_not_positive_is_refused(field):
    with pytest.raises(ValueError, match=field):
        SessionLimits(**{field: 0})


def test_a_number_is_the_short_form_of_the_timeouts():
    assert SessionLimits.of(5.0) == SessionLimits(connect_timeout=5.0, response_timeout=5.0)
    assert SessionLimits.of(30.0).session_deadline == 90.0


def test_connections_are_spaced_by_the_rate():
    clock = task.Clock()
    pacer = ConnectionPacer(clock, rate=10)
    fired = []
    for n in range(4):
        pacer.slot().addCallback(lambda _, n=n: fired.append((n, clock.seconds())))
    assert fired == [(0, 0)]
    clock.advance(0.1)
    clock.advance(0.1)
    clock.advance(0.1)
    assert fired == [(0, 0), (1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert clock.getDelayedCalls() == []


def test_a_cancelled_slot_leaves_no_timer():
    clock = task.Clock()
    pacer = ConnectionPacer(clock, rate=2)
    pacer.slot()
    waiting = pacer.slot()
    assert len(clock.getDelayedCalls()) == 1
    waiting.cancel()
    assert clock.getDelayedCalls() == []
    waiting.addErrback(lambda failure: failure.trap(CancelledError))


class TurnByTurn:
    """A reactor clock that runs timed calls as Twisted's reactor does, one turn at a time:
    `turn()` runs the calls due when it starts, and a call scheduled meanwhile (even
    callLater(0)) waits for the next turn."""

    def __init__(self):
        self.now = 0.0
        self._calls = []  # [time, function, args, cancelled]

    def seconds(self):
        return self.now

    def callLater(self, delay, function, *args):
        call = _Call(self.now + delay, function, args)
        self._calls.append(call)
        return call

    def turn(self) -> None:
        due = sorted((c for c in self._calls if c.time <= self.now and c.active()),
                     key=lambda c: c.time)
        for call in due:
            self._calls.remove(call)
            if call.active():
                call.called = True
                call.function(*call.args)
        self._calls = [c for c in self._calls if c.active()]

    @property
    def pending(self):
        return [c for c in self._calls if c.active()]


class _Call:
    def __init__(self, time, function, args):
        self.time, self.function, self.args = time, function, args
        self.called = self.cancelled = False

    def active(self):
        return not (self.called or self.cancelled)

    def cancel(self):
        self.cancelled = True

    def getTime(self):
        return self.time


def test_a_long_turn_does_not_release_every_slot_that_fell_due_at_once():
    # 1,000 a second: after a 50 ms turn, 49 slots are due; each turn begins at most 8.
    reactor = TurnByTurn()
    pacer = ConnectionPacer(reactor, rate=1000, per_turn=8)
    fired = []
    for n in range(50):
        pacer.slot().addCallback(lambda _, n=n: fired.append(n))
    assert fired == [0]
    reactor.now = 0.050
    per_turn = []
    while reactor.pending:
        before = len(fired)
        reactor.turn()
        per_turn.append(len(fired) - before)
    assert per_turn == [8, 8, 8, 8, 8, 8, 1]
    assert fired == list(range(50))  # in the order asked


def test_slots_still_keep_the_rate_when_turns_are_short():
    reactor = TurnByTurn()
    pacer = ConnectionPacer(reactor, rate=100, per_turn=8)
    fired = []
    for n in range(5):
        pacer.slot().addCallback(lambda _, n=n: fired.append((n, reactor.now)))
    for step in range(1, 5):
        reactor.now = step * 0.01 - 0.001
        reactor.turn()
        assert len(fired) == step  # not yet the next one
        reactor.now = step * 0.01
        reactor.turn()
    assert [n for n, _ in fired] == [0, 1, 2, 3, 4]
    assert [at for _, at in fired] == pytest.approx([0, 0.01, 0.02, 0.03, 0.04])
    assert reactor.pending == []


def test_a_cancelled_waiting_slot_is_not_released_and_others_keep_their_turn():
    reactor = TurnByTurn()
    pacer = ConnectionPacer(reactor, rate=1000, per_turn=2)
    fired = []
    slots = [pacer.slot() for _ in range(5)]
    for n, slot in enumerate(slots):
        slot.addCallback(lambda _, n=n: fired.append(n))
    slots[1].addErrback(lambda failure: failure.trap(CancelledError))
    slots[1].cancel()
    reactor.now = 1.0
    reactor.turn()
    assert fired == [0, 2, 3]
    reactor.turn()
    assert fired == [0, 2, 3, 4] and reactor.pending == []


def test_connections_per_turn_must_be_positive():
    with pytest.raises(ValueError, match="per turn"):
        ConnectionPacer(task.Clock(), rate=10, per_turn=0)


def test_rate_zero_does_not_pace():
    clock = task.Clock()
    pacer = ConnectionPacer(clock, rate=0)
    assert all(pacer.slot().called for _ in range(100))


def test_the_descriptor_limit_is_raised_to_the_hard_limit():
    limit = raise_descriptor_limit(10)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limit.soft == soft and (hard == resource.RLIM_INFINITY or soft == hard)
    assert limit.sufficient and limit.needed == 10 + 256


def test_sessions_beyond_the_descriptors_are_refused_at_start_saying_why():
    with pytest.raises(OSError, match=r"the session bound needs 1000000256.*--sessions"):
        ensure_descriptors(10 ** 9, 256)


def test_serve_refuses_to_start_with_more_sessions_than_descriptors(tmp_path):
    inventory = tmp_path / "inventory.json"
    inventory.write_text('{"meters": []}')
    done = subprocess.run(
        [sys.executable, "-m", "cimhes.endpoints.cli", "serve", "--push-port", "0",
         "--inventory", str(inventory),
         "--port", "0", "--db", str(tmp_path / "x.sqlite"), "--sessions", str(10 ** 9)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "file descriptors" in done.stderr and "--sessions" in done.stderr
    assert "Traceback" not in done.stderr


def test_fault_options_name_meters_and_kinds():
    assert parse_faults(["silent:1-3,7", "slow=8:4"]) == {
        1: Fault("silent"), 2: Fault("silent"), 3: Fault("silent"), 7: Fault("silent"),
        4: Fault("slow", 8.0)}
    with pytest.raises(ValueError, match="not one of"):
        parse_faults(["loud:1"])
    with pytest.raises(ValueError, match="two faults"):
        parse_faults(["silent:1-2", "garbage:2"])
    with pytest.raises(ValueError, match="lateness"):
        parse_faults(["slow:1"])


@pytest_twisted.ensureDeferred
async def test_two_hundred_sessions_at_once_all_answer_and_all_close(tmp_path):
    fleet = start_fleet(reactor, 200, clock=lambda: NOW, base_index=1001, port=0,
                        response_delay=0.2)
    store = Store(f"sqlite:///{tmp_path / 'many.sqlite'}")
    runner = StoreRunner(reactor, store)
    try:
        devices = [DeviceAddress(**entry) for entry in fleet.inventory()["meters"]]
        store.load_inventory(devices)
        service = MeterReadingService(reactor, runner, concurrency=200,
                                      limits=SessionLimits.of(10.0))
        most = [0]
        sampler = task.LoopingCall(lambda: most.__setitem__(
            0, max(most[0], fleet.open_connections())))
        sampler.start(0.05)
        try:
            outcome = await service.read(GetMeterReadings(
                header=Header(verb="get", noun="MeterReadings"),
                end_devices=[DeviceRef(mrid=d.mrid) for d in devices], usage_points=[],
                reading_types=[REGISTER]))
        finally:
            sampler.stop()
        assert outcome.result is ReplyResult.OK, outcome.errors[:3]
        assert len(outcome.meter_readings) == 200
        assert most[0] > 100  # they really were open together
        assert fleet.open_connections() == 0 or await _settled(fleet)
    finally:
        await fleet.stop_all()
        runner.stop()
        store.close()


async def _settled(fleet) -> bool:
    await task.deferLater(reactor, 0.2, lambda: None)
    return fleet.open_connections() == 0



# Run in a process of its own: in a shared test process another test's socket closing late
# would free a descriptor below the limit and let one connect through.
_NO_DESCRIPTOR_LEFT = r"""
import json, os, resource, sys
from datetime import datetime, timezone
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from cimhes.cim.message import Header
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings
from cimhes.drivers import DeviceAddress
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import start_fleet

async def main():
    fleet = start_fleet(reactor, 3, port=0, base_index=1201)
    store = Store("sqlite:///" + sys.argv[1])
    runner = StoreRunner(reactor, store)
    devices = [DeviceAddress(**entry) for entry in fleet.inventory()["meters"]]
    store.load_inventory(devices)
    service = MeterReadingService(reactor, runner, limits=SessionLimits.of(2.0))
    request = GetMeterReadings(
        header=Header(verb="get", noun="MeterReadings"),
        end_devices=[DeviceRef(mrid=d.mrid) for d in devices], usage_points=[],
        reading_types=["0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"])
    first = await service.read(request)  # warms the store up
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))
    holes = []
    try:
        while True:  # fill the gaps below the limit: not one descriptor more may be opened
            holes.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    outcome = await service.read(request)
    for fd in holes:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(json.dumps({"first": first.result.value, "result": outcome.result.value,
                      "mrids": [d.mrid for d in devices],
                      "errors": [[e.code.value if hasattr(e.code, "value") else e.code, e.id,
                                  e.reason] for e in outcome.errors]}))
    runner.stop()
    await fleet.stop_all()

def run():
    done = ensureDeferred(main())
    done.addErrback(lambda failure: print(failure.getTraceback(), file=sys.stderr))
    done.addBoth(lambda _: reactor.stop())

reactor.callWhenRunning(run)
reactor.run()
"""


def test_no_descriptor_left_is_the_head_ends_error_not_the_meters(tmp_path):
    done = subprocess.run([sys.executable, "-c", _NO_DESCRIPTOR_LEFT, str(tmp_path / "f.sqlite")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["first"] == "OK"
    assert report["result"] == "FAILED"
    assert [error[1] for error in report["errors"]] == report["mrids"]
    for code, _, reason in report["errors"]:
        # The head-end's own fault, never the meter's: 5.1 head-end-exhausted when the session
        # saw it, 5.3 internal when the store's side ran out first (timing decides which).
        assert code in (ErrorCode.HIGH_LOAD.value, ErrorCode.INTERNAL_ERROR.value)
        assert "HeadEndExhausted" in reason and "no file descriptor left" in reason
