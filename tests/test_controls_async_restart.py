"""An asynchronous ExecuteEndDeviceControls with a scheduled control, in real `cimhes serve`
processes: the head-end is killed (SIGKILL) after the acknowledgment, before the scheduled time,
and started again on the same database; the control runs at its time and the outcome reaches the
ReplyAddress once, with the request's CorrelationID. A third start posts nothing again."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
from datetime import datetime, timedelta, timezone

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from cimhes.cim.codec import end_device_controls as codec
from cimhes.cim.message import ReplyResult
from cimhes.drivers import DeviceAddress
from cimhes.fixtures.fleet import start_fleet, write_inventory

from .credentials import zeep_client
from .test_cli import CIMHES, _start, _stop
from .test_end_device_controls import DISCONNECT, _control, _output_state
from .test_end_device_controls import mdm  # noqa: F401 (the MDM's ReplyEndDeviceControls)

METER = 5335 + 60  # 127.0.22.61: the facade's loopback range
USER, PASSWORD = "switcher", "switcher-password-1"
AHEAD = timedelta(seconds=20)  # the control's time after the request: both starts fit before


def now() -> datetime:
    return datetime.now(timezone.utc)


def _rows(db, query):
    with sqlite3.connect(db) as connection:
        return connection.execute(query).fetchall()


def _killed(process) -> str:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    return process.stderr.read()


@pytest_twisted.ensureDeferred
async def test_an_async_reply_owed_for_a_scheduled_control_is_sent_once_after_a_restart(
        tmp_path, mdm):
    fleet = start_fleet(reactor, 1, clock=now, base_index=METER, port=0)
    processes = []
    try:
        inventory, db = tmp_path / "inventory.json", tmp_path / "cimhes.sqlite"
        write_inventory(inventory, fleet)
        meter = fleet.inventory()["meters"][0]
        await deferToThread(subprocess.run, [
            str(CIMHES), "user", "add", USER, "--role", "switch-operator", "--password-stdin",
            "--db", str(db)], input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        serve = ("serve", "--inventory", str(inventory), "--db", str(db), "--port", "0",
                 "--push-port", "0", "--reply-address", f"{mdm.base}/mdm/",
                 # The killed process's reply is taken over once its lease has run out.
                 "--reply-lease", "4")
        first, ready = await deferToThread(_start, *serve)
        processes.append(first)
        client = await deferToThread(zeep_client, ready["services"]["ExecuteEndDeviceControls"]
                                     + "?wsdl", name=USER, password=PASSWORD)
        due = now() + AHEAD
        ack = await deferToThread(
            client.service.CreateEndDeviceControls,
            Header={"Verb": "create", "Noun": "EndDeviceControls", "MessageID": "m-restart",
                    "CorrelationID": "corr-restart", "AsyncReplyFlag": True,
                    "ReplyAddress": f"{mdm.base}/mdm/ReplyEndDeviceControls"},
            Payload={"EndDeviceControls": _control(DISCONNECT, [meter["mrid"]],
                                                   primaryDeviceTiming={"interval": {"start": due}})})
        assert ack.Reply.Result == "OK"
        assert [e.code for e in ack.Reply.Error] == ["0.3", "0.3"]  # accepted; scheduled
        (made,) = ack.Payload.EndDeviceControls.EndDeviceControl

        # Killed before the control's time: nothing ran, nothing was posted.
        await deferToThread(_killed, first)
        assert _rows(db, "SELECT sent_at FROM pending_reply") == [(None,)]
        assert mdm.received == []
        assert await _output_state(DeviceAddress.from_inventory(meter)) is True

        second, _ = await deferToThread(_start, *serve)
        processes.append(second)
        assert now() < due, "the second process started after the control's time"
        for _ in range(int((AHEAD.total_seconds() + 60) / 0.5)):
            if mdm.received:
                break
            await deferLater(reactor, 0.5, lambda: None)
        assert len(mdm.received) == 1, "no outcome reached the ReplyAddress"
        outcome = codec.decode_response(mdm.received[0])
        assert outcome.header.correlation_id == "corr-restart"
        assert outcome.reply.result is ReplyResult.OK, outcome.reply
        assert [(c.mrid, [d.mrid for d in c.end_devices]) for c in outcome.controls] == [
            (made.mRID, [meter["mrid"]])]
        assert now() >= due  # it ran at its time, not before
        assert await _output_state(DeviceAddress.from_inventory(meter)) is False  # disconnected
        for _ in range(40):  # marked sent just after the MDM's answer
            if _rows(db, "SELECT sent_at FROM pending_reply") != [(None,)]:
                break
            await deferLater(reactor, 0.25, lambda: None)
        assert _rows(db, "SELECT sent_at IS NOT NULL FROM pending_reply") == [(1,)]
        # The request's log row was answered, never taken for an interrupted one.
        assert _rows(db, "SELECT message_id, result FROM request") == [("m-restart", "OK")]
        await deferToThread(_stop, second)
        log = second.stderr.read()
        assert "carrying on the asynchronous reply corr-restart" in log
        assert "were in flight when the previous process stopped" not in log

        # A third start owes nothing: the MDM gets the outcome once.
        third, _ = await deferToThread(_start, *serve)
        processes.append(third)
        await deferLater(reactor, 1.0, lambda: None)
        await deferToThread(_stop, third)
        assert "carrying on the asynchronous reply" not in third.stderr.read()
        assert len(mdm.received) == 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        await fleet.stop_all()
