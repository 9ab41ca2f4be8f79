"""Cross-check of the controls: gurux-dlms's own client (an independent DLMS implementation)
builds SET and ACTION requests for the simulator's control objects and parses its answers, and
the head-end's session builds the same request bytes as gurux does."""
from datetime import datetime, timedelta, timezone

from gurux_dlms import GXByteBuffer, GXDateTime, GXDLMSClient, GXReplyData
from gurux_dlms.enums import Authentication, DataType, InterfaceType
from gurux_dlms.objects import (
    GXDLMSActivityCalendar,
    GXDLMSClock,
    GXDLMSData,
    GXDLMSDisconnectControl,
    GXDLMSLimiter,
    GXDLMSRegister,
)
from gurux_dlms.objects.enums import ControlMode, ControlState

from cimhes.drivers import axdr
from cimhes.drivers.dlms_session import ActionResult, ClientSession, SetResult, State
from cimhes.fixtures import meter_model
from cimhes.fixtures.meter_model import meter_identity
from cimhes.fixtures.meter_session import MeterSession

UTC = timezone.utc
NOW = datetime(2026, 6, 1, 12, 7, 30, tzinfo=UTC)
METER = meter_identity(9)


def exchange(session: MeterSession, client: GXDLMSClient, requests) -> GXReplyData:
    reply = GXReplyData()
    for request in requests:
        client.getData(GXByteBuffer(session.receive_data(bytes(request))), reply)
    while reply.isMoreData():
        client.getData(GXByteBuffer(session.receive_data(bytes(client.receiverReady(reply)))), reply)
    return reply


def associated(client_address=1):
    session = MeterSession(METER, clock=lambda: NOW)
    if client_address == 16:
        client = GXDLMSClient(True, 16, 1, Authentication.NONE, None, InterfaceType.WRAPPER)
    else:
        client = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    client.parseAareResponse(exchange(session, client, client.aarqRequest()).data)
    return session, client


def read(session, client, target, attribute):
    client.updateValue(target, attribute, exchange(session, client, client.read(target, attribute)).value)


def test_gurux_disconnects_and_reconnects_and_reads_the_disconnector_back():
    session, client = associated()
    disconnector = GXDLMSDisconnectControl("0.0.96.3.10.255")
    exchange(session, client, disconnector.remoteDisconnect(client))
    for attribute in (2, 3, 4):
        read(session, client, disconnector, attribute)
    assert (disconnector.outputState, disconnector.controlState, disconnector.controlMode) == (
        False, ControlState.DISCONNECTED, ControlMode.MODE_4)
    disconnector.controlMode = ControlMode.MODE_3  # reconnection goes to ready-for-reconnection
    exchange(session, client, client.write(disconnector, 4))
    exchange(session, client, disconnector.remoteReconnect(client))
    read(session, client, disconnector, 3)
    assert disconnector.controlState == ControlState.READY_FOR_RECONNECTION
    assert [code for _, code in session.meter_state.recorded[meter_model.DISCONNECTOR_LOG]] == [62, 59]


def test_gurux_reads_the_refusals_as_their_results():
    session, client = associated()
    session.meter_state.disconnector.control_mode = 0
    disconnector = GXDLMSDisconnectControl("0.0.96.3.10.255")
    assert exchange(session, client, disconnector.remoteDisconnect(client)).error == 250
    public_session, public = associated(16)
    clock = GXDLMSClock("0.0.1.0.0.255")
    clock.time = GXDateTime(NOW + timedelta(hours=1))
    assert exchange(public_session, public, public.write(clock, 2)).error == 3  # read-write-denied
    assert public_session.meter_state.clock_offset == timedelta(0)


def test_gurux_sets_the_clock():
    session, client = associated()
    clock = GXDLMSClock("0.0.1.0.0.255")
    clock.time = GXDateTime(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))
    exchange(session, client, client.write(clock, 2))
    read(session, client, clock, 2)
    assert clock.time.value.astimezone(UTC) == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert session.meter_state.clock_offset == timedelta(minutes=-7, seconds=-30)


def test_gurux_reads_every_limiter_attribute_the_simulator_serves():
    session, client = associated()
    state = session.meter_state.limiter
    state.threshold_normal, state.threshold_emergency = 5000, 2000
    state.emergency_profile_id, state.emergency_duration = 7, 3600
    state.emergency_profile_group_ids = (7,)
    limiter = GXDLMSLimiter("0.0.17.0.0.255")
    client.objects.append(GXDLMSRegister("1.0.1.7.0.255"))  # gurux resolves monitored_value
    for attribute in range(2, 12):
        read(session, client, limiter, attribute)
    assert (limiter.monitoredValue.logicalName, limiter.monitoredAttributeIndex) == ("1.0.1.7.0.255", 2)
    assert (limiter.thresholdActive, limiter.thresholdNormal, limiter.thresholdEmergency) == (
        5000, 5000, 2000)
    assert (limiter.minOverThresholdDuration, limiter.minUnderThresholdDuration) == (60, 60)
    assert (limiter.emergencyProfile.id, limiter.emergencyProfile.duration) == (7, 3600)
    assert list(limiter.emergencyProfileGroupIDs) == [7]
    assert limiter.emergencyProfileActive is False  # its activation time is not specified
    assert limiter.actionOverThreshold.logicalName == "0.0.10.0.106.255"


