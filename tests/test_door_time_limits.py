"""The synchronous time limit (4.1 "timed out") of the GetEndDeviceEvents and
ExecuteEndDeviceControls doors, which share `within_limit` (endpoints/arrival.py) with the
GetMeterReadings door (tests/test_cim_errors_soap.py): past the limit the caller gets Reply
FAILED 4.1 while the work goes on to its end (the log read stores its events, the disconnect
opens the relay), and the caller's pending slot is held until the work ends, not until the
answer (a second request meanwhile is 3.2, one after the work is admitted)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_events import EVENT_LOGS
from cimhes.endpoints.end_device_controls import ControlRequestLimits
from cimhes.engine.admission import RequestLimits
from cimhes.engine.event_queries import EventRequestLimits
from cimhes.fixtures.fleet import start_fleet

from .credentials import zeep_client
from .head_ends import devices_of, serve_head_end
from .test_end_device_controls import DISCONNECT, _control, _header, _output_state

FIRST_METER = 5335 + 90
LIMIT = 0.5  # s; a meter answering every DLMS request in 0.4 s needs several seconds


def now() -> datetime:
    return datetime.now(timezone.utc)


def _codes(reply):
    return [e.code for e in reply.Reply.Error or []]


async def _until(condition, seconds: float):
    for _ in range(int(seconds / 0.2)):
        if await condition():
            return True
        await deferLater(reactor, 0.2, lambda: None)
    return await condition()


async def _close(head_end, fleet):
    await head_end.owed_replies.stop()
    await head_end.port.stopListening()
    head_end.store_runner.stop()
    head_end.store.close()
    await fleet.stop_all()


def _ask_events(client, mrid, source):
    return client.service.GetEndDeviceEvents(
        Header={"Verb": "get", "Noun": "EndDeviceEvents"},
        Request={"GetEndDeviceEvents": {
            "Meter": [{"mRID": mrid}],
            "TimeSchedule": [{"scheduleInterval": {"start": now() - timedelta(days=1),
                                                   "end": now()}}]},
            "Option": [{"name": "DataSource", "value": source}]})


@pytest_twisted.ensureDeferred
async def test_get_end_device_events_past_its_time_limit_is_4_1_and_the_log_read_goes_on(
        tmp_path):
    fleet = start_fleet(reactor, 1, clock=now, base_index=FIRST_METER, port=0,
                        response_delay=0.4)
    fleet.state(FIRST_METER).record(EVENT_LOGS["standard"].obis,
                                    (now() - timedelta(hours=3)).replace(microsecond=0), 1)
    head_end = serve_head_end(tmp_path, devices_of(fleet), device_timeout=10.0,
                              event_requests=EventRequestLimits(sync_time_limit=LIMIT),
                              request_limits=RequestLimits(max_pending_per_caller=1))
    try:
        mrid = fleet.inventory()["meters"][0]["mrid"]
        client = await deferToThread(zeep_client,
                                     f"{head_end.base_url}/cim/GetEndDeviceEvents?wsdl")
        started = reactor.seconds()
        late = await deferToThread(_ask_events, client, mrid, "meter")
        assert reactor.seconds() - started < 5  # answered at the limit, not at the read's end
        assert late.Reply.Result == "FAILED" and _codes(late) == ["4.1"]
        assert "still being read" in late.Reply.Error[0].reason
        # The log read still holds the caller's one pending slot.
        busy = await deferToThread(_ask_events, client, mrid, "store")
        assert _codes(busy) == ["3.2"]

        async def stored():  # the late read ends: its event is in the store, the slot free
            reply = await deferToThread(_ask_events, client, mrid, "store")
            return reply.Reply.Result == "OK" and reply.Payload is not None
        assert await _until(stored, 60)
        reply = await deferToThread(_ask_events, client, mrid, "store")
        assert [e.mRID for e in reply.Payload.EndDeviceEvents.EndDeviceEvent] != []
    finally:
        await _close(head_end, fleet)


@pytest_twisted.ensureDeferred
async def test_a_control_past_its_time_limit_is_4_1_and_still_opens_the_relay(tmp_path):
    fleet = start_fleet(reactor, 1, clock=now, base_index=FIRST_METER + 1, port=0,
                        response_delay=0.4)
    head_end = serve_head_end(tmp_path, devices_of(fleet), device_timeout=10.0,
                              control_requests=ControlRequestLimits(sync_time_limit=LIMIT),
                              request_limits=RequestLimits(max_pending_per_caller=1))
    try:
        meter = fleet.inventory()["meters"][0]
        client = await deferToThread(
            zeep_client, f"{head_end.base_url}/cim/ExecuteEndDeviceControls?wsdl")
        started = reactor.seconds()
        late = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                   Payload={"EndDeviceControls": _control(DISCONNECT,
                                                                          [meter["mrid"]])})
        assert reactor.seconds() - started < 5
        assert late.Reply.Result == "FAILED" and _codes(late) == ["4.1"]
        assert "audit trail" in late.Reply.Error[0].reason
        busy = await deferToThread(client.service.CreateEndDeviceControls, Header=_header(),
                                   Payload={"EndDeviceControls": _control(DISCONNECT,
                                                                          [meter["mrid"]])})
        assert _codes(busy) == ["3.2"]

        async def done():  # the control went on: audited as done, the relay open
            audit = await deferToThread(head_end.users.audit_entries)
            return [(a.action, a.outcome) for a in audit if a.subject == meter["mrid"]] == [
                ("control.disconnect", "success")]
        assert await _until(done, 60)
        assert await _output_state(DeviceAddress.from_inventory(meter)) is False
    finally:
        await _close(head_end, fleet)
