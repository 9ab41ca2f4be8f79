"""The requests the client builds itself (AARQ, RLRQ, GETs) and the AARE it reads, byte for byte against what gurux-dlms builds for
the same request (gurux as the oracle: the two implementations check each other)."""
from datetime import datetime, timedelta, timezone

import pytest
from gurux_dlms import GXByteBuffer, GXDLMSClient
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


# -- the association: AARQ and RLRQ built here, the AARE read here, gurux as the oracle -------

# An AARE as an IDIS meter sends it (accepted, no diagnostic, InitiateResponse with PDU size 1024).
AARE_ACCEPTED = bytes.fromhex("6129a109060760857405080101a203020100a305a103020100be10040e0800065f"
                              "1f040000101404000007")


def frame(source: int, destination: int, apdu: bytes) -> bytes:
    return (bytes.fromhex("0001") + source.to_bytes(2, "big") + destination.to_bytes(2, "big")
            + len(apdu).to_bytes(2, "big") + apdu)


@pytest.mark.parametrize("security, password, addresses", [
    ("none", None, (16, 1)), ("low", "12345678", (1, 1)), ("low", "secret", (1, 17)),
    ("low", "a much longer password of 40 characters", (3, 1))])
def test_association_requests_are_what_gurux_builds(security, password, addresses):
    ours = ClientSession("m", *addresses, security, password)
    authentication = Authentication.LOW if security == "low" else Authentication.NONE
    theirs = GXDLMSClient(True, *addresses, authentication, password, InterfaceType.WRAPPER)
    assert ours.associate() == bytes(theirs.aarqRequest()[0])
    [event] = ours.receive_data(frame(addresses[1], addresses[0], AARE_ACCEPTED))
    assert event.max_pdu_size == 1024 and ours.state is State.ASSOCIATED
    theirs.parseAareResponse(GXByteBuffer(AARE_ACCEPTED))
    assert ours.release() == bytes(theirs.releaseRequest()[0])


@pytest.mark.parametrize("aare, expected", [
    # rejected-permanent, diagnostic authentication-failure (a wrong password)
    ("6129a109060760857405080101a203020101a305a10302010dbe10040e0800065f1f040000101404000007",
     "AssociationRefused: AARE rejected-permanent, diagnostic authentication-failure"),
    # accepted but authentication-required: the meter wants HLS
    ("6129a109060760857405080101a203020100a305a10302010ebe10040e0800065f1f040000101404000007",
     "ProtocolError: meter asks for high level authentication"),
    # another application context (ciphered)
    ("6129a109060760857405080103a203020100a305a103020100be10040e0800065f1f040000101404000007",
     "ProtocolError: AARE names application context 60857405080103"),
    # user-information holding no InitiateResponse
    ("6120a109060760857405080101a203020100a305a103020100be0704050e01060000",
     "ProtocolError: AARE holds no InitiateResponse"),
    # lengths that do not add up
    ("6130a109060760857405080101a203020100", "ProtocolError: malformed AARE"),
])
def test_an_aare_that_does_not_associate_says_why(aare, expected):
    session = ClientSession("m", 1, 1, "low", "secret")
    session.associate()
    [event] = session.receive_data(frame(1, 1, bytes.fromhex(aare)))
    kind, reason = expected.split(": ", 1)
    assert type(event).__name__ == kind
    assert reason in str(event)
    assert session.state is State.IDLE or kind == "ProtocolError"
