"""The project's own XSDs and WSDL: they load (locally, with lxml, xmlschema and zeep), serve over HTTP,
and describe exactly the structure and operation of the standard's GetMeterReadings contracts."""

from urllib.parse import unquote

import pytest
import xmlschema
import zeep
from lxml import etree
from zeep.transports import Transport

from cimhes import xsd

from .schemas import reference

SERVICE = "http://hes.example:8080/cim/GetMeterReadings"
# The schemas the GetMeterReadings WSDL imports, directly or not (the others serve other WSDLs).
GET_METER_READINGS_SCHEMAS = {"Message.xsd", "GetMeterReadings.xsd", "MeterReadings.xsd",
                              "GetMeterReadingsMessage.xsd"}
WRAPPER = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
TNS = "http://iec.ch/TC57/2011/GetMeterReadings"


# ------------------------------------------------------------------------------------------- loader


def test_documents_are_the_contract_files():
    assert xsd.DOCUMENTS == {"Message.xsd", "GetMeterReadings.xsd", "MeterReadings.xsd",
                             "GetMeterReadingsMessage.xsd", "GetMeterReadings.wsdl",
                             "ReplyMeterReadings.wsdl", "MeterReadingsMessage.xsd",
                             "ReceiveMeterReadings.wsdl", "EndDeviceEvents.xsd",
                             "EndDeviceEventsMessage.xsd", "GetEndDeviceEvents.xsd",
                             "GetEndDeviceEventsMessage.xsd", "GetEndDeviceEvents.wsdl",
                             "ReplyEndDeviceEvents.wsdl", "ReceiveEndDeviceEvents.wsdl",
                             "EndDeviceControls.xsd", "EndDeviceControlsMessage.xsd",
                             "ExecuteEndDeviceControls.wsdl", "ReplyEndDeviceControls.wsdl"}


def _soap_actions(path) -> dict[str, str]:
    tree = etree.parse(str(path))
    return {op.getparent().get("name"): op.get("soapAction")
            for op in tree.iter("{http://schemas.xmlsoap.org/wsdl/soap/}operation")}


def test_receive_meter_readings_has_the_standards_operation_and_action():
    ours = _soap_actions(xsd.path("ReceiveMeterReadings.wsdl"))
    theirs = _soap_actions(reference("connexo", "coko-outbound", "meterreadings",
                                     "SendMeterReadings.wsdl"))
    assert ours == {"CreatedMeterReadings": theirs["CreatedMeterReadings"]}
    for name in ("ReceiveMeterReadings.wsdl", "ReplyMeterReadings.wsdl"):
        client = zeep.Client(str(xsd.path(name)))
        assert len(client.wsdl.services) == 1


@pytest.mark.parametrize("name", ["../xsd/Message.xsd", "/etc/passwd", "__init__.py", "message.xsd", ""])
def test_only_known_documents_are_found(name):
    with pytest.raises(xsd.UnknownDocument):
        xsd.path(name)


@pytest.mark.parametrize("name", sorted(n for n in xsd.DOCUMENTS if n.endswith(".xsd")))
def test_every_schema_compiles_with_lxml_and_xmlschema(name):
    assert isinstance(xsd.schema(name), etree.XMLSchema)
    assert xsd.schema(name) is xsd.schema(name)  # compiled once
    xmlschema.XMLSchema(str(xsd.path(name)), allow="sandbox")  # sandbox: only files in this folder


def test_served_wsdl_names_the_service_url_and_served_schemas():
    served = etree.fromstring(xsd.wsdl_text("GetMeterReadings.wsdl", SERVICE))
    ns = {"soap": "http://schemas.xmlsoap.org/wsdl/soap/", "xs": "http://www.w3.org/2001/XMLSchema"}
    assert served.xpath("//soap:address/@location", namespaces=ns) == [SERVICE]
    assert served.xpath("//xs:import/@schemaLocation", namespaces=ns) == [f"{SERVICE}?xsd=GetMeterReadingsMessage.xsd"]
    message = etree.fromstring(xsd.xsd_text("GetMeterReadingsMessage.xsd", SERVICE))
    assert sorted(message.xpath("//xs:import/@schemaLocation", namespaces=ns)) == [
        f"{SERVICE}?xsd=GetMeterReadings.xsd", f"{SERVICE}?xsd=Message.xsd", f"{SERVICE}?xsd=MeterReadings.xsd"]


