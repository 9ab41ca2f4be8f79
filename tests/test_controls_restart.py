"""A head-end process killed (SIGKILL) while a control is on its way: the next process does not
send it again.

Real processes: the engine runs a clock-sync in a child process against a simulated meter in
this one; the meter carries the SET out but its answer is lost (fault lose-control-answers), so
the child waits for it; once the meter's log shows the clock set, the child is killed. The
engine started again on the same database resumes the job: it reads the clock first, finds it
already within tolerance and sends nothing (the meter's log keeps one clock adjustment).
"""
from __future__ import annotations

import select as io_select
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest_twisted
from sqlalchemy import select
from sqlalchemy.orm import Session
from twisted.internet import reactor, task

from cimhes.drivers import DeviceAddress
from cimhes.drivers.controls import ControlStatus
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.controls import ControlJobRecord, ControlService
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.limits import EngineSettings
from cimhes.engine.store import Store, StoreRunner
from cimhes.engine.users import SecretBox
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import Fault, start_fleet

METER = 4907  # 127.0.20.81: this file's part of the controls' loopback range
CHILD = """
import sys
from datetime import datetime, timezone
from twisted.internet import reactor
from cimhes.drivers.controls import ControlCommand, ControlKind
from cimhes.drivers.limits import SessionLimits
from cimhes.engine.controls import ControlService
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.store import Store, StoreRunner
from cimhes.engine.users import SecretBox

runner = StoreRunner(reactor, Store(sys.argv[1], SecretBox.from_file(sys.argv[3])))
dispatcher = Dispatcher(reactor, runner, session_limits=SessionLimits.of(120.0),
                        connections_per_second=0)
service = ControlService(reactor, runner, dispatcher)
dispatcher.start()

def control():
    scheduled = service.schedule([sys.argv[2]], ControlCommand(ControlKind.CLOCK_SYNC), user="op",
                                 correlation_id=None, at=datetime.now(timezone.utc))
    scheduled.addCallback(lambda batch: print(batch, flush=True))
    scheduled.addErrback(lambda failure: print(failure.getTraceback(), flush=True))

reactor.callWhenRunning(control)
reactor.run()
"""


def now():
    return datetime.now(timezone.utc)


@pytest_twisted.ensureDeferred
async def test_a_control_killed_on_its_way_is_not_sent_again_by_the_next_process(tmp_path):
    fleet = start_fleet(reactor, 1, clock=now, port=0, base_index=METER,
                        faults={METER: Fault("lose-control-answers")})
    state = fleet.state(METER)
    state.clock_offset = timedelta(seconds=-90)
    url = f"sqlite:///{tmp_path / 'controls.sqlite'}"
    key = str(tmp_path / "secret.key")  # both processes open the sealed passwords with it
    store = Store(url, SecretBox.from_file(key))
    store.load_inventory([DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    mrid = meter_model.meter_identity(METER).mrid
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, mrid, key], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    runner = None
    try:
        printed, _, _ = io_select.select([child.stdout], [], [], 60)
        assert printed, "the child engine printed no batch id within 60 s"
        batch_id = child.stdout.readline().strip()
        assert batch_id.startswith("control:"), batch_id
        for _ in range(300):  # the meter sets its clock; its answer never leaves
            if meter_model.STANDARD_LOG in state.recorded:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert [code for _, code in state.recorded[meter_model.STANDARD_LOG]] == [4, 5]
        child.send_signal(signal.SIGKILL)
        child.wait(10)

        runner = StoreRunner(reactor, store)
        dispatcher = Dispatcher(reactor, runner, EngineSettings(poll_interval=0.2),
                                session_limits=SessionLimits.of(5.0), connections_per_second=0)
        service = ControlService(reactor, runner, dispatcher)
        await dispatcher.start(requeue=True, poll=True)
        try:
            for _ in range(200):
                [(_, outcome)] = await service.batch(batch_id)
                if outcome is not None:
                    break
                await task.deferLater(reactor, 0.1, lambda: None)
        finally:
            dispatcher.stop()
        assert outcome.status is ControlStatus.DONE, outcome
        assert outcome.read_back["already"] is True and abs(outcome.read_back["deviation_s"]) < 2
        # One clock adjustment: the resumed job did not set the clock a second time.
        assert [code for _, code in state.recorded[meter_model.STANDARD_LOG]] == [4, 5]
        with Session(store.engine) as session:
            assert session.scalars(select(ControlJobRecord.attempts_started)).one() == 2
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if runner is not None:
            runner.stop()
        store.close()
        await fleet.stop_all()
