"""The GET requests the client builds itself, byte for byte against what gurux-dlms builds for
the same request (gurux as the oracle: the two implementations check each other)."""
from datetime import datetime, timedelta, timezone

import pytest
from gurux_dlms import GXDLMSClient
from gurux_dlms.enums import Authentication, InterfaceType, ObjectType
from gurux_dlms.objects import GXDLMSObject, GXDLMSProfileGeneric

from cimhes.drivers.dlms_session import ClientSession, NextBlockRequest, State

UTC = timezone.utc


def associated(client_address=1, server_address=1) -> ClientSession:
    session = ClientSession("m", client_address, server_address, "low", "secret")
    session.associate()
    session._state = State.ASSOCIATED  # the AARE is tested elsewhere; here only the GETs
    return session


def gurux(client_address=1, server_address=1, invoke=1) -> GXDLMSClient:
    client = GXDLMSClient(True, client_address, server_address, Authentication.LOW, "secret",
                          InterfaceType.WRAPPER)
    client.aarqRequest()
    client.settings.invokeId = invoke
    return client


@pytest.mark.parametrize("class_id, obis, attribute", [
    (8, "0.0.1.0.0.255", 2), (3, "1.0.1.8.0.255", 2), (3, "1.0.2.8.0.255", 3),
    (7, "1.0.99.1.0.255", 3), (1, "0.0.42.0.0.255", 2)])
@pytest.mark.parametrize("addresses", [(1, 1), (16, 1), (1, 17)])
def test_get_normal_is_what_gurux_builds(class_id, obis, attribute, addresses):
    ours = associated(*addresses).get(class_id, obis, attribute)
    theirs = gurux(*addresses).read(GXDLMSObject(ObjectType(class_id), obis), attribute)[0]
    assert ours == bytes(theirs)


@pytest.mark.parametrize("start", [datetime(2026, 1, 1, tzinfo=UTC),
                                   datetime(2026, 11, 20, 23, 45, 59, tzinfo=UTC),
                                   datetime(2026, 3, 29, 3, 0, tzinfo=timezone(timedelta(hours=2)))])
def test_get_by_range_is_what_gurux_builds(start):
    end = start + timedelta(days=1, minutes=15)
    ours = associated().get_rows_by_range("1.0.99.1.0.255", start, end)
    theirs = gurux().readRowsByRange(GXDLMSProfileGeneric("1.0.99.1.0.255"),
                                     start.astimezone(UTC), end.astimezone(UTC))[0]
    assert ours == bytes(theirs)


def test_each_get_has_the_next_invoke_id_and_get_next_keeps_it():
    session = associated()
    for invoke in [1, 2, 3]:
        request = session.get(3, "1.0.1.8.0.255", 2)
        assert request[10] == 0xC0 | invoke
        session._state = State.ASSOCIATED
    session.get(7, "1.0.99.1.0.255", 3)
    block = bytes.fromhex("c402c4 00 00000005 00 02 0102".replace(" ", ""))
    [next_request] = session.receive_data(bytes.fromhex("0001000100010000")[:6]
                                          + len(block).to_bytes(2, "big") + block)
    assert isinstance(next_request, NextBlockRequest)
    # GET-Request-Next: same invoke-id, the number of the block received (what gurux sent for
    # it before: tests/test_drivers_session.py has the bytes it recorded)
    assert next_request.data == bytes.fromhex("0001000100010007" "c002c4" "00000005")


def test_invoke_ids_cycle_through_one_to_fifteen():
    session = associated()
    seen = []
    for _ in range(31):
        seen.append(session.get(3, "1.0.1.8.0.255", 2)[10] & 0x0F)
        session._state = State.ASSOCIATED
    assert seen == [*range(1, 16), *range(1, 16), 1]
