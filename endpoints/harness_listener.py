"""The head-end side `cimhes harness --listen` plays toward an MDM under test: GetMeterReadings at
one URL, each request validated (schema, verb, noun, ReadingTypes) and answered with a schema-valid
reply of sample values, or the 61968-100 fault saying what is wrong; a verdict line per request."""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from decimal import Decimal

from lxml import etree
from twisted.web.resource import Resource

from cimhes.cim.codec import (
    CodecError,
    decode_get_meter_readings,
    encode_fault,
    encode_meter_readings_response,
    parse_xml,
    soap_body,
)
from cimhes.cim.message import Reply, ReplyResult, reply_header
from cimhes.cim.meter_readings import MeterReading, MeterReadingsResponse, Reading
from cimhes.endpoints.cim_paths import public_service_url
from cimhes.xsd import wsdl_text, xsd_text

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SAMPLE_READING_TYPE = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


def _envelope(body: etree._Element, fault: str | None = None) -> bytes:
    envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soapenv": SOAP_ENV})
    container = etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body")
    if fault is None:
        container.append(body)
    else:
        node = etree.SubElement(container, f"{{{SOAP_ENV}}}Fault")
        etree.SubElement(node, "faultcode").text = "soapenv:Client"
        etree.SubElement(node, "faultstring").text = fault
        etree.SubElement(node, "detail").append(body)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


class HarnessHeadEnd(Resource):
    isLeaf = True

    def __init__(self, out=sys.stdout):
        super().__init__()
        self._out = out
        self.verdicts: list[tuple[bool, str]] = []

    def render_GET(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        url = public_service_url(request)
        query = request.uri.decode("utf-8", "replace").partition("?")[2]
        if query.startswith("xsd="):
            return xsd_text(query[4:], url)
        return wsdl_text("GetMeterReadings.wsdl", url)

    def render_POST(self, request):
        request.setHeader("content-type", "text/xml; charset=utf-8")
        try:
            message = soap_body(parse_xml(request.content.read()))
            asked = decode_get_meter_readings(message)
        except CodecError as exc:
            self._verdict(False, f"request refused: {exc.code} {exc}")
            request.setResponseCode(500)
            return _envelope(encode_fault(Reply(ReplyResult.FAILED, errors=(exc.to_error(),))),
                             fault=exc.reason)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        types = asked.reading_types or (SAMPLE_READING_TYPE,)
        readings = tuple(MeterReading(meter=device, readings=tuple(
            Reading(code, Decimal("1234.567"), now) for code in types))
            for device in asked.end_devices)
        self._verdict(True, f"valid GetMeterReadings for {len(asked.end_devices)} EndDevice(s), "
                            f"{len(types)} ReadingType(s); answered with samples")
        return _envelope(encode_meter_readings_response(MeterReadingsResponse(
            header=reply_header(asked.header, now, source="cimhes-harness"),
            reply=Reply(ReplyResult.OK), meter_readings=readings)))

    def _verdict(self, ok: bool, text: str) -> None:
        self.verdicts.append((ok, text))
        print(("PASS " if ok else "FAIL ") + text, file=self._out, flush=True)
