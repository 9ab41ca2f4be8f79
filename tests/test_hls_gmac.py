"""HLS-GMAC associations and ciphered APDUs (security suite 0), by bytes: the head-end's sans-IO
client against the simulator's MeterSession, and gurux-dlms's own client against both sides."""

from datetime import datetime, timedelta, timezone

import pytest
from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
from gurux_dlms.AesGcmParameter import AesGcmParameter
from gurux_dlms.GXCiphering import GXCiphering
from gurux_dlms.enums import Authentication, Conformance, InterfaceType, Security
from gurux_dlms.GXDLMSChippering import GXDLMSChippering
from gurux_dlms.objects import GXDLMSClock, GXDLMSData, GXDLMSProfileGeneric, GXDLMSRegister

from cimhes.drivers.ciphering import GlobalCipher, HlsGmac, SecurityKeys, split_ciphered
from cimhes.drivers.dlms_session import (
    Associated,
    AttributeValue,
    AuthenticationRequired,
    ClientSession,
    DataAccessError,
    NextBlockRequest,
    Released,
    State,
)
from cimhes.drivers.errors import AuthenticationFailed, CounterRejected, ReplayDetected
from cimhes.fixtures import meter_model
from cimhes.fixtures.meter_cipher import MeterSecurity
from cimhes.fixtures.meter_session import MeterSession, SecurityViolation
from cimhes.fixtures.meter_session import State as MeterState

UTC = timezone.utc
NOW = datetime(2024, 3, 1, 12, 7, 30, tzinfo=UTC)
METER = meter_model.meter_identity(7)
CLIENT_TITLE = bytes.fromhex("43494d4845530001")
EK = bytes(range(16))
AK = bytes(range(16, 32))


def meter_security(**changes) -> MeterSecurity:
    values = dict(system_title=b"CIM" + (7).to_bytes(5, "big"), encryption_key=EK,
                  authentication_key=AK, next_counter=1000)
    values.update(changes)
    return MeterSecurity(**values)


def hls(first=1, limit=1000, last_seen=-1, ek=EK, ak=AK, server_title=None) -> HlsGmac:
    return HlsGmac(SecurityKeys(ek, ak), CLIENT_TITLE, server_title or b"CIM" + (7).to_bytes(5, "big"),
                   first, limit, last_seen)


class Exchange:
    def __init__(self, security: MeterSecurity, settings: HlsGmac):
        self.meter = MeterSession(METER, clock=lambda: NOW, security=security)
        self.client = ClientSession(METER.mrid, 1, 1, "hls-gmac", hls=settings)

    def send(self, data: bytes):
        while True:
            events = self.client.receive_data(self.meter.receive_data(data))
            assert len(events) == 1, events
            if not isinstance(events[0], NextBlockRequest):
                return events[0]
            data = events[0].data

    def associate(self):
        assert self.send(self.client.associate()) == AuthenticationRequired()
        return self.send(self.client.authenticate())


def secrets_in(text: str) -> list[str]:
    return [key.hex() for key in (EK, AK) if key.hex() in text.lower()]


def test_a_full_read_over_hls_gmac_gives_the_model_values():
    security = meter_security()
    exchange = Exchange(security, hls())
    assert exchange.associate() == Associated(1024)
    assert exchange.meter.state is MeterState.ASSOCIATED
    clock = exchange.send(exchange.client.get(8, "0.0.1.0.0.255", 2))
    assert isinstance(clock, AttributeValue)
    value = exchange.send(exchange.client.get(3, meter_model.IMPORT_TOTAL, 2))
    assert value.value == meter_model.register_raw(METER.serial, meter_model.IMPORT_TOTAL, NOW)
    start = NOW.replace(hour=0, minute=0, second=0) - timedelta(days=1)
    rows = exchange.send(exchange.client.get_rows_by_range("1.0.99.1.0.255", start, start + timedelta(days=1)))
    assert len(rows.value) == 97  # both ends included, several ciphered blocks
    assert rows.value[-1][1] == meter_model.profile_rows(METER.serial, start, start + timedelta(days=1))[-1][1]
    assert exchange.send(exchange.client.release()) == Released()
    # Every APDU used its own counter, both ways; the meter remembers the client's.
    # AARQ 1, f(StoC) 2, action 3, clock 4, register 5, profile 6, two next blocks 7 and 8.
    assert exchange.client.next_client_counter == 9
    assert security.last_client_counter == exchange.client.next_client_counter - 1
    assert exchange.client.last_server_counter == security.next_counter - 1


