"""The harness's EndDeviceEvents part: GetEndDeviceEvents scenarios against a head-end, and the
CreatedEndDeviceEvents sample ``cimhes harness --listen --send-created-events URL`` posts to an
MDM's ReceiveEndDeviceEvents.

Each scenario builds its request with the codec, validates it against
``GetEndDeviceEventsMessage.xsd`` before sending, posts it to ``BASE_URL/cim/GetEndDeviceEvents``
with the standard's SOAP action, and validates the answer (EndDeviceEventsResponseMessage, or a
SOAP Fault whose detail is the EndDeviceEventsFaultMessage) before checking what 61968-100 says
it must hold. They join the catalogue of ``endpoints/harness.py`` (``SCENARIOS``).
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import requests
from lxml import etree

from cimhes.cim.codec import NS_MESSAGE, parse_xml
from cimhes.cim.codec.end_device_events import (
    NS_END_DEVICE_EVENTS,
    NS_END_DEVICE_EVENTS_MESSAGE,
    NS_GET_END_DEVICE_EVENTS,
    NS_GET_END_DEVICE_EVENTS_MESSAGE,
    encode_created_end_device_events,
    encode_get_end_device_events,
)
from cimhes.cim.end_device_events import EndDeviceEvent, GetEndDeviceEvents
from cimhes.cim.message import Header, Verb
from cimhes.cim.meter_readings import DeviceRef
from cimhes.endpoints.harness import (
    SOAP_ENV,
    NounMessages,
    ScenarioFailed,
    Target,
    _envelope,
    _expect_fault_or_failed,
    _expect_response,
    _post,
    _validate,
)

GET_ACTION = "http://iec.ch/TC57/2011/GetEndDeviceEvents/GetEndDeviceEvents"
CREATED_ACTION = "http://iec.ch/TC57/2011/EndDeviceEvents/CreatedEndDeviceEvents"
GET_SCHEMA = "GetEndDeviceEventsMessage.xsd"
EVENT_SCHEMA = "EndDeviceEventsMessage.xsd"
WRAPPER = NS_GET_END_DEVICE_EVENTS_MESSAGE
EVENTS = NounMessages(WRAPPER, "EndDeviceEvents", GET_SCHEMA)
POWER_DOWN = "3.26.38.85"  # EndDeviceEventType of IDIS event 1 (docs/events.md)


def _service(target: Target) -> str:
    return f"{target.base_url}/cim/GetEndDeviceEvents"


def _request(meters, *, start=None, end=None, event_types=(), header: Header | None = None
             ) -> etree._Element:
    element = encode_get_end_device_events(GetEndDeviceEvents(
        header=header or Header(verb=Verb.GET, noun="EndDeviceEvents",
                                message_id=f"harness-{uuid.uuid4()}", source="cimhes-harness"),
        meters=tuple(DeviceRef(mrid=m) for m in meters), event_types=tuple(event_types),
        start=start, end=end))
    _validate(element, GET_SCHEMA, "the request the harness sends")
    return element


def _post_get(target: Target, data: bytes) -> tuple[int, etree._Element]:
    return _post(target, data, action=GET_ACTION, service=_service(target))


def scenario_events_wsdl(target: Target) -> str:
    response = target.session.get(f"{_service(target)}?wsdl", timeout=target.timeout)
    if response.status_code != 200:
        raise ScenarioFailed(f"GET ?wsdl answered HTTP {response.status_code}")
    wsdl = parse_xml(response.content)
    actions = [op.get("soapAction")
               for op in wsdl.iter("{http://schemas.xmlsoap.org/wsdl/soap/}operation")]
    if GET_ACTION not in actions:
        raise ScenarioFailed(f"the WSDL has no operation with SOAP action {GET_ACTION}")
    return "GetEndDeviceEvents with the standard's SOAP action"


def scenario_events(target: Target) -> str:
    if not target.meters:
        raise ScenarioFailed("no meter to ask for: give --meter MRID")
    end = datetime.now(timezone.utc).replace(microsecond=0)
    status, element = _post_get(target, _envelope(_request(target.meters[:1],
                                                       start=end - timedelta(days=7), end=end)))
    result, errors = _expect_response(status, element, EVENTS)
    if result != "OK":
        raise ScenarioFailed(f"Result {result} with Errors {errors} for a week of "
                             f"{target.meters[0]}'s events")
    events = element.findall(f".//{{{NS_END_DEVICE_EVENTS}}}EndDeviceEvent")
    outside = [e for e in events if not (end - timedelta(days=7)).isoformat() <= _utc(
        e.findtext(f"{{{NS_END_DEVICE_EVENTS}}}createdDateTime")) <= end.isoformat()]
    if outside:
        raise ScenarioFailed(f"{len(outside)} event(s) outside the period asked for")
    return f"{len(events)} event(s) in the last 7 days"


def _utc(text: str | None) -> str:
    value = datetime.fromisoformat((text or "").replace("Z", "+00:00"))
    return value.astimezone(timezone.utc).isoformat()


def scenario_events_unknown_meter(target: Target) -> str:
    status, element = _post_get(target, _envelope(_request([f"harness-no-such-meter-{uuid.uuid4()}"])))
    return _expect_fault_or_failed(status, element, {"2.4"}, EVENTS)


def scenario_events_bad_period(target: Target) -> str:
    end = datetime.now(timezone.utc).replace(microsecond=0)
    element = _request(target.meters[:1] or ["x"], start=end - timedelta(days=1), end=end)
    interval = element.find(f".//{{{NS_GET_END_DEVICE_EVENTS}}}scheduleInterval")
    interval.find(f"{{{NS_GET_END_DEVICE_EVENTS}}}start").text = (end + timedelta(days=1)).isoformat()
    status, answer = _post_get(target, _envelope(element))
    return _expect_fault_or_failed(status, answer, {"1.8", "2.12"}, EVENTS)


def scenario_events_bad_type(target: Target) -> str:
    element = _request(target.meters[:1] or ["x"], event_types=[POWER_DOWN])
    element.find(f".//{{{NS_GET_END_DEVICE_EVENTS}}}EndDeviceEventType/"
                 f"{{{NS_GET_END_DEVICE_EVENTS}}}mRID").text = "power-down"
    status, answer = _post_get(target, _envelope(element))
    return _expect_fault_or_failed(status, answer, {"1.8", "2.2", "2.3"}, EVENTS)


def scenario_events_wrong_verb(target: Target) -> str:
    element = _request(["x"], header=Header(verb=Verb.CREATE, noun="EndDeviceEvents"))
    status, answer = _post_get(target, _envelope(element))
    return _expect_fault_or_failed(status, answer, {"2.9"}, EVENTS)


EVENT_SCENARIOS: list[tuple[str, str, Callable[[Target], str]]] = [
    ("events-wsdl", "the GetEndDeviceEvents WSDL with the standard's operation",
     scenario_events_wsdl),
    ("events", "GetEndDeviceEvents of a meter over 7 days: OK, events in the period",
     scenario_events),
    ("events-unknown-meter", "GetEndDeviceEvents of an unknown Meter: FAILED with 2.4",
     scenario_events_unknown_meter),
    ("events-bad-period", "GetEndDeviceEvents starting after it ends: refused with 1.8",
     scenario_events_bad_period),
    ("events-bad-type", "an EndDeviceEventType not four parts: refused with 1.8",
     scenario_events_bad_type),
    ("events-wrong-verb", "GetEndDeviceEvents with Header.Verb create: refused with 2.9",
     scenario_events_wrong_verb),
]


# ----------------------------------------------------------------------- the head-end's side


def sample_created_events(meter: str = "harness-sample-meter") -> etree._Element:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    element = encode_created_end_device_events(
        Header(verb=Verb.CREATED, noun="EndDeviceEvents", timestamp=now, source="cimhes-harness",
               message_id=str(uuid.uuid4())),
        [EndDeviceEvent(meter, now - timedelta(minutes=5), POWER_DOWN, "0.0.99.98.0.255:1",
                        "power down", (("DlmsEventCode", "1"),)),
         EndDeviceEvent(meter, now, "3.26.38.49", "0.0.99.98.0.255:2", "power up",
                        (("DlmsEventCode", "2"),))])
    _validate(element, EVENT_SCHEMA, "the CreatedEndDeviceEvents sample")
    return element


def send_created_events(url: str, session: requests.Session, timeout: float = 30.0) -> str:
    """Post a CreatedEndDeviceEvents sample to an MDM's ReceiveEndDeviceEvents; check its answer
    (an EndDeviceEventsResponseMessage valid against the schema); its Result."""
    response = session.post(url, data=_envelope(sample_created_events()), timeout=timeout,
                            headers={"Content-Type": "text/xml; charset=utf-8",
                                     "SOAPAction": f'"{CREATED_ACTION}"'})
    root = parse_xml(response.content)
    body = root.find(f"{{{SOAP_ENV}}}Body")
    answer = body[0] if body is not None and len(body) else None
    if answer is None or answer.tag != f"{{{NS_END_DEVICE_EVENTS_MESSAGE}}}EndDeviceEventsResponseMessage":
        raise ScenarioFailed(f"HTTP {response.status_code}: the MDM did not answer with an "
                             "EndDeviceEventsResponseMessage")
    _validate(answer, EVENT_SCHEMA, "the MDM's answer")
    return answer.findtext(f".//{{{NS_MESSAGE}}}Result")
