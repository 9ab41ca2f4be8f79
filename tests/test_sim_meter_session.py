"""MeterSession driven by bytes alone: requests written out from the DLMS/COSEM standards' encodings."""

import struct
from datetime import datetime, timedelta, timezone

import pytest

from cimhes.fixtures import axdr, meter_model
from cimhes.fixtures.axdr import Tag
from cimhes.fixtures.meter_model import meter_identity, profile_rows, register_raw
from cimhes.fixtures.meter_session import (
    Associated,
    AssociationRejected,
    MeterSession,
    ProtocolViolation,
    Released,
    State,
)

UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 7, 30, tzinfo=UTC)
METER = meter_identity(3)

# AARQ: application-context LN no ciphering, sender-acse-requirements authentication,
# mechanism low (2.16.756.5.8.2.1), password "12345678", InitiateRequest (no dedicated key, DLMS 6,
# conformance 007E1F, client max receive PDU size 0xFFFF).
CONTEXT = "a109060760857405080101"
INITIATE = "be10040e01000000065f1f0400007e1fffff"
AARQ_LOW = "6036" + CONTEXT + "8a020780" + "8b0760857405080201" + "ac0a8008" + b"12345678".hex() + INITIATE
AARQ_WRONG_PASSWORD = AARQ_LOW.replace(b"12345678".hex(), b"12345679".hex())
AARQ_LOWEST = "601d" + CONTEXT + INITIATE
AARE_ACCEPTED = ("6129" + CONTEXT + "a203020100" + "a305a103020100"
                 # InitiateResponse: DLMS 6, negotiated conformance 001C1D (block transfer with
                 # get, set and action, get, set, selective-access, action), server max PDU
                 # 1024, vaa-name 7
                 + "be10040e0800065f1f0400001c1d04000007")
RLRQ = "6203800100"
GET_CLOCK_TIME = "c001c1" "0008" "0000010000ff" "02" "00"


def frame(apdu_hex: str, client: int = 1) -> bytes:
    apdu = bytes.fromhex(apdu_hex.replace(" ", ""))
    return struct.pack(">HHHH", 1, client, 1, len(apdu)) + apdu


def unframe(data: bytes, client: int = 1) -> bytes:
    version, source, destination, length = struct.unpack_from(">HHHH", data)
    assert (version, source, destination, length) == (1, 1, client, len(data) - 8)
    return data[8:]


def ask(session: MeterSession, apdu_hex: str, client: int = 1) -> bytes:
    return unframe(session.receive_data(frame(apdu_hex, client)), client)


def events(session: MeterSession) -> list:
    found = []
    while (event := session.next_event()) is not None:
        found.append(event)
    return found


@pytest.fixture
def session() -> MeterSession:
    return MeterSession(METER, clock=lambda: NOW)


@pytest.fixture
def associated(session) -> MeterSession:
    assert ask(session, AARQ_LOW).hex() == AARE_ACCEPTED
    events(session)
    return session


def get_normal(class_id: int, obis: str, attribute: int, selection: str = "00") -> str:
    return f"c001c1{class_id:04x}{meter_model_obis(obis)}{attribute:02x}{selection}"


def meter_model_obis(obis: str) -> str:
    return bytes(int(part) for part in obis.split(".")).hex()


def range_selection(start: datetime, end: datetime) -> str:
    clock_column = "0204" "120008" "09060000010000ff" "0f02" "120000"
    return ("01" "01" "0204" + clock_column + "090c" + axdr.encode_date_time(start).hex()
            + "090c" + axdr.encode_date_time(end).hex() + "0100")


# --- association -------------------------------------------------------------------------------

def test_low_level_security_association_is_accepted(session):
    assert ask(session, AARQ_LOW).hex() == AARE_ACCEPTED
    assert session.state is State.ASSOCIATED
    assert events(session) == [Associated(client_sap=1, mechanism=1)]


def test_public_client_associates_with_lowest_security(session):
    assert ask(session, AARQ_LOWEST, client=16).hex() == AARE_ACCEPTED
    assert events(session) == [Associated(client_sap=16, mechanism=0)]
    assert ask(session, GET_CLOCK_TIME, client=16)[:4].hex() == "c401c100"


