"""ReadingType: the 18-part ed.2 code parses into named fields, prints back, and bad codes say what is wrong."""

import pytest

from cimhes.cim.reading_type import CIM_FIELD_NAMES, ReadingType

# The reading types of the shared contract, with the fields that make each one what it is.
CONTRACT_READING_TYPES = [
    ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", dict(accumulation=1, flow_direction=1, tou=0)),
    ("0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0", dict(accumulation=1, flow_direction=19, tou=0)),
    ("0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0", dict(flow_direction=1, tou=1)),
    ("0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0", dict(flow_direction=1, tou=2)),
    ("0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", dict(measuring_period=2, flow_direction=1)),
    ("0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0", dict(measuring_period=2, flow_direction=19)),
]


@pytest.mark.parametrize("code, fields", CONTRACT_READING_TYPES)
def test_contract_reading_types_parse_and_print_back(code, fields):
    reading_type = ReadingType.parse(code)
    for name, value in fields.items():
        assert getattr(reading_type, name) == value
    assert reading_type.commodity == 1
    assert reading_type.measurement_kind == 12
    assert reading_type.multiplier == 3
    assert reading_type.unit == 72
    assert str(reading_type) == code
    assert reading_type.mrid == code


def test_fields_are_in_ed2_code_order():
    code = ".".join(str(n) for n in range(1, 19))
    reading_type = ReadingType.parse(code)
    assert (reading_type.macro_period, reading_type.aggregate, reading_type.measuring_period) == (1, 2, 3)
    assert (reading_type.interharmonic_numerator, reading_type.interharmonic_denominator) == (8, 9)
    assert (reading_type.argument_numerator, reading_type.argument_denominator) == (10, 11)
    assert (reading_type.tou, reading_type.cpp, reading_type.consumption_tier) == (12, 13, 14)
    assert (reading_type.phases, reading_type.multiplier, reading_type.unit, reading_type.currency) == (15, 16, 17, 18)
    assert len(CIM_FIELD_NAMES) == 18


def test_negative_multiplier_is_a_power_of_ten():
    assert ReadingType.parse("0.0.0.0.0.1.54.0.0.0.0.0.0.0.0.-3.29.0").multiplier == -3


def test_built_from_fields_prints_the_code():
    assert str(ReadingType(measuring_period=2, accumulation=1, flow_direction=1, commodity=1,
                           measurement_kind=12, multiplier=3, unit=72)) == "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


def test_equal_codes_are_equal_and_hashable():
    assert ReadingType.parse("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0") == ReadingType.parse("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0")
    assert len({ReadingType.parse("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0")} | {ReadingType(accumulation=1, flow_direction=1, commodity=1, measurement_kind=12, multiplier=3, unit=72)}) == 1


@pytest.mark.parametrize(
    "code, message",
    [
        ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.3.72.0", "has 17 parts"),
        ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0.0", "has 19 parts"),
        ("", "has 1 parts"),
        ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.Wh.0", r"part 17 \(unit\) is 'Wh'"),
        ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3..0", r"part 17 \(unit\) is ''"),
        ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.+3.72.0", r"part 16 \(multiplier\)"),
        (" 0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", r"part 1 \(macroPeriod\)"),
        ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.7\u00b2.0", r"part 17"),
    ],
)
def test_bad_codes_are_refused_with_what_is_wrong(code, message):
    with pytest.raises(ValueError, match=message):
        ReadingType.parse(code)


def test_a_non_string_is_refused():
    with pytest.raises(ValueError, match="string"):
        ReadingType.parse(None)


def test_fields_must_be_ints():
    with pytest.raises(TypeError, match="unit"):
        ReadingType(unit="72")
