"""`cimhes harness`: the integrators' test harness for IEC 61968-9 interfaces.

``cimhes harness --url BASE_URL`` runs a catalogue of scenarios against any head-end serving
GetMeterReadings at ``BASE_URL/cim/GetMeterReadings`` and ExecuteEndDeviceControls at
``BASE_URL/cim/ExecuteEndDeviceControls`` (cimhes or another): every request it sends
and every reply it gets is validated against the project's XSDs (which follow 61968-9 ed.2 and
61968-100), and each scenario checks what the standard says the reply must be. It prints one
line per scenario while it runs, a summary, and writes JUnit XML (``--junit FILE``) for CI.
Exit status: 0 all passed, 1 a scenario failed, 2 the harness could not run.

GetEndDeviceEvents's scenarios (``events-*``) are in ``endpoints/harness_events.py``.

``cimhes harness --listen PORT`` plays the head-end toward an MDM under test: it serves
GetMeterReadings at ``/cim/GetMeterReadings`` (the WSDL at ``?wsdl``), validates each request the
MDM sends and answers with a schema-valid reply (its values are samples, not a meter's), printing
a verdict per request; ``--send-created URL`` first posts a CreatedMeterReadings sample to the
MDM's ReceiveMeterReadings endpoint and checks its answer, ``--send-created-events URL`` a
CreatedEndDeviceEvents sample to its ReceiveEndDeviceEvents.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import requests
from lxml import etree

from cimhes import xsd
from cimhes.cim.codec import (
    NS_MESSAGE,
    CodecError,
    encode_created_meter_readings,
    encode_get_meter_readings,
    parse_xml,
)
from cimhes.cim.message import Header, Verb
from cimhes.cim.meter_readings import DeviceRef, GetMeterReadings, MeterReading, Reading

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
GET_ACTION = "http://iec.ch/TC57/2011/GetMeterReadings/GetMeterReadings"
CREATED_ACTION = "http://iec.ch/TC57/2011/MeterReadings/CreatedMeterReadings"
GET_SCHEMA = "GetMeterReadingsMessage.xsd"
EVENT_SCHEMA = "MeterReadingsMessage.xsd"
WRAPPER = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
PLUS_A_PROFILE = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


class ScenarioFailed(AssertionError):
    """What a scenario found wrong, in words an integrator can act on."""


@dataclass
class Outcome:
    name: str
    description: str
    passed: bool
    seconds: float
    message: str = ""


@dataclass
class Target:
    base_url: str
    session: requests.Session
    meters: list[str] = field(default_factory=list)
    timeout: float = 60.0
    # Meters the control scenario "control-switch" may really disconnect and reconnect.
    control_meters: list[str] = field(default_factory=list)

    @property
    def service(self) -> str:
        return f"{self.base_url}/cim/GetMeterReadings"


# ------------------------------------------------------------------------------ checking


def _validate(element: etree._Element, schema: str, what: str) -> None:
    compiled = xsd.schema(schema)
    if not compiled.validate(element):
        first = compiled.error_log[0]
        raise ScenarioFailed(f"{what} is not valid against {schema}: line {first.line}: "
                             f"{first.message}")


def _envelope(body: etree._Element, namespace: str = SOAP_ENV) -> bytes:
    envelope = etree.Element(f"{{{namespace}}}Envelope", nsmap={"soapenv": namespace})
    etree.SubElement(envelope, f"{{{namespace}}}Body").append(body)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def _post(target: Target, data: bytes, content_type="text/xml; charset=utf-8",
          action: str = GET_ACTION, service: str | None = None) -> tuple[int, etree._Element]:
    """POST ``data`` to ``service`` (default: the target's GetMeterReadings); (status, the
    SOAP Body's element)."""
    response = target.session.post(service or target.service, data=data,
                                   timeout=target.timeout, headers={
        "Content-Type": content_type, "SOAPAction": f'"{action}"'})
    try:
        root = parse_xml(response.content)
    except CodecError as exc:
        raise ScenarioFailed(f"HTTP {response.status_code}: the answer is not usable XML "
                             f"({exc.reason})") from None
    if root.tag != f"{{{SOAP_ENV}}}Envelope":
        raise ScenarioFailed(f"HTTP {response.status_code}: the answer is not a SOAP 1.1 "
                             f"Envelope but {root.tag}")
    body = root.find(f"{{{SOAP_ENV}}}Body")
    if body is None or len(body) != 1:
        raise ScenarioFailed("the answer's SOAP Body does not hold exactly one element")
    return response.status_code, body[0]


@dataclass(frozen=True)
class NounMessages:
    """What the harness checks an answer by, per noun: the message namespace its Response and
    Fault messages live in, the noun's name in their element names, and the schema."""

    wrapper: str
    noun: str
    schema: str


READINGS = NounMessages(WRAPPER, "MeterReadings", GET_SCHEMA)


def _reply_of(element: etree._Element, wrapper: str = WRAPPER
              ) -> tuple[str, list[tuple[str, str | None]]]:
    reply = element.find(f"{{{wrapper}}}Reply")
    result = reply.findtext(f"{{{NS_MESSAGE}}}Result")
    errors = [(e.findtext(f"{{{NS_MESSAGE}}}code"), e.findtext(f"{{{NS_MESSAGE}}}ID"))
              for e in reply.findall(f"{{{NS_MESSAGE}}}Error")]
    return result, errors


def _expect_response(status: int, element: etree._Element,
                     messages: NounMessages = READINGS) -> tuple[str, list]:
    """The answer is the noun's ResponseMessage, valid against its schema: (Result, Errors)."""
    expected = f"{messages.noun}ResponseMessage"
    if element.tag != f"{{{messages.wrapper}}}{expected}":
        raise ScenarioFailed(f"HTTP {status}: expected a {expected}, got {element.tag}")
    _validate(element, messages.schema, "the reply")
    return _reply_of(element, messages.wrapper)


def _expect_fault_or_failed(status: int, element: etree._Element, codes: set[str],
                            messages: NounMessages = READINGS) -> str:
    """The standard allows either a SOAP Fault carrying the noun's FaultMessage or a FAILED
    reply; either must carry one of ``codes``. Returns "FAILED with <the codes found>"."""
    if element.tag == f"{{{SOAP_ENV}}}Fault":
        fault = f"{messages.noun}FaultMessage"
        detail = element.find("detail")
        if detail is None or len(detail) != 1 or detail[0].tag != f"{{{messages.wrapper}}}{fault}":
            raise ScenarioFailed(f"a SOAP Fault without the WSDL's {fault} in its detail")
        _validate(detail[0], messages.schema, "the fault's detail")
        result, errors = _reply_of(detail[0], messages.wrapper)
    else:
        result, errors = _expect_response(status, element, messages)
    if result != "FAILED":
        raise ScenarioFailed(f"Result is {result}; a request that cannot be served is FAILED")
    found = {code for code, _ in errors}
    if not found & codes:
        raise ScenarioFailed(f"Error codes {sorted(found)}; expected one of {sorted(codes)} "
                             "(IEC 61968-100)")
    return f"FAILED with {', '.join(sorted(found & codes))}"


def _request(target: Target, end_devices, reading_types, start=None, end=None,
             header: Header | None = None) -> etree._Element:
    element = encode_get_meter_readings(GetMeterReadings(
        header=header or Header(verb=Verb.GET, noun="MeterReadings",
                                message_id=f"harness-{uuid.uuid4()}", source="cimhes-harness"),
        end_devices=tuple(DeviceRef(mrid=m) for m in end_devices),
        reading_types=tuple(reading_types), start=start, end=end))
    _validate(element, GET_SCHEMA, "the request the harness sends")
    return element


# ------------------------------------------------------------------------------ scenarios


def scenario_wsdl(target: Target) -> str:
    response = target.session.get(f"{target.service}?wsdl", timeout=target.timeout)
    if response.status_code != 200:
        raise ScenarioFailed(f"GET ?wsdl answered HTTP {response.status_code}")
    wsdl = parse_xml(response.content)
    actions = [op.get("soapAction") for op in wsdl.iter("{http://schemas.xmlsoap.org/wsdl/soap/}operation")]
    if GET_ACTION not in actions:
        raise ScenarioFailed(f"the WSDL has no operation with SOAP action {GET_ACTION}")
    address = wsdl.find(".//{http://schemas.xmlsoap.org/wsdl/soap/}address")
    if address is None or not address.get("location"):
        raise ScenarioFailed("the WSDL has no soap:address")
    return f"soap:address {address.get('location')}"


def _needs_meter(target: Target) -> str:
    if not target.meters:
        raise ScenarioFailed("no meter to ask for: give --meter MRID")
    return target.meters[0]


def scenario_registers(target: Target) -> str:
    meter = _needs_meter(target)
    status, element = _post(target, _envelope(_request(target, [meter], [PLUS_A])))
    result, errors = _expect_response(status, element)
    if result != "OK":
        raise ScenarioFailed(f"Result {result} with Errors {errors} for a register of {meter}")
    values = element.findall(".//{http://iec.ch/TC57/2011/MeterReadings#}Readings")
    if not values:
        raise ScenarioFailed("Result OK but no Readings in the Payload")
    return f"{len(values)} register reading(s)"


def scenario_profile(target: Target) -> str:
    meter = _needs_meter(target)
    end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    status, element = _post(target, _envelope(_request(
        target, [meter], [PLUS_A_PROFILE], end - timedelta(hours=2), end)))
    result, errors = _expect_response(status, element)
    if result not in ("OK", "PARTIAL"):
        raise ScenarioFailed(f"Result {result} with Errors {errors} for 2 h of profile")
    intervals = element.findall(".//{http://iec.ch/TC57/2011/MeterReadings#}IntervalReadings")
    return f"{len(intervals)} interval reading(s) for 2 h"


def scenario_unknown_meter(target: Target) -> str:
    status, element = _post(target, _envelope(_request(
        target, [f"harness-no-such-meter-{uuid.uuid4()}"], [PLUS_A])))
    _expect_fault_or_failed(status, element, {"2.4"})
    return "FAILED with 2.4"


def scenario_bad_reading_type(target: Target) -> str:
    element = _request(target, target.meters[:1] or ["x"], [PLUS_A])
    for mrid in element.iter("{http://iec.ch/TC57/2011/GetMeterReadings#}mRID"):
        if mrid.getparent().tag.endswith("ReadingType"):
            mrid.text = "0.0.0.1.kWh"
    status, answer = _post(target, _envelope(element))
    _expect_fault_or_failed(status, answer, {"2.6", "2.10"})
    return "refused with 2.6"


def scenario_wrong_noun(target: Target) -> str:
    element = _request(target, ["x"], [PLUS_A], header=Header(verb=Verb.GET, noun="EndDeviceEvents"))
    status, answer = _post(target, _envelope(element))
    _expect_fault_or_failed(status, answer, {"2.5"})
    return "refused with 2.5"


def scenario_wrong_verb(target: Target) -> str:
    element = _request(target, ["x"], [PLUS_A], header=Header(verb=Verb.CREATE, noun="MeterReadings"))
    status, answer = _post(target, _envelope(element))
    _expect_fault_or_failed(status, answer, {"2.9"})
    return "refused with 2.9"


def scenario_schema_invalid(target: Target) -> str:
    element = _request(target, ["x"], [PLUS_A])
    etree.SubElement(element.find(f"{{{WRAPPER}}}Request")[0],
                     "{http://iec.ch/TC57/2011/GetMeterReadings#}NotInTheSchema")
    status, answer = _post(target, _envelope(element))
    _expect_fault_or_failed(status, answer, {"1.8"})
    return "refused with 1.8"


def scenario_soap12(target: Target) -> str:
    element = _request(target, ["x"], [PLUS_A])
    response = target.session.post(target.service, data=_envelope(element, SOAP12_ENV),
                                   timeout=target.timeout, headers={
                                       "Content-Type": "text/xml; charset=utf-8",
                                       "SOAPAction": f'"{GET_ACTION}"'})
    root = parse_xml(response.content)
    code = root.findtext(f".//{{{SOAP_ENV}}}Fault/faultcode") or ""
    if not code.endswith("VersionMismatch"):
        raise ScenarioFailed(f"a SOAP 1.2 envelope got HTTP {response.status_code} "
                             f"faultcode {code or 'none'}; SOAP 1.1 prescribes VersionMismatch")
    return "VersionMismatch"


SCENARIOS: list[tuple[str, str, Callable[[Target], str]]] = [
    ("wsdl", "the WSDL is served with the standard's operation and an address", scenario_wsdl),
    ("registers", "GetMeterReadings of a register: OK with Readings", scenario_registers),
    ("profile", "GetMeterReadings of 2 h of 15-minute profile: OK or PARTIAL", scenario_profile),
    ("unknown-meter", "an unknown EndDevice: FAILED with 2.4", scenario_unknown_meter),
    ("bad-reading-type", "an invalid ReadingType: refused with 2.6", scenario_bad_reading_type),
    ("wrong-noun", "Header.Noun EndDeviceEvents: refused with 2.5", scenario_wrong_noun),
    ("wrong-verb", "Header.Verb create: refused with 2.9", scenario_wrong_verb),
    ("schema-invalid", "an element the schema does not allow: refused with 1.8",
     scenario_schema_invalid),
    ("soap12", "a SOAP 1.2 envelope: VersionMismatch fault", scenario_soap12),
]


def _with_event_scenarios() -> None:
    # GetEndDeviceEvents's and ExecuteEndDeviceControls's scenarios live in their own modules
    # (harness_events, harness_controls), which build on this one's helpers.
    from cimhes.endpoints.harness_controls import CONTROL_SCENARIOS
    from cimhes.endpoints.harness_events import EVENT_SCENARIOS

    known = {name for name, _, _ in SCENARIOS}
    SCENARIOS.extend(s for s in [*EVENT_SCENARIOS, *CONTROL_SCENARIOS] if s[0] not in known)


def run(target: Target, names: list[str] | None = None, out=sys.stdout) -> list[Outcome]:
    _with_event_scenarios()
    outcomes = []
    chosen = [s for s in SCENARIOS if not names or s[0] in names]
    for index, (name, description, scenario) in enumerate(chosen, start=1):
        print(f"[{index}/{len(chosen)}] {name}: {description} ...", end=" ", file=out, flush=True)
        started = time.monotonic()
        try:
            message = scenario(target)
            outcome = Outcome(name, description, True, time.monotonic() - started, message)
        except ScenarioFailed as exc:
            outcome = Outcome(name, description, False, time.monotonic() - started, str(exc))
        except requests.RequestException as exc:
            outcome = Outcome(name, description, False, time.monotonic() - started,
                              f"HTTP: {exc}")
        print(("PASS" if outcome.passed else "FAIL") + f" ({outcome.seconds:.2f} s) "
              f"{outcome.message}", file=out, flush=True)
        outcomes.append(outcome)
    failed = [o for o in outcomes if not o.passed]
    print(f"{len(outcomes) - len(failed)} passed, {len(failed)} failed"
          + (f": {', '.join(o.name for o in failed)}" if failed else ""), file=out)
    return outcomes


def junit_xml(outcomes: list[Outcome], suite: str) -> bytes:
    root = etree.Element("testsuite", name=suite, tests=str(len(outcomes)),
                         failures=str(sum(not o.passed for o in outcomes)), errors="0",
                         time=f"{sum(o.seconds for o in outcomes):.3f}")
    for outcome in outcomes:
        case = etree.SubElement(root, "testcase", classname=suite, name=outcome.name,
                                time=f"{outcome.seconds:.3f}")
        if not outcome.passed:
            etree.SubElement(case, "failure", message=outcome.message[:500]).text = (
                f"{outcome.description}\n{outcome.message}")
        else:
            etree.SubElement(case, "system-out").text = outcome.message
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


# ----------------------------------------------------------------------- the head-end's side


def sample_created(meter: str = "harness-sample-meter") -> etree._Element:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    element = encode_created_meter_readings(
        Header(verb=Verb.CREATED, noun="MeterReadings", timestamp=now, source="cimhes-harness",
               message_id=str(uuid.uuid4())),
        (MeterReading(meter=DeviceRef(mrid=meter),
                      readings=(Reading(PLUS_A, Decimal("1234.567"), now),)),))
    _validate(element, EVENT_SCHEMA, "the CreatedMeterReadings sample")
    return element


def send_created(url: str, session: requests.Session, timeout: float = 30.0) -> str:
    """Post a CreatedMeterReadings sample to an MDM's ReceiveMeterReadings; check its answer."""
    response = session.post(url, data=_envelope(sample_created()), timeout=timeout, headers={
        "Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{CREATED_ACTION}"'})
    root = parse_xml(response.content)
    body = root.find(f"{{{SOAP_ENV}}}Body")
    answer = body[0] if body is not None and len(body) else None
    if answer is None or answer.tag != "{http://iec.ch/TC57/2011/MeterReadingsMessage}MeterReadingsResponseMessage":
        raise ScenarioFailed(f"HTTP {response.status_code}: the MDM did not answer with a "
                             "MeterReadingsResponseMessage")
    _validate(answer, EVENT_SCHEMA, "the MDM's answer")
    return answer.findtext(f".//{{{NS_MESSAGE}}}Result")


def listen(port: int, host: str, out=sys.stdout, reactor=None) -> None:
    """Serve GetMeterReadings for an MDM under test until interrupted."""
    from twisted.internet import reactor as default_reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from cimhes.endpoints.harness_listener import HarnessHeadEnd

    reactor = reactor or default_reactor
    root, cim = Resource(), Resource()
    root.putChild(b"cim", cim)
    cim.putChild(b"GetMeterReadings", HarnessHeadEnd(out))
    listening = reactor.listenTCP(port, Site(root), interface=host)
    print(f"harness head-end listening on http://{host}:{listening.getHost().port}"
          "/cim/GetMeterReadings (WSDL at ?wsdl); Ctrl-C stops", file=out, flush=True)
    reactor.run()


def harness_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cimhes harness", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="base URL of the head-end under test (…/cim/… below it)")
    mode.add_argument("--listen", type=int, metavar="PORT",
                      help="play the head-end for an MDM under test, on this port")
    parser.add_argument("--host", default="127.0.0.1", help="interface for --listen")
    parser.add_argument("--meter", action="append", default=[], metavar="MRID",
                        help="a meter the head-end knows (for the reading scenarios)")
    parser.add_argument("--control-meter", action="append", default=[], metavar="MRID",
                        help="a meter the control-switch scenario may disconnect and reconnect")
    parser.add_argument("--user", help="HTTP Basic user for the head-end")
    parser.add_argument("--password", help="HTTP Basic password (never printed)")
    _with_event_scenarios()
    parser.add_argument("--scenario", action="append", default=None,
                        help=f"run only these ({', '.join(s[0] for s in SCENARIOS)})")
    parser.add_argument("--junit", help="write JUnit XML here")
    parser.add_argument("--send-created", metavar="URL",
                        help="with --listen: first post a CreatedMeterReadings sample here")
    parser.add_argument("--send-created-events", metavar="URL",
                        help="with --listen: first post a CreatedEndDeviceEvents sample to this "
                             "ReceiveEndDeviceEvents endpoint")
    parser.add_argument("--ca-bundle", help="PEM CAs to verify an HTTPS head-end against")
    args = parser.parse_args(argv)
    session = requests.Session()
    session.verify = args.ca_bundle or True
    if args.user:
        session.auth = (args.user, args.password or "")
    if args.listen is not None:
        if args.send_created:
            try:
                print(f"CreatedMeterReadings to {args.send_created}: Result "
                      f"{send_created(args.send_created, session)}")
            except (ScenarioFailed, requests.RequestException, CodecError) as exc:
                print(f"CreatedMeterReadings to {args.send_created}: FAIL {exc}")
                return 1
        if args.send_created_events:
            from cimhes.endpoints.harness_events import send_created_events
            try:
                print(f"CreatedEndDeviceEvents to {args.send_created_events}: Result "
                      f"{send_created_events(args.send_created_events, session)}")
            except (ScenarioFailed, requests.RequestException, CodecError) as exc:
                print(f"CreatedEndDeviceEvents to {args.send_created_events}: FAIL {exc}")
                return 1
        listen(args.listen, args.host)
        return 0
    outcomes = run(Target(args.url.rstrip("/"), session, args.meter,
                          control_meters=args.control_meter), args.scenario)
    if args.junit:
        with open(args.junit, "wb") as file:
            file.write(junit_xml(outcomes, "cimhes-harness"))
    return 0 if all(o.passed for o in outcomes) else 1