def test_wrong_password_is_rejected_permanently_with_authentication_failure(session):
    assert ask(session, AARQ_WRONG_PASSWORD).hex() == "6117" + CONTEXT + "a203020101" + "a305a10302010d"
    assert events(session) == [AssociationRejected(client_sap=1, diagnostic=13)]
    assert session.state is State.IDLE
    # no association, no data: ExceptionResponse service-not-allowed / operation-not-possible
    assert ask(session, GET_CLOCK_TIME).hex() == "d80101"


@pytest.mark.parametrize("client, aarq, diagnostic", [
    (1, AARQ_LOWEST, 12),  # management client without a mechanism: mechanism name required
    (16, AARQ_LOW, 11),  # public client offering LLS: not its mechanism
    (1, AARQ_LOW.replace("8b0760857405080201", "8b0760857405080205"), 11),  # HLS GMAC not offered
    (1, AARQ_LOW.replace(CONTEXT, "a109060760857405080102"), 2),  # short-name referencing
    (1, AARQ_LOW.replace("8a020780", "8a020700"), 14),  # mechanism without the authentication unit
])
def test_refusals_carry_the_acse_diagnostic(session, client, aarq, diagnostic):
    aare = ask(session, aarq, client)
    assert aare[0] == 0x61 and bytes.fromhex("a203020101" f"a305a1030201{diagnostic:02x}") in aare


def test_initiate_with_old_dlms_version_is_refused_with_an_initiate_error(session):
    aare = ask(session, AARQ_LOW.replace("065f1f04", "055f1f04"))
    assert aare.hex().endswith("a203020101" "a305a103020101" "be0604040e010601")


def test_a_second_aarq_during_an_association_is_not_allowed(associated):
    assert ask(associated, AARQ_LOW).hex() == "d80101"
    assert associated.state is State.ASSOCIATED


# --- GET -----------------------------------------------------------------------------------------

def test_clock_reads_the_injected_time_in_utc(associated):
    response = ask(associated, GET_CLOCK_TIME)
    assert response.hex() == "c401c100" "090c" "07e8060106" "0c071e00" "0000" "00"
    assert ask(associated, get_normal(8, "0.0.1.0.0.255", 1)).hex() == "c401c100" "09060000010000ff"
    assert ask(associated, get_normal(8, "0.0.1.0.0.255", 3)).hex() == "c401c100" "100000"
    assert ask(associated, get_normal(8, "0.0.1.0.0.255", 4)).hex() == "c401c100" "1100"


@pytest.mark.parametrize("obis, scaler_unit", meter_model.SCALER_UNIT.items())
def test_each_register_reads_the_model_value_and_scaler_unit(associated, obis, scaler_unit):
    value = ask(associated, get_normal(3, obis, 2))
    assert value[:5].hex() == "c401c10006"
    assert struct.unpack(">I", value[5:])[0] == register_raw(METER.serial, obis, NOW)
    scaler, unit = scaler_unit
    assert ask(associated, get_normal(3, obis, 3)).hex() == f"c401c100" "0202" f"0f{scaler & 0xFF:02x}" f"16{unit:02x}"
    assert ask(associated, get_normal(3, obis, 1)).hex() == "c401c100" "0906" + meter_model_obis(obis)


@pytest.mark.parametrize("request_hex, result", [
    (get_normal(3, "1.0.3.8.0.255", 2), 4),  # object-undefined
    (get_normal(1, "1.0.1.8.0.255", 2), 9),  # object-class-inconsistent
    (get_normal(3, "1.0.1.8.0.255", 4), 4),  # no such attribute
    (get_normal(8, "0.0.1.0.0.255", 5), 4),
    (get_normal(3, "1.0.1.8.0.255", 2, range_selection(NOW, NOW)), 250),  # selective access on a register
])
def test_unreadable_attributes_answer_a_data_access_result(associated, request_hex, result):
    assert ask(associated, request_hex).hex() == f"c401c101{result:02x}"


