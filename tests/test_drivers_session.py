"""The sans-IO DLMS client session, driven with bytes alone against the simulator's MeterSession."""

from datetime import datetime, timedelta, timezone

import pytest
from gurux_dlms import GXDLMSClient
from gurux_dlms.enums import DataType

from cimhes.drivers.axdr import AxdrError, decode_data
from cimhes.drivers.dlms_session import (
    Associated,
    AttributeValue,
    ClientSession,
    DataAccessError,
    LocalProtocolError,
    NextBlockRequest,
    Released,
    State,
    cosem_datetime,
)
from cimhes.drivers.errors import AssociationRefused, ProtocolError
from cimhes.fixtures import meter_model
from cimhes.fixtures.meter_session import MeterSession

NOW = datetime(2024, 3, 1, 12, 7, 30, tzinfo=timezone.utc)
METER = meter_model.meter_identity(7)
PROFILE = "1.0.99.1.0.255"


class Exchange:
    """A client session wired to a simulated meter through plain bytes."""

    def __init__(self, password=METER.password, client_address=1, max_pdu_size=1024):
        self.meter = MeterSession(METER, max_pdu_size=max_pdu_size, clock=lambda: NOW)
        authentication = "none" if client_address == 16 else "low"
        self.client = ClientSession(METER.mrid, client_address, 1, authentication,
                                    password if authentication == "low" else None)
        self.blocks = 0

    def send(self, data: bytes):
        """Deliver `data` to the meter and its answer to the client, following block transfer."""
        while True:
            events = self.client.receive_data(self.meter.receive_data(data))
            assert len(events) == 1, events
            if not isinstance(events[0], NextBlockRequest):
                return events[0]
            self.blocks += 1
            data = events[0].data

    def associated(self):
        assert self.send(self.client.associate()) == Associated(1024)
        return self


def test_association_with_low_level_security_is_accepted():
    exchange = Exchange()
    assert exchange.send(exchange.client.associate()) == Associated(max_pdu_size=1024)
    assert exchange.client.state is State.ASSOCIATED


def test_public_client_associates_without_password():
    exchange = Exchange(client_address=16)
    assert exchange.send(exchange.client.associate()) == Associated(1024)


def test_wrong_password_is_association_refused_naming_the_device():
    exchange = Exchange(password="87654321")
    event = exchange.send(exchange.client.associate())
    assert isinstance(event, AssociationRefused)
    assert event.device_mrid == METER.mrid
    assert (event.result, event.diagnostic) == (1, 13)
    assert "authentication-failure" in event.reason
    assert exchange.client.state is State.IDLE
    with pytest.raises(LocalProtocolError):
        exchange.client.get(3, "1.0.1.8.0.255", 2)


def test_clock_is_the_meter_time_in_utc():
    exchange = Exchange().associated()
    event = exchange.send(exchange.client.get(8, "0.0.1.0.0.255", 2))
    assert cosem_datetime(event.value) == NOW


@pytest.mark.parametrize("obis", sorted(meter_model.SCALER_UNIT))
def test_register_value_and_scaler_unit(obis):
    exchange = Exchange().associated()
    value = exchange.send(exchange.client.get(3, obis, 2))
    scaler_unit = exchange.send(exchange.client.get(3, obis, 3))
    assert value == AttributeValue(meter_model.register_raw(METER.serial, obis, NOW))
    assert tuple(scaler_unit.value) == meter_model.SCALER_UNIT[obis]


def test_missing_object_is_a_data_access_error_and_the_association_goes_on():
    exchange = Exchange().associated()
    event = exchange.send(exchange.client.get(3, "1.0.3.8.0.255", 2))
    assert isinstance(event, DataAccessError)
    assert event.reason == "object-undefined"
    assert exchange.client.state is State.ASSOCIATED
    assert isinstance(exchange.send(exchange.client.get(3, "1.0.1.8.0.255", 2)), AttributeValue)


def test_a_day_of_profile_comes_by_range_in_blocks():
    exchange = Exchange().associated()
    start = NOW - timedelta(days=1)
    event = exchange.send(exchange.client.get_rows_by_range(PROFILE, start, NOW))
    assert exchange.blocks >= 2  # 96 rows do not fit a 1024-byte PDU
    expected = meter_model.profile_rows(METER.serial, start, NOW)
    assert len(expected) == 96
    assert [(cosem_datetime(at), imported, exported) for at, imported, exported in event.value] \
        == expected
    assert exchange.client.state is State.ASSOCIATED


