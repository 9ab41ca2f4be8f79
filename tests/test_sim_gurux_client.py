"""Cross-check: gurux-dlms's client, an independent DLMS implementation, reads the simulator by bytes."""

from datetime import datetime, timezone

import pytest
from gurux_dlms import GXByteBuffer, GXDLMSClient, GXDLMSException, GXReplyData
from gurux_dlms.enums import Authentication, InterfaceType
from gurux_dlms.objects import GXDLMSClock, GXDLMSProfileGeneric, GXDLMSRegister

from cimhes.fixtures import meter_model
from cimhes.fixtures.meter_model import meter_identity, profile_rows, register_raw
from cimhes.fixtures.meter_session import MeterSession, State

UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 7, 30, tzinfo=UTC)
METER = meter_identity(7)


def exchange(session: MeterSession, client: GXDLMSClient, requests) -> GXReplyData:
    """Send gurux's request frames, feed the answers back, follow block transfer to the end."""
    reply = GXReplyData()
    for request in requests:
        client.getData(GXByteBuffer(session.receive_data(bytes(request))), reply)
    while reply.isMoreData():
        client.getData(GXByteBuffer(session.receive_data(bytes(client.receiverReady(reply)))), reply)
    return reply


def associate(session: MeterSession, client: GXDLMSClient) -> None:
    client.parseAareResponse(exchange(session, client, client.aarqRequest()).data)


def read(session, client, target, attribute):
    client.updateValue(target, attribute, exchange(session, client, client.read(target, attribute)).value)


def test_gurux_reads_clock_registers_and_a_day_of_profile():
    session = MeterSession(METER, clock=lambda: NOW)
    client = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    associate(session, client)
    assert client.maxReceivePDUSize == 1024

    clock = GXDLMSClock("0.0.1.0.0.255")
    read(session, client, clock, 2)
    assert clock.time.value.replace(tzinfo=UTC) == NOW.replace(tzinfo=UTC)

    for obis, (scaler, unit) in meter_model.SCALER_UNIT.items():
        register = GXDLMSRegister(obis)
        read(session, client, register, 3)
        read(session, client, register, 2)
        assert (register.scaler, int(register.unit)) == (10 ** scaler, unit)
        # gurux applies the scaler when it updates the value
        assert register.value == register_raw(METER.serial, obis, NOW) * 10 ** scaler

    profile = GXDLMSProfileGeneric("1.0.99.1.0.255")
    read(session, client, profile, 3)
    assert [(obj.logicalName, definition.attributeIndex) for obj, definition in profile.captureObjects] == [
        ("0.0.1.0.0.255", 2), ("1.0.1.8.0.255", 2), ("1.0.2.8.0.255", 2)]
    start, end = datetime(2024, 5, 31, 12, 15, tzinfo=UTC), datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    reply = exchange(session, client, client.readRowsByRange(profile, start, end))
    client.updateValue(profile, 2, reply.value)
    expected = profile_rows(METER.serial, start, end)
    assert len(profile.buffer) == len(expected) == 96
    for (stamp, imported, exported), (at, want_import, want_export) in zip(profile.buffer, expected):
        assert stamp.value.astimezone(UTC) == at
        assert (imported, exported) == (want_import, want_export)

    exchange(session, client, client.releaseRequest())
    assert session.state is State.RELEASED


def test_gurux_public_client_and_wrong_password():
    public = GXDLMSClient(True, 16, 1, Authentication.NONE, None, InterfaceType.WRAPPER)
    session = MeterSession(METER, clock=lambda: NOW)
    associate(session, public)
    clock = GXDLMSClock("0.0.1.0.0.255")
    read(session, public, clock, 2)
    assert clock.time.value.replace(tzinfo=UTC) == NOW

    intruder = GXDLMSClient(True, 1, 1, Authentication.LOW, "00000000", InterfaceType.WRAPPER)
    session = MeterSession(METER, clock=lambda: NOW)
    with pytest.raises(GXDLMSException) as refused:
        associate(session, intruder)
    assert (refused.value.result, refused.value.diagnostic) == (1, 13)
    assert session.state is State.IDLE


def test_gurux_decodes_the_billing_profiles_max_demand_and_disconnector():
    from gurux_dlms.objects import GXDLMSDisconnectControl, GXDLMSExtendedRegister

    session = MeterSession(METER, clock=lambda: NOW)
    client = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    associate(session, client)
    for obis, rows, start in (("1.0.99.2.0.255", meter_model.daily_rows, datetime(2024, 5, 1, tzinfo=UTC)),
                              ("0.0.98.1.0.255", meter_model.billing_rows, datetime(2024, 1, 1, tzinfo=UTC))):
        profile = GXDLMSProfileGeneric(obis)
        read(session, client, profile, 3)
        assert [(obj.logicalName, d.attributeIndex) for obj, d in profile.captureObjects] == [
            ("0.0.1.0.0.255", 2), *((o, 2) for o in meter_model.BILLING_REGISTERS)]
        end = NOW
        client.updateValue(profile, 2, exchange(session, client,
                                                client.readRowsByRange(profile, start, end)).value)
        expected = rows(METER.serial, start, end)
        assert len(profile.buffer) == len(expected) > 3
        for (stamp, *values), (at, *want) in zip(profile.buffer, expected):
            assert stamp.value.astimezone(UTC) == at and values == want

    demand = GXDLMSExtendedRegister("1.0.1.6.0.255")
    for attribute in (3, 2, 5):
        read(session, client, demand, attribute)
    value, captured = meter_model.max_demand(METER.serial, NOW)
    assert demand.value == value and int(demand.unit) == 27
    assert demand.captureTime.value.astimezone(UTC) == captured

    disconnector = GXDLMSDisconnectControl("0.0.96.3.10.255")
    for attribute in (2, 3, 4):
        read(session, client, disconnector, attribute)
    assert (disconnector.outputState, int(disconnector.controlState)) == (True, 1)


def test_gurux_decodes_the_event_logs():
    session = MeterSession(METER, clock=lambda: NOW)
    client = GXDLMSClient(True, 1, 1, Authentication.LOW, "12345678", InterfaceType.WRAPPER)
    associate(session, client)
    start = datetime(2024, 5, 1, tzinfo=UTC)
    for log, code_object in (("0.0.99.98.0.255", "0.0.96.11.0.255"), ("0.0.99.98.1.255", "0.0.96.11.1.255"),
                             ("0.0.99.98.4.255", "0.0.96.11.4.255"), ("1.0.99.97.0.255", "0.0.96.7.19.255")):
        profile = GXDLMSProfileGeneric(log)
        read(session, client, profile, 3)
        assert [obj.logicalName for obj, _ in profile.captureObjects] == ["0.0.1.0.0.255", code_object]
        client.updateValue(profile, 2, exchange(session, client,
                                                client.readRowsByRange(profile, start, NOW)).value)
        expected = meter_model.scheduled_events(METER.serial, log, start, NOW)
        assert len(profile.buffer) == len(expected) > 0
        assert [(stamp.value.astimezone(UTC), value) for stamp, value in profile.buffer] == expected