def test_only_wsdls_are_served_as_wsdl():
    with pytest.raises(xsd.UnknownDocument):
        xsd.wsdl_text("Message.xsd", SERVICE)


# -------------------------------------------------------------------------------------------- zeep


class ServedByTheEndpoint(Transport):
    """Answers zeep's HTTP loads the way the SOAP endpoint does: ?wsdl and ?xsd=<name>."""

    def __init__(self):
        super().__init__()
        self.loaded = []

    def load(self, url):
        self.loaded.append(url)
        assert url.startswith(SERVICE + "?"), f"zeep asked for {url}, which the endpoint does not serve"
        query = url[len(SERVICE):]
        if query == "?wsdl":
            return xsd.wsdl_text("GetMeterReadings.wsdl", SERVICE)
        assert query.startswith("?xsd="), url
        return xsd.xsd_text(unquote(query[len("?xsd="):]), SERVICE)


def describe(client: zeep.Client) -> dict:
    """What a client generated from the WSDL sees: the operation, its action and its wrapper elements."""
    (binding,) = client.wsdl.bindings.values()
    operation = binding.get("GetMeterReadings")
    (fault,) = operation.faults.values()
    (fault_part,) = fault.abstract.parts.values()
    (service,) = client.wsdl.services.values()
    return {
        "binding": binding.name,
        "port type": binding.port_type.name,
        "style": "document",
        "soap action": operation.soapaction,
        "input": operation.input.body.qname,
        "output": operation.output.body.qname,
        "fault": (fault.name, fault_part.element.qname),
        "service": (service.name, sorted(service.ports)),
    }


EXPECTED = {
    "binding": f"{{{TNS}}}GetMeterReadings_Binding",
    "port type": f"{{{TNS}}}GetMeterReadings_Port",
    "style": "document",
    "soap action": "http://iec.ch/TC57/2011/GetMeterReadings/GetMeterReadings",
    "input": f"{{{WRAPPER}}}GetMeterReadings",
    "output": f"{{{WRAPPER}}}MeterReadingsResponseMessage",
    "fault": ("GetMeterReadingsFault", f"{{{WRAPPER}}}MeterReadingsFaultMessage"),
    "service": ("GetMeterReadings", ["GetMeterReadings_Port"]),
}


def normalised(description: dict) -> dict:
    return {key: (str(value) if hasattr(value, "namespace") else value) for key, value in description.items()}


def test_our_wsdl_loads_with_zeep_and_has_the_contract_operation():
    client = zeep.Client(wsdl=str(xsd.path("GetMeterReadings.wsdl")))
    assert normalised(describe(client)) == EXPECTED
    assert client.wsdl.bindings[f"{{{TNS}}}GetMeterReadings_Binding"].__class__.__name__ == "Soap11Binding"


def test_served_wsdl_loads_with_zeep_over_http():
    transport = ServedByTheEndpoint()
    client = zeep.Client(wsdl=f"{SERVICE}?wsdl", transport=transport)
    assert normalised(describe(client)) == EXPECTED
    assert client.service._binding_options["address"] == SERVICE
    assert set(transport.loaded) == {f"{SERVICE}?wsdl"} | {
        f"{SERVICE}?xsd={name}" for name in xsd.DOCUMENTS
        if name.endswith(".xsd") and name in GET_METER_READINGS_SCHEMAS}


def test_reference_wsdl_describes_the_same_operation():
    ours = describe(zeep.Client(wsdl=str(xsd.path("GetMeterReadings.wsdl"))))
    theirs = describe(zeep.Client(wsdl=str(reference("connexo-2014-metering-cim", "wsdl", "GetMeterReadings.wsdl"))))
    assert normalised(ours) == normalised(theirs)


