"""A burst of SOAP calls at the HTTP door: its CPU work runs in bounded reactor slices (a WSDL
fetch is answered while the burst is still being handled), and what each call costs the store is
shared: concurrent logins of one user read its row once, audit entries and request-log rows
recorded together are written in one transaction (group commit), and one bad row of a batch
fails only its own call."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
import pytest_twisted
import sqlalchemy
from lxml import etree
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import reactor
from io import BytesIO

from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from cimhes.endpoints.http_door import LimitedSite
from cimhes.endpoints.reactor_slices import ReactorSlices
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.engine import request_log
from cimhes.engine.sealed import SecretBox
from cimhes.engine.store import RequestRecord, Store, StoreRunner
from cimhes.engine.users import AuditTrail, AuthenticationFailed, Authenticator, Role, UserStore

NS = "urn:cimhes:test:bursts"


# -- the slices themselves, on a clock the test turns


class _Turns:
    """A reactor whose turns the test makes: callLater(0, f) waits for the next `turn()`."""

    def __init__(self):
        self._due = []

    def callLater(self, delay, function, *args):
        self._due.append((function, args))
        return object()  # the DelayedCall a reactor would return

    def turn(self) -> None:
        due, self._due = self._due, []
        for function, args in due:
            function(*args)


class _StepClock:
    """A perf_counter each step advances by `step` seconds (the step's CPU, as the slices see it)."""

    def __init__(self, step: float):
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        return self.now


def test_slices_run_fifo_within_the_budget_and_at_least_one_step_a_turn():
    clock = _Turns()
    cpu = _StepClock(0.0015)
    slices = ReactorSlices(clock, budget=0.004, clock=cpu)
    ran = []

    def step(n):
        cpu.now += cpu.step
        ran.append(n)
        return n * 10

    results = [slices.submit(step, n) for n in range(10)]
    assert ran == [] and slices.waiting == 10  # nothing runs where it was submitted
    turns = []
    while slices.waiting:
        clock.turn()
        turns.append(list(ran))
    # 1.5 ms a step, 4 ms a turn: three steps a turn, in submission order.
    assert [len(t) for t in turns] == [3, 6, 9, 10]
    assert ran == list(range(10))
    assert [r.result for r in results] == [n * 10 for n in range(10)]

    big = ReactorSlices(clock, budget=0.004, clock=_StepClock(1.0))
    slow = big.submit(lambda: "done")
    clock.turn()
    assert slow.result == "done"  # a step longer than the budget still runs, alone


def test_a_step_that_submits_the_next_one_does_not_add_a_turn():
    clock = _Turns()
    cpu = _StepClock(0.003)
    slices = ReactorSlices(clock, budget=0.004, clock=cpu)
    ran = []

    def step(n, then):
        cpu.now += cpu.step
        ran.append(n)
        if then:
            slices.submit(step, n + 100, False)  # a request's next step, queued at the back

    for n in range(4):
        slices.submit(step, n, True)
    per_turn = []
    while slices.waiting:
        before = len(ran)
        clock.turn()
        per_turn.append(len(ran) - before)
    # 3 ms a step, 4 ms a turn: two steps a turn, never more, FIFO.
    assert per_turn == [2, 2, 2, 2]
    assert ran == [0, 1, 2, 3, 100, 101, 102, 103]


def test_a_failing_step_fails_its_own_deferred_only():
    clock = _Turns()
    slices = ReactorSlices(clock)
    bad = slices.submit(lambda: 1 / 0)
    good = slices.submit(lambda: "fine")
    clock.turn()
    assert good.result == "fine"
    failure = []
    bad.addErrback(failure.append)
    assert failure and failure[0].check(ZeroDivisionError)


# -- a real site: a burst of POSTs and a WSDL fetch during it

BURST = 40


def _busy(seconds: float) -> None:
    """CPU work a door does for a call (decode, validate), made to last `seconds`."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def _burst_service():
    class Burst(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="Ping", _returns=AnyXml,
             _operation_name="Ping")
        def Ping(ctx, element):
            _busy(0.003)
            answer = etree.Element(f"{{{NS}}}Pong")
            answer.text = element.text
            return answer

    return soap_application(Burst, tns=NS, name="Burst")


class _Counting(SoapResource):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received = 0
        self.answered = 0
        self.when_all_received = None

    def render_POST(self, request):
        result = super().render_POST(request)
        self.received += 1
        if self.received == BURST and self.when_all_received is not None:
            self.when_all_received()
        return result

    def _answer(self, element, request, p_ctx):
        self.answered += 1
        return super()._answer(element, request, p_ctx)


def _envelope(n: int) -> bytes:
    return (f'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
            f'<t:Ping xmlns:t="{NS}">{n}</t:Ping></s:Body></s:Envelope>').encode()


class _WsdlGetter(Protocol):
    """A connection opened before the burst, on which the GET is written once it has arrived."""

    def __init__(self, resource, path: bytes):
        self._resource = resource
        self._path = path
        self.connected_d = Deferred()
        self.answered_d = Deferred()
        self.data = b""

    def connectionMade(self):
        self.connected_d.callback(self)

    def get(self):
        self.transport.write(b"GET " + self._path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Connection: close\r\n\r\n")

    def dataReceived(self, data):
        if not self.data:
            self.posts_answered_at_first_byte = self._resource.answered
        self.data += data

    def connectionLost(self, reason):
        self.answered_d.callback(self.data)


@pytest_twisted.inlineCallbacks
def test_a_wsdl_fetch_is_answered_while_a_burst_of_posts_is_still_being_handled():
    resource = _Counting(_burst_service(), "GetMeterReadings.wsdl")
    cim = Resource()
    cim.putChild(b"Burst", resource)
    root = Resource()
    root.putChild(b"cim", cim)
    port = reactor.listenTCP(0, LimitedSite(root), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/cim/Burst"
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)
    getter = _WsdlGetter(resource, b"/cim/Burst?wsdl")
    factory = ClientFactory.forProtocol(lambda: getter)
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    try:
        yield getter.connected_d
        resource.when_all_received = getter.get

        def post(n):
            d = agent.request(b"POST", url.encode(),
                              Headers({b"content-type": [b"text/xml; charset=utf-8"]}),
                              FileBodyProducer(BytesIO(_envelope(n))))
            return d.addCallback(lambda response: readBody(response).addCallback(
                lambda body: (response.code, body)))

        answers = yield gatherResults([post(n) for n in range(BURST)])
        wsdl = yield getter.answered_d
        # Every call answered, each with its own value...
        assert [code for code, _ in answers] == [200] * BURST
        assert all(f">{n}</".encode() in body for n, (_, body) in enumerate(answers))
        # ... and the WSDL, asked for once all 40 POSTs had arrived (3 ms of CPU each), came
        # back before the burst was through: it did not wait for the whole burst.
        assert wsdl.startswith(b"HTTP/1.1 200") and b"definitions" in wsdl
        assert getter.posts_answered_at_first_byte < BURST // 2
    finally:
        yield pool.closeCachedConnections()
        yield port.stopListening()


# -- the store's side of a burst


@pytest.fixture
def store(tmp_path):
    box = SecretBox.from_file(str(tmp_path / "secret.key"))
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}", box)
    store.box = box
    runner = StoreRunner(reactor, store)
    yield store, runner
    runner.stop()
    store.close()


def _commits(store) -> list:
    commits = []
    sqlalchemy.event.listen(store.engine, "commit", lambda connection: commits.append(1))
    return commits


def _blocked(runner):
    """Hold the store thread until the returned callable is called: what is queued meanwhile
    queues together, as it does behind a busy store."""
    import threading
    gate = threading.Event()
    runner.call(gate.wait, 10)
    return gate.set


def _arrival(n: int) -> dict:
    return dict(message_id=f"m-{n}", correlation_id=None, noun="MeterReadings", verb="get",
                source=None, received_at=datetime(2026, 12, 3, tzinfo=timezone.utc),
                devices_asked=1)


@pytest_twisted.inlineCallbacks
def test_request_log_rows_queued_together_are_one_transaction(store):
    store, runner = store
    commits = _commits(store)
    release = _blocked(runner)
    arrivals = [runner.call(request_log.arrived, store, **_arrival(n)) for n in range(30)]
    release()
    ids = yield gatherResults(arrivals)
    assert len(set(ids)) == 30 and len(commits) == 1
    release = _blocked(runner)
    answers = [runner.call(request_log.answered, store, request_id, replied_at=datetime(
        2026, 12, 3, 0, 0, 1, tzinfo=timezone.utc), result="OK", devices_asked=1,
        devices_failed=n % 2) for n, request_id in enumerate(ids)]
    release()
    yield gatherResults(answers)
    assert len(commits) == 2
    with store.engine.connect() as connection:
        rows = connection.execute(sqlalchemy.select(
            RequestRecord.id, RequestRecord.message_id, RequestRecord.result,
            RequestRecord.devices_failed).order_by(RequestRecord.id)).all()
    assert [(r.id, r.message_id, r.result, r.devices_failed) for r in rows] == [
        (request_id, f"m-{n}", "OK", n % 2) for n, request_id in enumerate(ids)]


@pytest_twisted.inlineCallbacks
def test_one_bad_row_in_a_batch_fails_only_its_own_call(store):
    store, runner = store
    release = _blocked(runner)
    good = runner.call(request_log.arrived, store, **_arrival(1))
    bad = runner.call(request_log.arrived, store, **_arrival(2), no_such_column=1)
    also_good = runner.call(request_log.arrived, store, **_arrival(3))
    release()
    results = yield DeferredList([good, bad, also_good], consumeErrors=True)
    assert [ok for ok, _ in results] == [True, False, True]
    assert results[1][1].check(TypeError)
    with store.engine.connect() as connection:
        assert connection.execute(sqlalchemy.select(RequestRecord.message_id).order_by(
            RequestRecord.id)).scalars().all() == ["m-1", "m-3"]


@pytest_twisted.inlineCallbacks
def test_audit_entries_recorded_in_a_burst_are_written_together_and_in_order(store):
    store, runner = store
    users = UserStore(store, store.box)
    audit_before = len(users.audit_entries())
    commits = _commits(store)
    audit = AuditTrail(runner, users)
    written = [audit.record("authenticate", "success", actor=f"user-{n}", source="127.0.0.1")
               for n in range(50)]
    yield gatherResults(written)
    assert len(commits) <= 3  # the first alone, the rest behind it (50 would be one each)
    assert [e.actor for e in users.audit_entries()[audit_before:]] == [
        f"user-{n}" for n in range(50)]


class _CountingUsers(UserStore):
    reads = 0

    def credentials(self, name):
        type(self).reads += 1
        return super().credentials(name)


@pytest_twisted.inlineCallbacks
def test_concurrent_logins_of_one_user_share_one_read_and_one_verification(store):
    store, runner = store
    users = _CountingUsers(store, store.box)
    users.add_user("burst", "burst-password-1", [Role.READINGS_READER], actor="test")
    authenticator = Authenticator(runner, users)
    _CountingUsers.reads = 0
    logins = [authenticator.password("burst", "burst-password-1") for _ in range(20)]
    wrong = authenticator.password("burst", "not-the-password")
    principals = yield gatherResults(logins)
    assert {p.name for p in principals} == {"burst"}
    assert _CountingUsers.reads == 1
    failure = yield wrong.addCallbacks(lambda _: None, lambda f: f.value)
    assert isinstance(failure, AuthenticationFailed) and "wrong password" in str(failure)
    # A read is never reused once done: the next login reads the row again, so a user disabled
    # meanwhile is refused at once.
    users.set_disabled("burst", True, actor="test")
    refused = yield authenticator.password("burst", "burst-password-1").addCallbacks(
        lambda _: None, lambda f: f.value)
    assert isinstance(refused, AuthenticationFailed) and "disabled" in str(refused)
    assert _CountingUsers.reads == 2