def read_blocks(session: MeterSession, request_hex: str, limit: int = 1024) -> bytes:
    """Reassemble a GET-Response-With-Datablock transfer, checking every block's framing."""
    response = ask(session, request_hex)
    raw, expected_block = b"", 1
    while True:
        assert len(response) <= limit
        assert response[:3].hex() == "c402c1"
        last, number = response[3], struct.unpack_from(">I", response, 4)[0]
        assert number == expected_block and response[8] == 0x00  # raw-data
        length, start = axdr.decode_length(response, 9)
        assert start + length == len(response)
        raw += response[start:]
        if last:
            return raw
        response = ask(session, f"c002c1{number:08x}")
        expected_block += 1


def test_profile_by_range_returns_exactly_the_rows_of_24_hours_in_blocks(associated):
    start = datetime(2024, 5, 31, 12, 15, tzinfo=UTC)
    end = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    raw = read_blocks(associated, get_normal(7, "1.0.99.1.0.255", 2, range_selection(start, end)))
    buffer = axdr.decode_all(raw)
    assert buffer.tag is Tag.ARRAY and len(buffer.value) == 96
    expected = profile_rows(METER.serial, start, end)
    for row, (at, imported, exported) in zip(buffer.value, expected):
        stamp, import_total, export_total = row.value
        assert axdr.decode_date_time(stamp.value).to_datetime() == at
        assert (import_total.tag, import_total.value) == (Tag.DOUBLE_LONG_UNSIGNED, imported)
        assert (export_total.tag, export_total.value) == (Tag.DOUBLE_LONG_UNSIGNED, exported)
    assert expected[0][0] == start and expected[-1][0] == end


def test_profile_range_is_clipped_to_history_and_now(associated):
    selection = range_selection(NOW - timedelta(days=40), NOW + timedelta(days=1))
    buffer = axdr.decode_all(read_blocks(associated, get_normal(7, "1.0.99.1.0.255", 2, selection)))
    first, last = (axdr.decode_date_time(row.value[0].value).to_datetime()
                   for row in (buffer.value[0], buffer.value[-1]))
    assert first == datetime(2024, 4, 27, 12, 15, tzinfo=UTC)  # first boundary >= now - 35 days
    assert last == datetime(2024, 6, 1, 12, 0, tzinfo=UTC)  # last boundary reached


def test_the_row_of_now_exists_once_its_boundary_is_reached():
    at_boundary = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    for now, last_row in ((at_boundary - timedelta(seconds=1), at_boundary - timedelta(minutes=15)),
                          (at_boundary, at_boundary)):
        session = MeterSession(METER, clock=lambda now=now: now)
        ask(session, AARQ_LOW)
        selection = range_selection(at_boundary - timedelta(hours=1), at_boundary)
        raw = ask(session, get_normal(7, "1.0.99.1.0.255", 2, selection))[4:]
        rows = axdr.decode_all(raw).value
        assert axdr.decode_date_time(rows[-1].value[0].value).to_datetime() == last_row


def test_profile_selected_columns(associated):
    start = datetime(2024, 6, 1, 11, 0, tzinfo=UTC)
    export_column = "0204" "120003" "09060100020800ff" "0f02" "120000"
    selection = range_selection(start, start + timedelta(minutes=30))[:-4] + "0101" + export_column
    rows = axdr.decode_all(ask(associated, get_normal(7, "1.0.99.1.0.255", 2, selection))[4:]).value
    expected = profile_rows(METER.serial, start, start + timedelta(minutes=30))
    assert [row.value[0].value for row in rows] == [exported for _, _, exported in expected]


def test_profile_attributes(associated):
    def read(attribute):
        return ask(associated, get_normal(7, "1.0.99.1.0.255", attribute))[4:]
    capture = axdr.decode_all(read(3)).value
    assert [(c.value[0].value, c.value[1].value.hex(), c.value[2].value, c.value[3].value) for c in capture] == [
        (8, "0000010000ff", 2, 0), (3, "0100010800ff", 2, 0), (3, "0100020800ff", 2, 0)]
    assert read(4).hex() == "0600000384"  # 900 s
    assert read(5).hex() == "1601"  # fifo
    assert read(6).hex() == "0204" "120000" "0906000000000000" "0f00" "120000"
    assert read(7).hex() == f"06{35 * 96:08x}"
    assert read(8).hex() == f"06{35 * 96 + 1:08x}"