def test_range_bounds_are_sent_in_utc_whatever_zone_the_caller_uses():
    exchange = Exchange().associated()
    plus_two = timezone(timedelta(hours=2))
    start, end = datetime(2024, 3, 1, 13, 0, tzinfo=plus_two), datetime(2024, 3, 1, 13, 30,
                                                                           tzinfo=plus_two)
    event = exchange.send(exchange.client.get_rows_by_range(PROFILE, start, end))
    assert [cosem_datetime(row[0]) for row in event.value] == [
        datetime(2024, 3, 1, 11, 0, tzinfo=timezone.utc),
        datetime(2024, 3, 1, 11, 15, tzinfo=timezone.utc),
        datetime(2024, 3, 1, 11, 30, tzinfo=timezone.utc)]


def test_release_returns_to_idle():
    exchange = Exchange().associated()
    assert exchange.send(exchange.client.release()) == Released()
    assert exchange.client.state is State.IDLE


def wrapper(apdu: bytes, source=1, destination=1) -> bytes:
    return (1).to_bytes(2, "big") + source.to_bytes(2, "big") + destination.to_bytes(2, "big") \
        + len(apdu).to_bytes(2, "big") + apdu


def test_malformed_get_response_is_a_protocol_error_and_the_session_goes_on():
    exchange = Exchange().associated()
    exchange.client.get(3, "1.0.1.8.0.255", 2)
    # get-response-normal, invoke-id 1, data: double-long-unsigned with only two of its four bytes
    events = exchange.client.receive_data(wrapper(bytes.fromhex("c401c100060001")))
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert events[0].device_mrid == METER.mrid
    assert "get-response" in events[0].reason
    assert exchange.client.state is State.ASSOCIATED
    # The meter never saw that request; the association still serves the next one and releases.
    value = exchange.send(exchange.client.get(3, "1.0.1.8.1.255", 2))
    assert value == AttributeValue(meter_model.register_raw(METER.serial, "1.0.1.8.1.255", NOW))
    assert exchange.send(exchange.client.release()) == Released()


def test_answer_with_another_invoke_id_is_a_protocol_error():
    exchange = Exchange().associated()
    exchange.client.get(3, "1.0.1.8.0.255", 2)
    events = exchange.client.receive_data(wrapper(bytes.fromhex("c401c5000600000001")))
    assert isinstance(events[0], ProtocolError) and "invoke-id" in events[0].reason
    assert exchange.client.state is State.ASSOCIATED


def test_exception_response_is_a_protocol_error():
    exchange = Exchange().associated()
    exchange.client.get(3, "1.0.1.8.0.255", 2)
    events = exchange.client.receive_data(wrapper(bytes.fromhex("d80102")))
    assert isinstance(events[0], ProtocolError) and "exception-response" in events[0].reason
    assert exchange.client.state is State.ASSOCIATED


def test_broken_wrapper_header_breaks_the_session_for_good():
    exchange = Exchange().associated()
    exchange.client.get(3, "1.0.1.8.0.255", 2)
    events = exchange.client.receive_data(bytes.fromhex("0002000100010003c40100"))
    assert isinstance(events[0], ProtocolError) and "wrapper header" in events[0].reason
    assert exchange.client.state is State.BROKEN
    assert isinstance(exchange.client.receive_data(b"\x00")[0], ProtocolError)
    with pytest.raises(LocalProtocolError):
        exchange.client.release()


def test_frames_split_anywhere_are_reassembled():
    exchange = Exchange()
    answer = exchange.meter.receive_data(exchange.client.associate())
    events = []
    for byte in answer:
        events += exchange.client.receive_data(bytes([byte]))
    assert events == [Associated(1024)]


def test_unsolicited_frame_is_a_protocol_error_without_changing_state():
    exchange = Exchange().associated()
    events = exchange.client.receive_data(wrapper(bytes.fromhex("c401c1000600000001")))
    assert isinstance(events[0], ProtocolError) and "unsolicited" in events[0].reason
    assert exchange.client.state is State.ASSOCIATED


