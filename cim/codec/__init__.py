"""XML codec of the CIM messages, one module per noun on one shared ground.

- :mod:`.document`: hardened parsing of XML from outside, schema validation, the ``CodecError``
  family (each carrying its 61968-100 Reply.Error code) and the element helpers the nouns share;
- :mod:`.envelope`: the 61968-100 Header, Reply, Error and ID, and the IdentifiedObject parts
  (Names, references) every profile uses;
- :mod:`.meter_readings`: GetMeterReadings, MeterReadingsResponseMessage, MeterReadingsFaultMessage,
  CreatedMeterReadings;
- :mod:`.end_device_events`: CreatedEndDeviceEvents and its response (no service uses it yet);
- :mod:`.end_device_controls`: the ExecuteEndDeviceControls requests (Create, Cancel, ...),
  EndDeviceControlsResponseMessage and EndDeviceControlsFaultMessage.

This package's face re-exports the names callers use, so ``from cimhes.cim.codec import parse_xml``
keeps working whichever module a function lives in.
"""

from cimhes.cim.codec.document import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_ELEMENTS,
    NS_SOAP11_ENVELOPE,
    NS_SOAP12_ENVELOPE,
    BadNoun,
    BadVerb,
    CodecError,
    DocumentTooLarge,
    HostileXml,
    InvalidRequest,
    MalformedXml,
    SchemaInvalid,
    parse_xml,
    soap_body,
    validate,
)
from cimhes.cim.codec.envelope import NS_MESSAGE
from cimhes.cim.codec.meter_readings import (
    MESSAGE_SCHEMA,
    NS_GET_METER_READINGS,
    NS_GET_METER_READINGS_MESSAGE,
    NS_METER_READINGS,
    EVENT_SCHEMA,
    NS_METER_READINGS_MESSAGE,
    decode_created_meter_readings,
    decode_fault,
    decode_get_meter_readings,
    decode_meter_readings_response,
    encode_created_meter_readings,
    encode_event_response,
    encode_fault,
    encode_get_meter_readings,
    encode_meter_readings_response,
)

__all__ = [
    "NS_MESSAGE",
    "NS_GET_METER_READINGS_MESSAGE",
    "NS_GET_METER_READINGS",
    "NS_METER_READINGS",
    "NS_SOAP11_ENVELOPE",
    "NS_SOAP12_ENVELOPE",
    "MESSAGE_SCHEMA",
    "MAX_DOCUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "CodecError",
    "MalformedXml",
    "HostileXml",
    "DocumentTooLarge",
    "SchemaInvalid",
    "BadVerb",
    "BadNoun",
    "InvalidRequest",
    "parse_xml",
    "soap_body",
    "validate",
    "decode_get_meter_readings",
    "encode_get_meter_readings",
    "encode_meter_readings_response",
    "decode_meter_readings_response",
    "encode_fault",
    "decode_fault",
    "NS_METER_READINGS_MESSAGE",
    "EVENT_SCHEMA",
    "encode_created_meter_readings",
    "decode_created_meter_readings",
    "encode_event_response",
]
