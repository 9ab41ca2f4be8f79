"""Owed asynchronous replies held by one process at a time, and retried while running.

On SQLite and on a real PostgreSQL server: of several processes (here: stores and OwedReplies
of their own on one database) looking for the same owed reply, exactly one takes it and carries
it on; a live holder keeps it by renewing its lease; a dead one loses it once the lease has run
out. End to end, a ReplyAddress that refuses every post of a round gets the outcome in a later
round of the same process, without a restart."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from spyne import AnyXml, ServiceBase, rpc
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.cim.codec import decode_meter_readings_response, encode_meter_readings_response
from cimhes.cim.message import Header, Reply, ReplyResult, Verb
from cimhes.cim.meter_readings import MeterReadingsResponse
from cimhes.endpoints.owed_replies import OwedReplies, OwedReplySettings
from cimhes.endpoints.soap_resource import SoapResource, soap_application
from cimhes.engine import pending_replies
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures.fleet import start_fleet

from .credentials import zeep_client
from .head_ends import devices_of, serve_head_end

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
LEASE = timedelta(seconds=30)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


def _owed(store, owner="dead-process", at=T0, noun="MeterReadings"):
    return pending_replies.add(store, noun=noun, request_id=None,
                               reply_address="http://127.0.7.9/mdm/x", correlation_id="c-1",
                               request_xml="<x/>", progress={}, now=at, owner=owner, lease=LEASE)


def test_one_owner_at_a_time_and_a_dead_holder_loses_its_reply_when_the_lease_runs_out(
        database_url):
    stores = [Store(database_url) for _ in range(4)]
    try:
        reply_id = _owed(stores[0])
        # Held by a live lease: nobody takes it, whatever the noun asked.
        assert pending_replies.claim_due(stores[1], "p1", ["MeterReadings"], T0 + LEASE / 2,
                                         LEASE) == []
        # Its holder renewed it: still held past the first lease.
        assert pending_replies.renew(stores[0], "dead-process", T0 + LEASE / 2, LEASE) == 1
        assert pending_replies.claim_due(stores[1], "p1", ["MeterReadings"], T0 + LEASE,
                                         LEASE) == []
        # The holder is gone: past its lease, three processes look at once; one takes it.
        later = T0 + 2 * LEASE
        taken: dict[str, list] = {}
        barrier = threading.Barrier(3)

        def look(store, owner):
            barrier.wait()
            taken[owner] = pending_replies.claim_due(store, owner, ["MeterReadings"], later,
                                                     LEASE)

        threads = [threading.Thread(target=look, args=(stores[i], f"p{i}")) for i in (1, 2, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        winners = {owner: rows for owner, rows in taken.items() if rows}
        assert len(taken) == 3 and len(winners) == 1, taken
        ((winner, (row,)),) = winners.items()
        assert (row.id, row.runs, row.interrupted) == (reply_id, 2, 1)
        # Sent: nobody takes it again, even long after.
        pending_replies.mark_sent(stores[0], reply_id, later)
        assert pending_replies.claim_due(stores[1], "p1", ["MeterReadings"],
                                         later + 10 * LEASE, LEASE) == []
    finally:
        for store in stores:
            store.close()


def test_a_failed_round_is_released_and_retried_when_due_until_given_up(database_url):
    stores = [Store(database_url) for _ in range(2)]
    try:
        reply_id = _owed(stores[0], owner="p0")
        retry_at = T0 + timedelta(seconds=30)
        pending_replies.delivery_failed(stores[0], reply_id, "503 from the MDM", T0, retry_at,
                                        give_up=False)
        # Released, but not before its retry time; then any process takes it.
        assert pending_replies.claim_due(stores[1], "p1", ["MeterReadings"], T0, LEASE) == []
        (row,) = pending_replies.claim_due(stores[1], "p1", ["MeterReadings"], retry_at, LEASE)
        assert (row.runs, row.attempts, row.interrupted) == (2, 1, 0)
        pending_replies.delivery_failed(stores[1], reply_id, "503 again", retry_at,
                                        retry_at + timedelta(seconds=60), give_up=True)
        assert pending_replies.claim_due(stores[0], "p0", ["MeterReadings"],
                                         retry_at + timedelta(days=2), LEASE) == []
        assert pending_replies.round_of(stores[0], reply_id)[0] == 2
    finally:
        for store in stores:
            store.close()


def test_the_backoff_doubles_up_to_its_cap_and_settings_refuse_nonsense():
    settings = OwedReplySettings()
    assert [settings.backoff(n) for n in (1, 2, 3, 4, 5, 6, 10)] == [
        30, 60, 120, 240, 480, 600, 600]
    with pytest.raises(ValueError, match="lease"):
        OwedReplySettings(lease=0)
    with pytest.raises(ValueError, match="max_interrupted"):
        OwedReplySettings(max_interrupted=-1)


@pytest_twisted.inlineCallbacks
def test_of_two_live_processes_only_one_carries_on_a_reply_a_dead_one_left(database_url):
    """Two OwedReplies (two api processes' worth: stores, threads, owners of their own) sweep
    one database every 0.1 s; the reply a dead process left is carried on exactly once."""
    settings = OwedReplySettings(lease=1.0, sweep_interval=0.1)
    stores = [Store(database_url) for _ in range(2)]
    runners = [StoreRunner(reactor, store) for store in stores]
    carried = []
    processes = [OwedReplies(reactor, runner, settings) for runner in runners]
    for owed in processes:
        owed.register("MeterReadings",
                      lambda reply, owed=owed: carried.append((owed.owner, reply.id)) or True)
    try:
        reply_id = yield deferToThread(_owed, stores[0], "dead-process",
                                       datetime.now(timezone.utc) - timedelta(minutes=5))
        for owed in processes:
            owed.start()
        for _ in range(100):
            yield deferLater(reactor, 0.1, lambda: None)
            sent = yield deferToThread(
                lambda: pending_replies.unsent(stores[1], "MeterReadings"))
            if not sent:
                break
        yield deferLater(reactor, 0.5, lambda: None)  # more sweeps of both
        assert [r for _owner, r in carried] == [reply_id]
        assert carried[0][0] in {owed.owner for owed in processes}
    finally:
        for owed in processes:
            yield owed.stop()
        for runner, store in zip(runners, stores):
            runner.stop()
            store.close()


class RefusingMdm:
    """The MDM's ReplyMeterReadings, down (HTTP 503) for its first `refuse` posts."""

    def __init__(self, refuse: int):
        self.refuse = refuse
        self.posts = 0
        self.taken = []
        self.waiting = defer.Deferred()


@pytest.fixture
def refusing_mdm():
    mdm = RefusingMdm(refuse=3)  # one whole round of ReplySender's three attempts

    class ReplyMeterReadingsService(ServiceBase):
        @rpc(AnyXml, _body_style="bare", _in_message_name="MeterReadingsResponseMessage",
             _returns=AnyXml, _operation_name="ReplyMeterReadings")
        def ReplyMeterReadings(ctx, element):
            mdm.taken.append(element)
            if not mdm.waiting.called:
                mdm.waiting.callback(element)
            return encode_meter_readings_response(MeterReadingsResponse(
                header=Header(verb=Verb.REPLY, noun="MeterReadings"),
                reply=Reply(ReplyResult.OK)))

    service = SoapResource(soap_application(
        ReplyMeterReadingsService, tns="http://iec.ch/TC57/2011/GetMeterReadingsMessage",
        name="ReplyMeterReadings"), "ReplyMeterReadings.wsdl")

    class Door(Resource):
        isLeaf = True

        def render(self, request):
            mdm.posts += 1
            if request.method == b"POST" and mdm.posts <= mdm.refuse:
                request.setResponseCode(503)
                return b"down for maintenance"
            return service.render(request)

    root, folder = Resource(), Resource()
    root.putChild(b"mdm", folder)
    folder.putChild(b"ReplyMeterReadings", Door())
    port = reactor.listenTCP(0, Site(root), interface="127.0.7.2")
    mdm.base = f"http://127.0.7.2:{port.getHost().port}"
    yield mdm
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.inlineCallbacks
def test_a_reply_whose_whole_round_failed_is_delivered_in_a_later_round_without_a_restart(
        tmp_path, refusing_mdm):
    mdm = refusing_mdm
    fleet = start_fleet(reactor, 1, base_index=5335 + 80, port=0)
    head_end = serve_head_end(tmp_path, devices_of(fleet),
                              reply_addresses=(f"{mdm.base}/mdm/",),
                              owed_replies=OwedReplySettings(first_retry=0.5, sweep_interval=0.2))
    try:
        mrid = fleet.inventory()["meters"][0]["mrid"]
        client = yield deferToThread(zeep_client, f"{head_end.base_url}/cim/GetMeterReadings?wsdl")
        ack = yield deferToThread(
            client.service.GetMeterReadings,
            Header={"Verb": "get", "Noun": "MeterReadings", "AsyncReplyFlag": True,
                    "ReplyAddress": f"{mdm.base}/mdm/ReplyMeterReadings",
                    "CorrelationID": "corr-retried"},
            Request={"GetMeterReadings": {"EndDevice": [{"mRID": mrid}],
                                          "ReadingType": [{"mRID": PLUS_A}]}})
        assert [e.code for e in ack.Reply.Error] == ["0.3"]
        element = yield mdm.waiting.addTimeout(60, reactor)
        outcome = decode_meter_readings_response(element)
        assert outcome.header.correlation_id == "corr-retried"
        assert outcome.reply.result is ReplyResult.OK
        assert mdm.posts == 4 and len(mdm.taken) == 1  # three refused, then taken once
        for _ in range(40):
            rows = yield head_end.store_runner.call(
                pending_replies.unsent, head_end.store, "MeterReadings")
            if not rows:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        assert rows == []
        attempts, _ = yield head_end.store_runner.call(pending_replies.round_of, head_end.store,
                                                       1)
        assert attempts == 1  # one failed round, recorded
        yield deferLater(reactor, 1.5, lambda: None)
        assert len(mdm.taken) == 1
    finally:
        yield head_end.owed_replies.stop()
        yield head_end.port.stopListening()
        head_end.store_runner.stop()
        head_end.store.close()
        yield fleet.stop_all()