def test_requests_out_of_turn_are_refused_locally():
    session = ClientSession("m", 16, 1)
    with pytest.raises(LocalProtocolError):
        session.release()
    session.associate()
    with pytest.raises(LocalProtocolError):
        session.associate()


@pytest.mark.parametrize("octets, expected", [
    ("07e80301050c071e00000000", datetime(2024, 3, 1, 12, 7, 30, tzinfo=timezone.utc)),
    # UTC+1 local time carries deviation -60 (Blue Book sign): 13:07:30 local is 12:07:30 UTC.
    ("07e80301050d071e00ffc400", datetime(2024, 3, 1, 12, 7, 30, tzinfo=timezone.utc)),
    # deviation not specified (0x8000): taken as UTC; hundredths 0x32 = 0.5 s
    ("07e80301ff0c071e32800000", datetime(2024, 3, 1, 12, 7, 30, 500000, tzinfo=timezone.utc)),
])
def test_cosem_datetime_agrees_with_gurux(octets, expected):
    raw = bytes.fromhex(octets)
    assert cosem_datetime(raw) == expected
    if raw[9:11] != b"\x80\x00":
        assert GXDLMSClient.changeType(bytearray(raw), DataType.DATETIME).value == expected


def test_cosem_datetime_refuses_wildcards():
    with pytest.raises(ValueError):
        cosem_datetime(bytes.fromhex("ffff0301050c071e00000000"))
    with pytest.raises(ValueError):
        cosem_datetime(bytes.fromhex("07e8030105"))


@pytest.mark.parametrize("hexdata, value", [
    ("0600000010", 16),
    ("0f fd", -3),
    ("1603", 3),
    ("020212ffff09020102", [0xFFFF, b"\x01\x02"]),
    ("0100", []),
    ("0a03616263", "abc"),
    ("0301", True),
    ("00", None),
    ("040a ffc0", "1111111111"),
    ("090c07e80301050c071e00000000", bytes.fromhex("07e80301050c071e00000000")),
    ("018180" + "00" * 0x80, [None] * 0x80),  # a count in the long BER form
])
def test_axdr_decodes_cosem_data(hexdata, value):
    assert decode_data(bytes.fromhex(hexdata.replace(" ", ""))) == value


@pytest.mark.parametrize("hexdata", ["06000010", "0203 0f01 0f02", "0904 0102", "ff", "11", "060000001000"])
def test_axdr_refuses_short_long_and_unknown(hexdata):
    with pytest.raises(AxdrError):
        decode_data(bytes.fromhex(hexdata.replace(" ", "")))


def test_malformed_aare_is_a_protocol_error_and_association_can_be_retried():
    exchange = Exchange()
    exchange.client.associate()
    events = exchange.client.receive_data(wrapper(bytes.fromhex("6103a10100")))
    assert isinstance(events[0], ProtocolError) and "AARE" in events[0].reason
    assert exchange.client.state is State.IDLE
    assert exchange.send(exchange.client.associate()) == Associated(1024)


def test_block_out_of_sequence_is_a_protocol_error():
    exchange = Exchange().associated()
    exchange.client.get(7, PROFILE, 3)
    first = bytes.fromhex("c402c1 00 00000001 00 02 0102".replace(" ", ""))
    assert isinstance(exchange.client.receive_data(wrapper(first))[0], NextBlockRequest)
    third = bytes.fromhex("c402c1 01 00000003 00 02 0000".replace(" ", ""))
    events = exchange.client.receive_data(wrapper(third))
    assert isinstance(events[0], ProtocolError) and "block 3" in events[0].reason
    assert exchange.client.state is State.ASSOCIATED


def test_blocks_are_joined_before_decoding():
    exchange = Exchange().associated()
    exchange.client.get(7, PROFILE, 3)
    # array of 2 unsigned, split across two blocks in the middle of the second element
    first = bytes.fromhex("c402c1 00 00000001 00 04 01021101".replace(" ", ""))
    [next_request] = exchange.client.receive_data(wrapper(first))
    # GET-Request-Next (c0 02), same invoke-id, naming the block just received
    assert next_request.data[8:] == bytes.fromhex("c002c100000001")
    last = bytes.fromhex("c402c1 01 00000002 00 02 1102".replace(" ", ""))
    assert exchange.client.receive_data(wrapper(last)) == [AttributeValue([1, 2])]
