"""A-XDR codec of the meter simulator: every type against hand-written bytes, and strict decoding."""

from datetime import datetime, timezone

import pytest

from cimhes.fixtures import axdr
from cimhes.fixtures.axdr import AxdrError, BitString, Data, Tag

# (value, its encoding as written out from the A-XDR rules)
CASES = [
    (Data(Tag.NULL), "00"),
    (Data(Tag.BOOLEAN, True), "0301"),
    (Data(Tag.BOOLEAN, False), "0300"),
    (Data(Tag.BIT_STRING, BitString(12, b"\xab\xc0")), "040cabc0"),
    (Data(Tag.DOUBLE_LONG, -2), "05fffffffe"),
    (Data(Tag.DOUBLE_LONG_UNSIGNED, 4_000_000_000), "06ee6b2800"),
    (Data(Tag.OCTET_STRING, bytes.fromhex("0000010000ff")), "09060000010000ff"),
    (Data(Tag.VISIBLE_STRING, "CIMHES"), "0a06" + b"CIMHES".hex()),
    (Data(Tag.INTEGER, -1), "0fff"),
    (Data(Tag.LONG, -300), "10fed4"),
    (Data(Tag.UNSIGNED, 200), "11c8"),
    (Data(Tag.LONG_UNSIGNED, 4059), "120fdb"),
    (Data(Tag.LONG64, -1), "14ffffffffffffffff"),
    (Data(Tag.LONG64_UNSIGNED, 2**64 - 1), "15ffffffffffffffff"),
    (Data(Tag.ENUM, 30), "161e"),
    (Data(Tag.ARRAY, (Data(Tag.UNSIGNED, 1), Data(Tag.UNSIGNED, 2))), "0102110111 02".replace(" ", "")),
    (Data(Tag.STRUCTURE, (Data(Tag.INTEGER, 1), Data(Tag.ENUM, 30))), "02020f01161e"),
]


@pytest.mark.parametrize("value, encoded", CASES, ids=[str(c[0].tag.name) for c in CASES])
def test_each_type_encodes_and_decodes_as_written(value, encoded):
    assert axdr.encode(value).hex() == encoded
    assert axdr.decode_all(bytes.fromhex(encoded)) == value


@pytest.mark.parametrize("length, encoded", [(0, "00"), (127, "7f"), (128, "8180"), (255, "81ff"),
                                             (256, "820100"), (70000, "83011170")])
def test_lengths_use_ber_definite_form(length, encoded):
    assert axdr.encode_length(length).hex() == encoded
    assert axdr.decode_length(bytes.fromhex(encoded), 0) == (length, len(encoded) // 2)


def test_long_octet_string_uses_long_length_form():
    value = Data(Tag.OCTET_STRING, bytes(200))
    assert axdr.encode(value)[:3] == bytes.fromhex("0981c8")
    assert axdr.decode_all(axdr.encode(value)) == value


@pytest.mark.parametrize("raw, offset, words", [
    ("", 0, "input ended"),
    ("07", 0, "unknown or unsupported data tag 7"),
    ("06000001", 1, "truncated"),
    ("0203 1101 1102", 6, "data expected"),
    ("0980", 1, "indefinite length"),
    ("090541", 2, "truncated"),
    ("0a02410a", 3, "non-printable"),
    ("0102 1101 1201 00", 0, "same type"),
    ("1101 00", 2, "trailing"),
])
def test_decoding_errors_name_the_offset(raw, offset, words):
    with pytest.raises(AxdrError) as caught:
        axdr.decode_all(bytes.fromhex(raw.replace(" ", "")))
    assert caught.value.offset == offset
    assert words in str(caught.value)
    assert f"offset {offset}" in str(caught.value)


@pytest.mark.parametrize("value", [Data(Tag.UNSIGNED, 256), Data(Tag.INTEGER, True),
                                   Data(Tag.OCTET_STRING, "text"), Data(Tag.NULL, 0)])
def test_encoding_refuses_values_that_do_not_fit_the_type(value):
    with pytest.raises(ValueError):
        axdr.encode(value)


def test_date_time_fields_in_utc():
    at = datetime(2024, 6, 1, 12, 7, 30, 250000, tzinfo=timezone.utc)  # a Saturday
    raw = axdr.encode_date_time(at)
    assert raw.hex() == "07e8" "06" "01" "06" "0c" "07" "1e" "19" "0000" "00"
    decoded = axdr.decode_date_time(raw)
    assert decoded.deviation == 0 and decoded.clock_status == 0
    assert decoded.to_datetime() == at


def test_date_time_deviation_is_minutes_from_local_time_to_utc():
    # 13:00 local with deviation -60 (Central European Time) is 12:00 UTC.
    decoded = axdr.decode_date_time(bytes.fromhex("07e8060106 0d000000 ffc4 00".replace(" ", "")))
    assert decoded.to_datetime() == datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)


def test_date_time_unspecified_fields():
    decoded = axdr.decode_date_time(bytes.fromhex("07e80601ff0c00ffff800000"))
    assert decoded.deviation is None and decoded.day_of_week == 0xFF
    assert decoded.to_datetime() == datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        axdr.decode_date_time(bytes.fromhex("07e80601ffff00ffff800000")).to_datetime()


@pytest.mark.parametrize("raw, offset", [("07e80d01ff0c00ff00000000", 2), ("07e8060108 0c00ff00000000", 4),
                                         ("07e80601ff1800ff00000000", 5), ("07e80601ff0c00ff0003e900", 9)])
def test_date_time_out_of_range_fields_are_refused(raw, offset):
    with pytest.raises(AxdrError) as caught:
        axdr.decode_date_time(bytes.fromhex(raw.replace(" ", "")))
    assert caught.value.offset == offset
