"""EndDeviceControls in the CIM layer: the control-type table row by row, and the codec of the
ExecuteEndDeviceControls messages against the project's schema and the reference ones."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from lxml import etree

from cimhes.cim.codec import CodecError, parse_xml
from cimhes.cim.codec import end_device_controls as codec
from cimhes.cim.end_device_controls import (
    END_DEVICE_CONTROL_TYPES,
    ControlAction,
    ControlParameters,
    EndDeviceControl,
    EndDeviceControlsRequest,
    EndDeviceControlsResponse,
    UnknownControlType,
    action_for,
    code_for,
)
from cimhes.cim.message import Error, ErrorCode, Header, IdKind, ObjectId, Reply, ReplyResult
from cimhes.cim.meter_readings import DeviceRef, Name

from .schemas import assert_controls_valid_everywhere

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize("code, action", [
    ("3.31.0.18", ControlAction.CONNECT),
    ("3.31.0.23", ControlAction.DISCONNECT),
    ("3.31.0.5", ControlAction.ARM),
    ("3.15.0.54", ControlAction.LOAD_LIMIT_SET),
    ("3.15.0.55", ControlAction.LOAD_LIMIT_CLEAR),
    ("3.36.116.13", ControlAction.CLOCK_SYNC),
    ("3.20.121.13", ControlAction.TOU_ACTIVATE),
])
def test_each_row_of_the_table(code, action):
    assert action_for(code) == action
    assert code_for(action) == code
    # EndDeviceType 0 ("not applicable", as one public head-end writes its codes) is the same control.
    assert action_for("0." + code.partition(".")[2]) == action


def test_the_table_covers_every_action_once_and_names_its_source():
    assert sorted(row.action.value for row in END_DEVICE_CONTROL_TYPES) == sorted(
        a.value for a in ControlAction)
    assert len({row.code for row in END_DEVICE_CONTROL_TYPES}) == len(END_DEVICE_CONTROL_TYPES)
    assert all(row.source and row.meaning for row in END_DEVICE_CONTROL_TYPES)


def test_the_actions_are_the_drivers_control_kinds():
    controls = pytest.importorskip("cimhes.drivers.controls")
    assert {a.value for a in ControlAction} == {k.value for k in controls.ControlKind}


@pytest.mark.parametrize("code", ["3.31.0.99", "2.31.0.23", "disconnect", "", "3.31.0"])
def test_a_code_not_in_the_table_is_refused_naming_the_known_ones(code):
    with pytest.raises(UnknownControlType, match="3.31.0.23 \\(disconnect\\)"):
        action_for(code)


def _header(verb="create", **extra):
    return Header(verb=verb, noun="EndDeviceControls", message_id="m-1", **extra)


def _create(*controls, **header):
    return EndDeviceControlsRequest(header=_header(**header), controls=controls)


def _roundtrip(operation, request):
    element = codec.encode_request(operation, request)
    assert_controls_valid_everywhere(element)
    return codec.decode_request(parse_xml(etree.tostring(element)))


def test_a_disconnect_of_two_meters_and_a_group_comes_back_as_it_was_sent():
    control = EndDeviceControl("3.31.0.23", ControlAction.DISCONNECT,
                               end_devices=(DeviceRef(mrid="m-1"),
                                            DeviceRef(names=(Name("CIMHES000002"),))),
                               end_device_groups=(DeviceRef(mrid="feeder-12"),),
                               reason="non-payment")
    operation, decoded = _roundtrip(codec.CREATE, _create(control))
    assert operation is codec.CREATE
    assert decoded.controls == (control,)
    assert decoded.header.message_id == "m-1"


def test_the_parameters_come_from_the_standards_fields():
    load = EndDeviceControl("3.15.0.54", ControlAction.LOAD_LIMIT_SET,
                            end_devices=(DeviceRef(mrid="m-1"),),
                            parameters=ControlParameters(start=START, threshold_w=5000,
                                                         duration_s=90))
    tou = EndDeviceControl("3.20.121.13", ControlAction.TOU_ACTIVATE,
                           end_devices=(DeviceRef(mrid="m-1"),),
                           parameters=ControlParameters(start=START, calendar_name="winter-2030"))
    element = codec.encode_request(codec.CREATE, _create(load, tou))
    c = codec.NS_END_DEVICE_CONTROLS
    first = element.find(f".//{{{c}}}EndDeviceControl")
    assert first.findtext(f"{{{c}}}priceSignal") == "5000"
    assert first.findtext(f"{{{c}}}primaryDeviceTiming/{{{c}}}duration") == "1.5"
    assert first.findtext(f"{{{c}}}primaryDeviceTiming/{{{c}}}interval/{{{c}}}start") == (
        "2030-01-02T03:04:05Z")
    _, decoded = _roundtrip(codec.CREATE, _create(load, tou))
    assert decoded.controls == (load, tou)


def test_a_cancel_names_the_control_by_its_mrid():
    cancel = EndDeviceControl("3.31.0.23", ControlAction.DISCONNECT, mrid="batch-7")
    operation, decoded = _roundtrip(codec.CANCEL, _create(cancel, verb="cancel"))
    assert operation is codec.CANCEL
    assert decoded.controls == (cancel,)


def _request_xml(operation="CreateEndDeviceControls", verb="create", noun="EndDeviceControls",
                 control='<edc:EndDeviceControlType ref="3.31.0.23"/>'
                         '<edc:EndDevices><edc:mRID>m-1</edc:mRID></edc:EndDevices>'):
    return (f'<edcm:{operation} xmlns:edcm="{codec.NS_END_DEVICE_CONTROLS_MESSAGE}" '
            f'xmlns:msg="http://iec.ch/TC57/2011/schema/message" '
            f'xmlns:edc="{codec.NS_END_DEVICE_CONTROLS}">'
            f'<edcm:Header><msg:Verb>{verb}</msg:Verb><msg:Noun>{noun}</msg:Noun></edcm:Header>'
            f'<edcm:Payload><edc:EndDeviceControls><edc:EndDeviceControl>{control}'
            f'</edc:EndDeviceControl></edc:EndDeviceControls></edcm:Payload>'
            f'</edcm:{operation}>').encode()


def _refusal(data: bytes) -> CodecError:
    with pytest.raises(CodecError) as caught:
        codec.decode_request(parse_xml(data))
    return caught.value


@pytest.mark.parametrize("xml, code, detail, in_reason", [
    (_request_xml(verb="get"), "2.9", None, "takes 'create'"),
    (_request_xml(noun="MeterReadings"), "2.5", None, "EndDeviceControls"),
    (_request_xml(operation="CancelEndDeviceControls", verb="create"), "2.9", None, "'cancel'"),
    (_request_xml(control='<edc:EndDeviceControlType ref="3.31.0.99"/>'
                          '<edc:EndDevices><edc:mRID>m-1</edc:mRID></edc:EndDevices>'),
     "5.2", "unknown-control-type", "3.31.0.99"),
    (_request_xml(control='<edc:EndDeviceControlType ref="3.15.0.54"/>'
                          '<edc:EndDevices><edc:mRID>m-1</edc:mRID></edc:EndDevices>'),
     "1.7", "control-parameter-missing", "priceSignal"),
    (_request_xml(control='<edc:priceSignal>5000</edc:priceSignal>'
                          '<edc:EndDeviceControlType ref="3.31.0.23"/>'
                          '<edc:EndDevices><edc:mRID>m-1</edc:mRID></edc:EndDevices>'),
     "1.8", "unusable-value", "not a parameter of a disconnect"),
    (_request_xml(control='<edc:priceSignal>50.5</edc:priceSignal>'
                          '<edc:EndDeviceControlType ref="3.15.0.54"/>'
                          '<edc:EndDevices><edc:mRID>m-1</edc:mRID></edc:EndDevices>'),
     "1.8", "unusable-value", "whole number"),
    (_request_xml(control='<edc:PanDisplay><edc:textMessage>hi</edc:textMessage></edc:PanDisplay>'
                          '<edc:EndDeviceControlType ref="3.31.0.23"/>'
                          '<edc:EndDevices><edc:mRID>m-1</edc:mRID></edc:EndDevices>'),
     "5.2", "not-supported", "PanDisplay"),
    (_request_xml(control='<edc:EndDeviceControlType ref="3.31.0.23"/>'),
     "1.6", None, "no EndDevices or EndDeviceGroups"),
    (_request_xml(control='<edc:mRID>mine</edc:mRID><edc:EndDeviceControlType ref="3.31.0.23"/>'
                          '<edc:EndDevices><edc:mRID>m-1</edc:mRID></edc:EndDevices>'),
     "5.2", "not-supported", "gets its mRID from the head-end"),
    (_request_xml(operation="CancelEndDeviceControls", verb="cancel"),
     "1.7", None, "named by its mRID"),
    (_request_xml(control='<edc:EndDeviceControlType ref="3.31.0.23"/><edc:Bogus/>'),
     "1.8", None, "not valid against EndDeviceControlsMessage.xsd"),
])
def test_what_cannot_be_carried_out_is_refused_whole(xml, code, detail, in_reason):
    error = _refusal(xml).to_error()
    assert error.code == code
    if detail is None:  # the standard's code says it all; details say where
        assert error.details is None or error.details.startswith("at ")
    else:
        assert error.details.startswith(f"{detail}: at ")
    assert in_reason in error.reason


def test_an_unknown_control_type_is_named_as_the_errors_object():
    error = _refusal(_request_xml(control='<edc:EndDeviceControlType ref="3.31.0.99"/>'
                                          '<edc:EndDevices><edc:mRID>m-1</edc:mRID>'
                                          '</edc:EndDevices>')).to_error()
    assert (error.id, error.object_type) == ("3.31.0.99", "EndDeviceControlType")


def test_a_request_of_another_noun_is_not_taken_for_a_control():
    with pytest.raises(CodecError, match="expected one of the EndDeviceControlsMessage requests"):
        codec.decode_request(parse_xml(b'<GetMeterReadings xmlns="http://iec.ch/TC57/2011/'
                                       b'GetMeterReadingsMessage"/>'))


def test_a_response_with_per_device_errors_and_the_batch_id_is_valid_everywhere():
    response = EndDeviceControlsResponse(
        header=Header(verb="reply", noun="EndDeviceControls", correlation_id="c-1",
                      timestamp=START),
        reply=Reply(ReplyResult.PARTIAL, errors=(
            Error(ErrorCode.DEVICE_TIMEOUT, reason="Timeout on device m-2", id="m-2",
                  id_kind=IdKind.UUID, object_type="EndDevice"),
            Error(ErrorCode.CONTROL_RATE_LIMITED, reason="rate limit", id="m-3",
                  id_kind=IdKind.UUID, object_type="EndDevice")),
            ids=(ObjectId("batch-1", kind=IdKind.TRANSACTION, object_type="EndDeviceControl"),)),
        controls=(EndDeviceControl("3.31.0.23", ControlAction.DISCONNECT, mrid="batch-1",
                                   end_devices=(DeviceRef(mrid="m-1"), DeviceRef(mrid="m-2"))),))
    element = codec.encode_response(response)
    assert_controls_valid_everywhere(element)
    decoded = codec.decode_response(parse_xml(etree.tostring(element)))
    assert decoded.reply == response.reply
    assert decoded.controls == response.controls
    fault = codec.encode_fault(Reply(ReplyResult.FAILED, errors=(Error(ErrorCode.NOT_AUTHORIZED),)))
    assert_controls_valid_everywhere(fault)
    assert codec.decode_fault(parse_xml(etree.tostring(fault))).errors[0].code == "7.2"


def _describe(client) -> dict:
    """What a client generated from an ExecuteEndDeviceControls WSDL sees of each operation."""
    (binding,) = client.wsdl.bindings.values()
    (service,) = client.wsdl.services.values()
    operations = {}
    for name, operation in binding._operations.items():
        (fault,) = operation.faults.values()
        (fault_part,) = fault.abstract.parts.values()
        operations[name] = (operation.soapaction, str(operation.input.body.qname),
                            str(operation.output.body.qname), str(fault_part.element.qname))
    return {"binding": str(binding.name), "service": (service.name, sorted(service.ports)),
            "operations": operations}


def test_our_wsdl_has_the_standards_operations_actions_and_wrappers():
    import zeep

    from cimhes import xsd

    from .schemas import reference

    ours = _describe(zeep.Client(wsdl=str(xsd.path("ExecuteEndDeviceControls.wsdl"))))
    theirs = _describe(zeep.Client(wsdl=str(reference(
        "connexo", "comu-outbound", "enddevicecontrols", "ExecuteEndDeviceControls.wsdl"))))
    assert ours == theirs
    assert ours["operations"]["CreateEndDeviceControls"][0] == (
        "http://iec.ch/TC57/2011/EndDeviceControls/CreateEndDeviceControls")
