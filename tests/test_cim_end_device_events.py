"""The EndDeviceEvents codec: CreatedEndDeviceEvents round-trips, validates against the project's
schema and the standard's (the pristine 61968-9 EndDeviceEvents profile with the 2011 message
wrappers), and a vendor's CreatedEndDeviceEvents sample decodes."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from lxml import etree

from cimhes import xsd
from cimhes.cim.codec import parse_xml, soap_body
from cimhes.cim.codec.end_device_events import (
    decode_created_end_device_events,
    encode_created_end_device_events,
)
from cimhes.cim.end_device_events import EndDeviceEvent, check_event_type
from cimhes.cim.message import Header, Verb

from .schemas import _compiled, reference, sample

T = datetime(2026, 11, 20, 3, 14, 15, tzinfo=timezone.utc)
EVENTS = (
    EndDeviceEvent("m-1", T, "3.26.38.185", "0.0.99.98.0.255:1", "power down",
                   details=(("phase", "L1"),)),
    EndDeviceEvent("m-2", T, "3.31.0.68", "0.0.99.98.2.255:62", ""),
)


def _reference_schema():
    # The standard's profile (cim4, pristine) under the 2011 message wrappers of the vendor set.
    return _compiled(reference("connexo", "comu-outbound", "enddeviceevents", "xsd",
                               "EndDeviceEventsMessage.xsd"))


def test_created_end_device_events_round_trips_and_validates_everywhere():
    element = encode_created_end_device_events(
        Header(verb=Verb.CREATED, noun="EndDeviceEvents", timestamp=T), EVENTS)
    xsd.schema("EndDeviceEventsMessage.xsd").assertValid(element)
    _reference_schema().assertValid(element)
    pristine = _compiled(reference("cim4-61968-100", "xsd", "EndDeviceEvents.xsd"))
    pristine.assertValid(element.find(".//{http://iec.ch/TC57/2011/EndDeviceEvents#}EndDeviceEvents"))
    header, events = decode_created_end_device_events(etree.fromstring(etree.tostring(element)))
    assert (header.verb, header.noun) == (Verb.CREATED, "EndDeviceEvents")
    assert events == EVENTS


def test_a_vendor_sample_decodes():
    body = soap_body(parse_xml(sample("connexo_CreatedEndDeviceEvents_event.xml")))
    header, events = decode_created_end_device_events(body)
    assert header.noun == "EndDeviceEvents"
    assert events and all(e.device_mrid for e in events)


@pytest.mark.parametrize("code", ["3.26.38", "3.26.38.x", "", "3.26.38.185.1"])
def test_event_types_are_four_numbers(code):
    with pytest.raises(ValueError, match="type.domain.subDomain.eventOrAction"):
        check_event_type(code)