def test_the_wire_carries_no_plain_apdu_after_the_aarq():
    exchange = Exchange(meter_security(), hls())
    exchange.associate()
    request = exchange.client.get(3, meter_model.IMPORT_TOTAL, 2)
    assert request[8] == 0xC8  # glo-get-request
    assert bytes.fromhex("0100010800ff") not in request  # the OBIS code is not readable
    answer = exchange.meter.receive_data(request)
    assert answer[8] == 0xCC  # glo-get-response


@pytest.mark.parametrize("changed", ["encryption", "authentication"])
def test_a_wrong_key_is_an_authentication_failure_naming_the_device_and_no_key(changed):
    wrong = bytes(16)
    settings = hls(ek=wrong) if changed == "encryption" else hls(ak=wrong)
    security = meter_security()
    exchange = Exchange(security, settings)
    event = exchange.send(exchange.client.associate())
    assert isinstance(event, AuthenticationFailed)
    assert METER.mrid in str(event) and "authentication failed" in str(event)
    assert secrets_in(str(event) + repr(event) + repr(settings) + repr(exchange.client.__dict__)) == []
    assert isinstance(exchange.meter.next_event(), SecurityViolation)


def test_a_system_title_other_than_the_inventorys_is_an_authentication_failure():
    exchange = Exchange(meter_security(), hls(server_title=b"CIM" + (8).to_bytes(5, "big")))
    event = exchange.send(exchange.client.associate())
    assert isinstance(event, AuthenticationFailed)
    assert "system title" in event.reason and METER.mrid in str(event)


def test_a_meter_that_cannot_decipher_a_request_is_an_authentication_failure():
    exchange = Exchange(meter_security(), hls())
    assert exchange.send(exchange.client.associate()) == AuthenticationRequired()
    # The meter's keys change between the AARE and pass 3 (a key change the head-end missed).
    exchange.meter.security = meter_security(authentication_key=bytes(16))
    event = exchange.send(exchange.client.authenticate())
    assert isinstance(event, AuthenticationFailed) and "decipher" in event.reason
    assert isinstance(exchange.meter.next_event(), SecurityViolation)


def test_a_wrong_answer_to_the_meters_challenge_is_refused_by_the_meter():
    exchange = Exchange(meter_security(), hls())
    assert exchange.send(exchange.client.associate()) == AuthenticationRequired()
    exchange.client._server_challenge = bytes(16)  # f(StoC) of another challenge
    event = exchange.send(exchange.client.authenticate())
    assert isinstance(event, AuthenticationFailed) and "f(StoC)" in event.reason
    assert exchange.meter.state is MeterState.IDLE


def test_a_replayed_answer_is_refused_as_a_replay():
    exchange = Exchange(meter_security(), hls())
    exchange.associate()
    first = exchange.meter.receive_data(exchange.client.get(8, "0.0.1.0.0.255", 2))
    assert isinstance(exchange.client.receive_data(first)[0], AttributeValue)
    exchange.meter.receive_data(exchange.client.get(8, "0.0.1.0.0.255", 2))  # the real answer is lost
    event = exchange.client.receive_data(first)[0]  # ... and the old one arrives instead
    assert isinstance(event, ReplayDetected)
    assert event.counter <= event.last_seen and METER.mrid in str(event)


def test_a_counter_seen_in_an_earlier_session_is_refused_too():
    security = meter_security()
    first = Exchange(security, hls())
    first.associate()
    seen = first.client.last_server_counter
    second = Exchange(security, hls(first=first.client.next_client_counter, last_seen=seen + 100))
    assert isinstance(second.send(second.client.associate()), ReplayDetected)


