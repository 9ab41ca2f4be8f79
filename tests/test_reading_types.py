"""The served list of reading types (GET /cim/reading-types, over real HTTP) and the documented
table (docs/reading-types.md) say exactly what the driver's catalogue holds, row by row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
import requests
from lxml import etree
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from cimhes.cim.reading_type import CIM_FIELD_NAMES
from cimhes.drivers.idis_catalogue import DEFAULT_READING_TYPES, READING_TYPE_MAP
from cimhes.endpoints.reading_types import ReadingTypesResource

DOC = Path(__file__).resolve().parent.parent / "docs" / "reading-types.md"


@pytest.fixture
def base_url():
    cim = Resource()
    cim.putChild(b"reading-types", ReadingTypesResource())
    root = Resource()
    root.putChild(b"cim", cim)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/cim/reading-types"
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.inlineCallbacks
def test_json_lists_every_catalogue_row_with_its_cosem_source(base_url):
    reply = yield deferToThread(requests.get, base_url, timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    entries = {entry["mRID"]: entry for entry in reply.json()["readingTypes"]}
    assert list(entries) == list(READING_TYPE_MAP)
    for mrid, source in READING_TYPE_MAP.items():
        entry = entries[mrid]
        assert ".".join(str(entry["parts"][name]) for name in CIM_FIELD_NAMES) == mrid
        assert (entry["cosem"]["class_id"], entry["cosem"]["obis"], entry["cosem"]["attribute"],
                entry["cosem"]["profile"]) == (source.class_id, source.obis, source.attribute,
                                               source.profile_obis)
        assert entry["source"] == source.source and entry["default"] == (mrid in DEFAULT_READING_TYPES)
    assert "0.2" in reply.json()["notes"] and "WARNING" in reply.json()["notes"]


@pytest_twisted.inlineCallbacks
def test_xml_on_request_and_a_bad_format_is_refused(base_url):
    reply = yield deferToThread(requests.get, base_url, params={"format": "xml"}, timeout=10)
    assert reply.headers["content-type"].startswith("application/xml")
    root = etree.fromstring(reply.content)
    assert [node.get("mRID") for node in root.iter("ReadingType")] == list(READING_TYPE_MAP)
    by_accept = yield deferToThread(requests.get, base_url, headers={"Accept": "application/xml"},
                                    timeout=10)
    assert by_accept.content == reply.content
    bad = yield deferToThread(requests.get, base_url, params={"format": "yaml"}, timeout=10)
    assert bad.status_code == 400


def test_the_documented_table_has_one_true_line_per_row():
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in lines] == list(READING_TYPE_MAP)
    for line, (mrid, source) in zip(lines, READING_TYPE_MAP.items()):
        assert f"{source.class_id}, {source.obis}, {source.attribute}" in line
        assert source.meaning in line and source.source in line
        if source.is_interval:
            assert source.profile_obis in line and source.derivation.name.lower() in line
