"""Sessions are started at most STARTS_PER_TURN in one reactor turn; the others go on in the
next turns, none forgotten, so a claim of hundreds of jobs never makes one long turn."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from cimhes.drivers import DeviceAddress
from cimhes.engine.dispatch import STARTS_PER_TURN, Dispatcher
from cimhes.engine.jobs import Job, Priority
from cimhes.engine.limits import EngineSettings
from cimhes.engine.store import Store, StoreRunner

KIND = "held-session"  # a session runner of the test's own: sessions that wait until released


@pytest.fixture
def dispatcher(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    runner = StoreRunner(reactor, store)
    dispatcher = Dispatcher(reactor, runner, EngineSettings(min_device_gap=0),
                            max_sessions=1000)
    dispatcher._stopped = False  # dispatching, without claiming from the store
    yield dispatcher
    dispatcher.stop()
    runner.stop()
    store.close()


def _job(job_id: int) -> Job:
    address = DeviceAddress(mrid=f"m{job_id}", name=f"M{job_id}", device_type="idis-meter",
                            host="127.0.6.1")
    return Job(job_id, "large", KIND, Priority.ON_DEMAND, address, None, (), None, None, 0, 1,
               0, None)


@pytest_twisted.inlineCallbacks
def test_a_hundred_startable_jobs_start_over_several_turns(dispatcher):
    started: list[list[Job]] = []
    dispatcher.session_runners[KIND] = lambda batch: started.append(batch) or Deferred()
    count = 3 * STARTS_PER_TURN + 5
    for job_id in range(1, count + 1):
        dispatcher._queue.push(_job(job_id))
    dispatcher._dispatch()  # as a claim's result does
    assert len(started) == STARTS_PER_TURN  # this turn's share; the rest is not dropped
    for _ in range(10):
        yield deferLater(reactor, 0, lambda: None)
        if len(started) == count:
            break
    assert sorted(batch[0].id for batch in started) == list(range(1, count + 1))
