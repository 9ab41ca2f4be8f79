"""SET and ACTION with block transfer: a value larger than the meter's PDU size (a full activity
calendar) goes as Set-Request-With-First-Datablock / With-Datablock (ACTION: With-First-Pblock
/ With-Pblock). The head-end's blocks are byte for byte what gurux-dlms's own encoder builds,
gurux's blocks are served by the simulated meter, and the tou-activate control writes a
calendar larger than the PDU size over TCP to a plain and a ciphered meter, read back."""
from __future__ import annotations

from datetime import datetime, timezone
from datetime import datetime as dt

import pytest
import pytest_twisted
from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData, GXTime
from gurux_dlms.enums import Authentication, DataType, InterfaceType
from gurux_dlms.objects import (
    GXDLMSActivityCalendar,
    GXDLMSData,
    GXDLMSDayProfile,
    GXDLMSDayProfileAction,
    GXDLMSDisconnectControl,
)
from twisted.internet import reactor

from cimhes.drivers import driver_for
from cimhes.drivers import axdr as client_axdr
from cimhes.drivers.controls import ControlCommand, ControlKind, ControlStatus
from cimhes.drivers.dlms_session import (
    ClientSession,
    LocalProtocolError,
    NextBlockRequest,
    SetResult,
    State,
)
from cimhes.drivers.idis_controls import _days
from cimhes.drivers.limits import SessionLimits
from cimhes.drivers.security import HeadEndSecurity
from cimhes.engine.inventory import Inventory
from cimhes.engine.security import CounterStore, StoredCounters
from cimhes.engine.store import Store, StoreRunner
from cimhes.fixtures import axdr
from cimhes.fixtures.fleet import start_fleet
from cimhes.fixtures.meter_model import meter_identity
from cimhes.fixtures.meter_session import MeterSession