def test_whole_buffer_without_selective_access_is_35_days(associated):
    buffer = axdr.decode_all(read_blocks(associated, get_normal(7, "1.0.99.1.0.255", 2)))
    assert len(buffer.value) == 35 * 96


def test_block_size_follows_the_clients_smaller_pdu_size(session):
    ask(session, AARQ_LOW.replace("7e1fffff", "7e1f0100"))  # client max receive PDU 256
    start = datetime(2024, 6, 1, 0, 0, tzinfo=UTC)
    selection = range_selection(start, start + timedelta(hours=4))
    raw = read_blocks(session, get_normal(7, "1.0.99.1.0.255", 2, selection), limit=256)
    assert len(axdr.decode_all(raw).value) == 17


def test_get_next_without_or_out_of_sequence_is_refused(associated):
    # no long GET in progress (16), then a wrong block number (19) aborts the transfer
    assert ask(associated, "c002c100000001").hex() == "c402c101" "00000001" "0110"
    request = get_normal(7, "1.0.99.1.0.255", 2, range_selection(NOW - timedelta(days=1), NOW))
    assert ask(associated, request)[3:8].hex() == "0000000001"
    assert ask(associated, "c002c100000005").hex() == "c402c101" "00000005" "0113"
    assert ask(associated, "c002c100000001").hex() == "c402c101" "00000001" "0110"


# --- framing, errors, release -------------------------------------------------------------------

def test_partial_frames_are_buffered_until_complete(associated):
    data = frame(GET_CLOCK_TIME) * 2
    out = b"".join(associated.receive_data(data[i:i + 1]) for i in range(len(data)))
    assert len(out) == 2 * (8 + 18)
    assert unframe(out[:26])[:4].hex() == "c401c100"


def test_a_broken_wrapper_header_is_reported_and_the_session_still_answers(associated):
    assert associated.receive_data(bytes.fromhex("0002 0001 0001 0003 c00101")) == b""
    [violation] = events(associated)
    assert isinstance(violation, ProtocolViolation) and "wrapper version 2" in violation.reason
    assert ask(associated, GET_CLOCK_TIME)[:4].hex() == "c401c100"


def test_an_undecodable_apdu_gets_an_exception_response_and_the_session_still_answers(associated):
    assert ask(associated, "c001c10008000001").hex() == "d80103"  # truncated GET-Request-Normal
    assert ask(associated, get_normal(7, "1.0.99.1.0.255", 2, "01 01 09 05 00").replace(" ", "")).hex() == "d80103"
    assert ask(associated, "c8").hex() == "d80202"  # SET-Response is not a request a meter serves
    reasons = [event.reason for event in events(associated)]
    assert "offset" in reasons[0] and "truncated" in reasons[1] and "0xC8" in reasons[2]
    assert ask(associated, GET_CLOCK_TIME)[:4].hex() == "c401c100"


def test_frames_for_another_wport_or_too_long_are_dropped(associated):
    assert associated.receive_data(struct.pack(">HHHH", 1, 1, 2, 3) + b"\xc0\x01\xc1") == b""
    oversize = struct.pack(">HHHH", 1, 1, 1, 2000) + bytes(2000)
    assert associated.receive_data(oversize[:1000]) == b""
    assert associated.receive_data(oversize[1000:] + frame(GET_CLOCK_TIME))[8:12].hex() == "c401c100"
    assert [type(e) for e in events(associated)] == [ProtocolViolation, ProtocolViolation]


def test_release_ends_the_association(associated):
    assert ask(associated, RLRQ).hex() == "6303800100"
    assert events(associated) == [Released(client_sap=1)]
    assert associated.state is State.RELEASED
    assert ask(associated, GET_CLOCK_TIME).hex() == "d80101"
    assert ask(associated, AARQ_LOW).hex() == AARE_ACCEPTED  # a new association may follow


def test_only_the_associated_client_is_served(associated):
    assert ask(associated, GET_CLOCK_TIME, client=16).hex() == "d80101"