def test_zeep_builds_a_request_our_codec_decodes():
    from cimhes.cim import codec

    client = zeep.Client(wsdl=str(xsd.path("GetMeterReadings.wsdl")))
    envelope = client.create_message(
        client.service, "GetMeterReadings",
        Header={"Verb": "get", "Noun": "MeterReadings"},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": "m-1"}],
                                      "ReadingType": [{"mRID": "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"}]}},
    )
    request = codec.decode_get_meter_readings(codec.soap_body(codec.parse_xml(etree.tostring(envelope))))
    assert request.end_devices[0].mrid == "m-1"
    assert request.reading_types == ("0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0",)


# ------------------------------------------------------------------- structure against the standard


def shape(component):
    """The structure of a schema component as it constrains instances, independent of how it is written:
    element names, order, occurrences, types (by structure, not name), wildcards and attributes."""
    if isinstance(component, xmlschema.validators.XsdElement):
        return ("element", component.name, component.min_occurs, component.max_occurs, type_shape(component.type))
    if isinstance(component, xmlschema.validators.XsdAnyElement):
        return ("any", tuple(component.namespace), component.process_contents, component.min_occurs, component.max_occurs)
    if isinstance(component, xmlschema.validators.XsdGroup):
        particles = []
        for particle in component:
            inner = shape(particle)
            # a referenced sequence group occurring once is the same as its particles written in place
            if inner[0] == "sequence" and component.model == "sequence" and inner[1:3] == (1, 1):
                particles.extend(inner[3])
            else:
                particles.append(inner)
        return (component.model, component.min_occurs, component.max_occurs, tuple(particles))
    raise TypeError(component)


def type_shape(xsd_type):
    if xsd_type.is_simple():
        enumeration = getattr(xsd_type, "enumeration", None) or ()
        primitive = getattr(xsd_type, "primitive_type", xsd_type)
        return ("simple", primitive.name, tuple(enumeration))
    attributes = tuple(sorted(
        (name, attribute.use, type_shape(attribute.type)) for name, attribute in xsd_type.attributes.items()))
    content = xsd_type.content
    body = type_shape(content) if xsd_type.has_simple_content() else shape(content)
    return ("complex", attributes, body)


def load(location) -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(location), allow="sandbox")


def global_element_shapes(schema: xmlschema.XMLSchema, namespace: str) -> dict:
    return {name: shape(element) for name, element in schema.maps.elements.items() if name.startswith(f"{{{namespace}}}")}


@pytest.mark.parametrize(
    "our_file, reference_parts, namespaces",
    [
        ("Message.xsd", ("cim4-61968-100", "xsd", "Message.xsd"), ["http://iec.ch/TC57/2011/schema/message"]),
        ("GetMeterReadings.xsd", ("connexo-2014-metering-cim", "GetMeterReadings.xsd"), ["http://iec.ch/TC57/2011/GetMeterReadings#"]),
        ("MeterReadings.xsd", ("connexo-2014-metering-cim", "MeterReadings.xsd"), ["http://iec.ch/TC57/2011/MeterReadings#"]),
        ("GetMeterReadingsMessage.xsd", ("connexo-2014-metering-cim", "GetMeterReadingsMessage.xsd"), [WRAPPER]),
        ("EndDeviceControls.xsd", ("cim4-61968-100", "xsd", "EndDeviceControls.xsd"), ["http://iec.ch/TC57/2011/EndDeviceControls#"]),
    ],
)
def test_our_schema_has_the_standard_structure(our_file, reference_parts, namespaces):
    ours, theirs = load(xsd.path(our_file)), load(reference(*reference_parts))
    for namespace in namespaces:
        our_shapes, their_shapes = global_element_shapes(ours, namespace), global_element_shapes(theirs, namespace)
        assert our_shapes.keys() == their_shapes.keys()
        for name in our_shapes:
            assert our_shapes[name] == their_shapes[name], f"{name} differs from the standard"