def test_the_meter_refuses_a_client_counter_it_has_already_accepted():
    security = meter_security()
    Exchange(security, hls(first=1, limit=50)).associate()
    reused = Exchange(security, hls(first=1, limit=50))  # a head-end that forgot its counters
    event = reused.send(reused.client.associate())
    # Not wrong keys: the ExceptionResponse invocation-counter-error, which the head-end
    # answers by resynchronising (tests/test_security_sessions.py).
    assert isinstance(event, CounterRejected) and "invocation-counter-error" in str(event)
    assert reused.client.state is State.IDLE
    violation = reused.meter.next_event()
    assert isinstance(violation, SecurityViolation) and "not above" in violation.reason


def test_the_public_client_reads_name_clock_and_counter_and_nothing_else():
    security = meter_security(last_client_counter=4242)
    meter = MeterSession(METER, clock=lambda: NOW, security=security)
    client = ClientSession(METER.mrid, 16, 1, "none")

    def send(data):
        return client.receive_data(meter.receive_data(data))[0]

    assert isinstance(send(client.associate()), Associated)
    assert send(client.get(1, "0.0.42.0.0.255", 2)).value == b"CIM" + METER.serial.encode()
    assert send(client.get(1, "0.0.43.1.0.255", 2)).value == 4242
    assert isinstance(send(client.get(8, "0.0.1.0.0.255", 2)), AttributeValue)
    assert send(client.get(3, meter_model.IMPORT_TOTAL, 2)) == DataAccessError(3)  # read-write-denied
    assert send(client.get(7, "1.0.99.1.0.255", 3)) == DataAccessError(3)
    assert send(client.get(1, "0.0.96.1.0.255", 2)) == DataAccessError(4)  # object-undefined


# --- gurux-dlms, the independent implementation ----------------------------------------------

def gurux_client(general_protection=False) -> GXDLMSClient:
    client = GXDLMSClient(True, 1, 1, Authentication.HIGH_GMAC, None, InterfaceType.WRAPPER)
    client.settings.cipher = cipher = GXCiphering(CLIENT_TITLE)
    cipher.security = Security.AUTHENTICATION_ENCRYPTION
    cipher.systemTitle = CLIENT_TITLE
    cipher.blockCipherKey = EK
    cipher.authenticationKey = AK
    cipher.invocationCounter = 1
    if general_protection:
        client.proposedConformance |= Conformance.GENERAL_PROTECTION
    else:
        client.proposedConformance &= ~Conformance.GENERAL_PROTECTION
    return client


def gurux_exchange(meter: MeterSession, client: GXDLMSClient, requests) -> GXReplyData:
    reply = GXReplyData()
    for request in requests:
        client.getData(GXByteBuffer(meter.receive_data(bytes(request))), reply)
    while reply.isMoreData():
        client.getData(GXByteBuffer(meter.receive_data(bytes(client.receiverReady(reply)))), reply)
    return reply


@pytest.mark.parametrize("general_protection", [False, True])
def test_gurux_reads_the_simulator_over_hls_gmac(general_protection):
    meter = MeterSession(METER, clock=lambda: NOW, security=meter_security())
    client = gurux_client(general_protection)
    client.parseAareResponse(gurux_exchange(meter, client, client.aarqRequest()).data)
    client.parseApplicationAssociationResponse(
        gurux_exchange(meter, client, client.getApplicationAssociationRequest()).data)
    assert meter.state is MeterState.ASSOCIATED
    assert bytes(client.settings.sourceSystemTitle) == meter.security.system_title

    register = GXDLMSRegister(meter_model.IMPORT_TOTAL)
    requests = client.read(register, 2)
    assert bytes(requests[0])[8] == (0xDB if general_protection else 0xC8)
    client.updateValue(register, 2, gurux_exchange(meter, client, requests).value)
    assert register.value == meter_model.register_raw(METER.serial, meter_model.IMPORT_TOTAL, NOW)
    clock = GXDLMSClock()
    client.updateValue(clock, 2, gurux_exchange(meter, client, client.read(clock, 2)).value)
    assert clock.time.value.replace(tzinfo=UTC) == NOW
    profile = GXDLMSProfileGeneric("1.0.99.1.0.255")
    client.updateValue(profile, 3, gurux_exchange(meter, client, client.read(profile, 3)).value)
    start = datetime(2024, 2, 29, 12, 15, tzinfo=UTC)
    reply = gurux_exchange(meter, client, client.readRowsByRange(profile, start, start + timedelta(hours=23, minutes=45)))
    client.updateValue(profile, 2, reply.value)
    assert len(profile.buffer) == 96


