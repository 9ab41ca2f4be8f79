"""`GET /cim/reading-types`: the reading types the head-end serves, so an integrator need not guess.

One entry per row of the IDIS driver's catalogue (`cimhes.drivers.idis_catalogue.READING_TYPE_MAP`):
the ReadingType mRID and its 18 parts by CIM name, what it means, the COSEM object, attribute,
profile and column it is read from, how the value is derived, and the source of the mapping.
JSON by default; XML with `?format=xml` or an Accept header that prefers `application/xml`.
The body is built once: the catalogue is a constant.
"""
from __future__ import annotations

import dataclasses
import json

from lxml import etree
from twisted.web.resource import Resource

from cimhes.cim.reading_type import CIM_FIELD_NAMES, ReadingType
from cimhes.drivers.idis_catalogue import DEFAULT_READING_TYPES, READING_TYPE_MAP, CosemSource

NOTES = (
    "Interval types (those with a profile) are read over the request's window: rows with "
    "start < time <= end. A register type gives its present value stamped with the meter's "
    "clock, unless the window lies wholly before the clock: then the billing values its history "
    "profile captured at start <= time <= end. When the meter's history does not cover the "
    "window, what exists is returned with a Reply.Error code 0.2, level WARNING, naming the "
    "device, the reading type and how many values are missing from when."
)


def catalogue_entries() -> list[dict]:
    return [_entry(mrid, source) for mrid, source in READING_TYPE_MAP.items()]


def _entry(mrid: str, source: CosemSource) -> dict:
    parts = dataclasses.astuple(ReadingType.parse(mrid))
    return {
        "mRID": mrid,
        "meaning": source.meaning,
        "default": mrid in DEFAULT_READING_TYPES,
        "parts": dict(zip(CIM_FIELD_NAMES, parts)),
        "cosem": {
            "class_id": source.class_id,
            "obis": source.obis,
            "attribute": source.attribute,
            "profile": source.profile_obis,
            "period": source.period.value if source.period else None,
            "derivation": source.derivation.name.lower(),
            "dlms_unit": source.unit,
            "timestamp_attribute": source.timestamp_attribute,
            "history_profile": source.history_profile,
        },
        "source": source.source,
    }


def _json_body() -> bytes:
    return json.dumps({"readingTypes": catalogue_entries(), "notes": NOTES}, indent=1).encode()


def _xml_body() -> bytes:
    root = etree.Element("ReadingTypes")
    for entry in catalogue_entries():
        node = etree.SubElement(root, "ReadingType", mRID=entry["mRID"],
                                default=str(entry["default"]).lower())
        etree.SubElement(node, "meaning").text = entry["meaning"]
        parts = etree.SubElement(node, "parts")
        for name, value in entry["parts"].items():
            etree.SubElement(parts, "part", name=name).text = str(value)
        etree.SubElement(node, "cosem", {k: str(v) for k, v in entry["cosem"].items()
                                         if v is not None})
        etree.SubElement(node, "source").text = entry["source"]
    etree.SubElement(root, "notes").text = NOTES
    return etree.tostring(root, xml_declaration=True, encoding="utf-8", pretty_print=True)


class ReadingTypesResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._json = _json_body()
        self._xml = _xml_body()

    def render_GET(self, request) -> bytes:
        wanted = (request.args.get(b"format") or [b""])[0]
        accept = (request.getHeader("accept") or "").lower()
        if wanted == b"xml" or (not wanted and "xml" in accept and "json" not in accept):
            request.setHeader("content-type", "application/xml; charset=utf-8")
            return self._xml
        if wanted not in (b"", b"json"):
            request.setResponseCode(400)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"format must be json or xml\n"
        request.setHeader("content-type", "application/json")
        return self._json