NOW = datetime(2026, 6, 1, 12, 7, 30, tzinfo=timezone.utc)
PDU = 256
LIMITS = SessionLimits(connect_timeout=2.0, response_timeout=2.0, session_deadline=30.0)
CALENDAR = "0.0.13.0.0.255"
FIRST = 19 * 254 + 20  # meters on 127.0.20.20.., this suite's loopback range
# Twelve day profiles of eight switching times each: 1,898 octets encoded, about 7 PDUs of 256.
DAYS = [{"id": d, "actions": [{"start": f"{h:02d}:00", "script": "0.0.10.0.100.255",
                               "selector": 1 + (h // 3 + d) % 4} for h in range(0, 24, 3)]}
        for d in range(1, 13)]


def gurux_calendar_client() -> tuple[GXDLMSClient, GXDLMSActivityCalendar]:
    client = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    client.settings.maxPduSize = PDU
    client.negotiatedConformance = client.proposedConformance
    calendar = GXDLMSActivityCalendar(CALENDAR)
    profiles = []
    for day in DAYS:
        profile = GXDLMSDayProfile()
        profile.dayId = day["id"]
        actions = []
        for entry in day["actions"]:
            action = GXDLMSDayProfileAction()
            action.startTime = GXTime(dt(2000, 1, 1, int(entry["start"][:2]), 0, 0))
            action.scriptLogicalName = entry["script"]
            action.scriptSelector = entry["selector"]
            actions.append(action)
        profile.daySchedules = actions
        profiles.append(profile)
    calendar.dayProfileTablePassive = profiles
    return client, calendar


def ours() -> ClientSession:
    session = ClientSession("m", 1, 1, "low", "12345678")
    session._state = State.ASSOCIATED  # the AARE is tested elsewhere; here the requests
    session.max_pdu_size = PDU
    session.conformance = 0x001E5D  # block transfer with get, set, action; get, set, action
    return session


def acknowledgement(tag: int, kind: int, number: int) -> bytes:
    apdu = bytes((tag, kind, 0xC1)) + number.to_bytes(4, "big")
    return bytes((0, 1, 0, 1, 0, 1, 0, len(apdu))) + apdu


def blocks_of(session: ClientSession, first: bytes, response_tag: int, ack_kind: int) -> list:
    """Every request frame of a long SET/ACTION, the meter acknowledging each block."""
    frames = [first]
    number = 1
    while True:
        [event] = session.receive_data(acknowledgement(response_tag, ack_kind, number))
        if not isinstance(event, NextBlockRequest):
            return frames, event
        frames.append(event.data)
        number += 1
        if frames[-1][8 + 3] == 1:  # last-block
            return frames, None


def test_a_long_set_is_the_blocks_gurux_builds():
    days = _days(DAYS)
    assert len(days) > PDU * 5
    client, calendar = gurux_calendar_client()
    theirs = [bytes(frame) for frame in client.write(calendar, 9)]
    session = ours()
    mine, _ = blocks_of(session, session.set(20, CALENDAR, 9, days), 0xC5, 2)
    assert len(mine) == len(theirs) > 5
    assert mine == theirs
    assert all(len(frame) - 8 <= PDU for frame in mine)
    # The meter's answer to the last block is the SET's result.
    [result] = session.receive_data(
        bytes((0, 1, 0, 1, 0, 1, 0, 8, 0xC5, 3, 0xC1, 0)) + len(mine).to_bytes(4, "big"))
    assert result == SetResult(0) and session.state is State.ASSOCIATED


def test_a_long_action_is_the_pblocks_gurux_builds():
    parameter = bytes(range(256)) * 3
    client = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    client.settings.maxPduSize = PDU
    client.negotiatedConformance = client.proposedConformance
    theirs = [bytes(frame) for frame in client.method(
        GXDLMSDisconnectControl("0.0.96.3.10.255"), 1, parameter, DataType.OCTET_STRING)]
    session = ours()
    first = session.action(70, "0.0.96.3.10.255", 1, client_axdr.octet_string(parameter))
    mine, _ = blocks_of(session, first, 0xC7, 4)
    assert mine == theirs and len(mine) == 4


def test_without_block_transfer_granted_a_long_set_is_refused_before_sending():
    session = ours()
    session.conformance = 0x00005D  # no block transfer
    with pytest.raises(LocalProtocolError, match="did not grant block transfer"):
        session.set(20, CALENDAR, 9, _days(DAYS))


def test_an_acknowledgement_of_a_block_not_sent_fails_the_request():
    session = ours()
    session.set(20, CALENDAR, 9, _days(DAYS))
    [event] = session.receive_data(acknowledgement(0xC5, 2, 3))
    assert "acknowledged block 3, block 1 was sent" in event.reason
    assert session.state is State.ASSOCIATED


# -- the simulated meter serves them ----------------------------------------------------------

def exchange(meter: MeterSession, client: GXDLMSClient, requests) -> GXReplyData:
    reply = GXReplyData()
    for request in requests:
        reply = GXReplyData()
        client.getData(GXByteBuffer(meter.receive_data(bytes(request))), reply)
    return reply


def associated_meter() -> tuple[MeterSession, GXDLMSClient]:
    meter = MeterSession(meter_identity(9), PDU, clock=lambda: NOW)
    client = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    client.parseAareResponse(exchange(meter, client, client.aarqRequest()).data)
    assert client.settings.maxPduSize == PDU
    return meter, client


def test_the_simulator_takes_gurux_s_long_set_and_long_action():
    meter, client = associated_meter()
    _, calendar = gurux_calendar_client()
    requests = client.write(calendar, 9)
    assert len(requests) > 5
    reply = exchange(meter, client, requests)
    assert reply.error == 0
    stored = meter.meter_state.calendar.passive["days"]
    assert axdr.encode(stored) == _days(DAYS)
    # No IDIS method takes a parameter this large: remote_disconnect gets 300 octets in two
    # pblocks, reassembled, decoded and refused by the method as the wrong type
    # (type-unmatched), as a meter checks any method's parameter.
    requests = client.method(GXDLMSDisconnectControl("0.0.96.3.10.255"), 1, bytes(300),
                             DataType.OCTET_STRING)
    assert len(requests) == 2
    reply = exchange(meter, client, requests)
    assert reply.error == 12 and meter.meter_state.output_state is True
    reply = exchange(meter, client, GXDLMSDisconnectControl("0.0.96.3.10.255").remoteDisconnect(
        client))
    assert reply.error == 0 and meter.meter_state.output_state is False


def test_the_simulator_refuses_blocks_out_of_order_and_blocks_of_nothing():
    meter, client = associated_meter()
    _, calendar = gurux_calendar_client()
    requests = [bytes(r) for r in client.write(calendar, 9)]
    meter.receive_data(requests[0])
    skipped = meter.receive_data(requests[2])[8:]
    assert skipped[:4] == bytes((0xC5, 3, 0xC1, 19))  # data-block-number-invalid
    orphan = meter.receive_data(requests[1])[8:]
    assert orphan[:4] == bytes((0xC5, 3, 0xC1, 18))  # no-long-set-in-progress
    name = GXDLMSData("0.0.42.0.0.255")  # the association still serves the next request
    assert exchange(meter, client, client.read(name, 2)).error == 0


# -- over TCP, through the tou-activate control ------------------------------------------------

@pytest.fixture
def meters(tmp_path):
    plain = start_fleet(reactor, 1, clock=lambda: NOW, base_index=FIRST, port=0,
                        max_pdu_size=PDU)
    ciphered = start_fleet(reactor, 1, clock=lambda: NOW, base_index=FIRST + 1, port=0,
                           max_pdu_size=PDU, security="hls-gmac")
    store = Store(f"sqlite:///{tmp_path / 'engine.sqlite'}")
    runner = StoreRunner(reactor, store)
    security = HeadEndSecurity(b"CIMHES01", StoredCounters(runner, CounterStore(store)))
    yield (plain, ciphered), security
    runner.stop()
    store.close()
    pytest_twisted.blockon(plain.stop_all())
    pytest_twisted.blockon(ciphered.stop_all())


@pytest_twisted.ensureDeferred
async def test_tou_activate_writes_a_calendar_larger_than_the_pdu_size(meters):
    fleets, security = meters
    for fleet, index in zip(fleets, (FIRST, FIRST + 1)):
        [device] = [d.address for d in Inventory.from_json(fleet.inventory()).devices]
        outcome = await driver_for(device.device_type).control(
            reactor, device, ControlCommand(ControlKind.TOU_ACTIVATE, {
                "calendar_name": "BIG-12", "days": DAYS,
                "weeks": [{"name": "W1", "days": [1, 2, 3, 4, 5, 6, 7]}],
                "seasons": [{"name": "S1", "start": "01-01", "week": "W1"}]}),
            LIMITS, security, now=lambda: NOW)
        assert outcome.status is ControlStatus.DONE, outcome.reason
        assert outcome.read_back["calendar_name_active"] == "BIG-12"
        state = fleet.state(index)
        assert axdr.encode(state.calendar.active["days"]) == _days(DAYS)
        assert device.security == ("low" if index == FIRST else "hls-gmac")