def test_gurux_reads_the_activity_calendar_and_activates_the_passive_one():
    session, client = associated()
    calendar = GXDLMSActivityCalendar("0.0.13.0.0.255")
    for attribute in range(2, 11):
        read(session, client, calendar, attribute)
    assert calendar.calendarNameActive == calendar.calendarNamePassive == "CIMHES-T1T2"
    [season] = calendar.seasonProfileActive
    assert (bytes(season.name), bytes(season.weekName)) == (b"S1", b"W1")
    [week] = calendar.weekProfileTableActive
    assert (bytes(week.name), week.monday, week.sunday) == (b"W1", 1, 1)
    [day] = calendar.dayProfileTableActive
    assert [(a.scriptLogicalName, a.scriptSelector) for a in day.daySchedules] == [
        ("0.0.10.0.100.255", 1), ("0.0.10.0.100.255", 2)]
    calendar.calendarNamePassive = "T2"
    exchange(session, client, client.write(calendar, 6))
    exchange(session, client, calendar.activatePassiveCalendar(client))
    read(session, client, calendar, 2)
    assert calendar.calendarNameActive == "T2"


def gurux(invoke: int) -> GXDLMSClient:
    client = GXDLMSClient(True, 1, 1, Authentication.LOW, "secret", InterfaceType.WRAPPER)
    client.aarqRequest()
    client.settings.invokeId = invoke
    return client


def ours() -> ClientSession:
    session = ClientSession("m", 1, 1, "low", "secret")
    session.associate()
    session._state = State.ASSOCIATED  # the AARE is tested elsewhere; here only the requests
    return session


def test_set_and_action_requests_are_what_gurux_builds():
    disconnector = GXDLMSDisconnectControl("0.0.96.3.10.255")
    assert ours().action(70, "0.0.96.3.10.255", 1, axdr.integer(0)) == bytes(
        disconnector.remoteDisconnect(gurux(1))[0])
    assert ours().action(70, "0.0.96.3.10.255", 2, axdr.integer(0)) == bytes(
        disconnector.remoteReconnect(gurux(1))[0])
    disconnector.controlMode = ControlMode.MODE_3
    assert ours().set(70, "0.0.96.3.10.255", 4, axdr.enum(3)) == bytes(
        gurux(1).write(disconnector, 4)[0])
    calendar = GXDLMSActivityCalendar("0.0.13.0.0.255")
    calendar.calendarNamePassive = "T2"
    assert ours().set(20, "0.0.13.0.0.255", 6, axdr.octet_string(b"T2")) == bytes(
        gurux(1).write(calendar, 6)[0])
    threshold = GXDLMSData("0.0.17.0.0.255")
    threshold.value = 5000
    threshold.setDataType(2, DataType.UINT32)
    assert ours().set(1, "0.0.17.0.0.255", 2, axdr.double_long_unsigned(5000)) == bytes(
        gurux(1).write(threshold, 2)[0])


def test_the_session_reads_set_and_action_answers_and_checks_their_invoke_id():
    session = ours()
    session.set(70, "0.0.96.3.10.255", 4, axdr.enum(3))
    answer = bytes.fromhex("c501c103")  # set-response-normal, invoke 1, read-write-denied
    [event] = session.receive_data(bytes.fromhex("00010001000100") + bytes((len(answer),)) + answer)
    assert event == SetResult(3) and event.reason == "read-write-denied"
    session.action(70, "0.0.96.3.10.255", 1, axdr.integer(0))
    answer = bytes.fromhex("c701c30000")  # action-response-normal, invoke 3 (not 2), success
    [event] = session.receive_data(bytes.fromhex("00010001000100") + bytes((len(answer),)) + answer)
    assert "does not answer invoke-id 2" in event.reason and session.state is State.ASSOCIATED
    session.action(70, "0.0.96.3.10.255", 1, axdr.integer(0))
    answer = bytes.fromhex("c701c300")[:3] + bytes((0xFA, 0))  # invoke 3, other-reason
    [event] = session.receive_data(bytes.fromhex("00010001000100") + bytes((len(answer),)) + answer)
    assert event == ActionResult(250) and event.reason == "other-reason"