def test_gurux_deciphers_the_head_ends_apdus_and_the_head_end_gurux_s():
    # Our client's ciphered GET, opened by gurux's own AES-GCM with the same key and title.
    exchange = Exchange(meter_security(), hls())
    exchange.associate()
    frame = exchange.client.get(3, meter_model.IMPORT_TOTAL, 2)
    parameter = AesGcmParameter(0, CLIENT_TITLE, EK, AK)
    plain = GXDLMSChippering.decryptAesGcm(exchange.client._client.settings, parameter,
                                           GXByteBuffer(frame[8:]))
    assert bytes(plain)[:1] == b"\xc0" and bytes.fromhex("0100010800ff") in bytes(plain)

    # gurux's ciphered GET, opened by the head-end's cipher.
    client = gurux_client()
    meter = MeterSession(METER, clock=lambda: NOW, security=meter_security())
    client.parseAareResponse(gurux_exchange(meter, client, client.aarqRequest()).data)
    request = bytes(client.read(GXDLMSData("0.0.42.0.0.255"), 2)[0])[8:]
    _, _, content = split_ciphered(request)
    counter, plain = GlobalCipher(SecurityKeys(EK, AK)).open(CLIENT_TITLE, content)
    assert plain[:1] == b"\xc0" and bytes.fromhex("00002a0000ff") in plain
    assert counter == client.settings.cipher.invocationCounter - 1


def test_keys_stay_out_of_every_repr():
    settings = hls()
    session = ClientSession(METER.mrid, 1, 1, "hls-gmac", hls=settings)
    security = meter_security()
    text = " ".join((repr(settings), str(settings.keys), repr(settings.keys), repr(session._channel),
                     repr(GlobalCipher(settings.keys)), repr(security)))
    assert secrets_in(text) == []
    assert session.state is State.IDLE


@pytest.mark.parametrize("changes, message", [
    ({"encryption_key": "00" * 15}, "encryption_key must be 16 octets"),
    ({"authentication_key": "xy" * 16}, "authentication_key is not a hex string"),
    ({"system_title": "00" * 9}, "system_title must be 8 octets"),
    ({"system_title": None}, "needs system_title"),
    ({"security": "hls"}, "is not one of"),
    ({"security": "low", "password": "x"}, "system_title is given but security is 'low'"),
])
def test_the_inventory_refuses_bad_security_fields_by_name(changes, message):
    from cimhes.drivers import DeviceAddress

    entry = {"mrid": "m-1", "name": "X1", "device_type": "idis-meter", "host": "127.0.0.1",
             "client_address": 1, "security": "hls-gmac", "system_title": "43494d0000000007",
             "encryption_key": EK.hex(), "authentication_key": AK.hex()}
    entry.update(changes)
    with pytest.raises(ValueError) as refused:
        DeviceAddress.from_inventory(entry)
    assert message in str(refused.value) and "m-1" in str(refused.value)
    assert secrets_in(str(refused.value)) == []


def test_a_device_address_shows_its_system_title_but_never_its_keys():
    from cimhes.drivers import DeviceAddress

    device = DeviceAddress("m-1", "X1", "idis-meter", "127.0.0.1", 4059, 1, 1, "hls-gmac",
                           None, "43494d0000000007", EK.hex(), AK.hex())
    assert "43494d0000000007" in repr(device) and secrets_in(repr(device) + str(device)) == []
    assert device.security_keys() == SecurityKeys(EK, AK)
