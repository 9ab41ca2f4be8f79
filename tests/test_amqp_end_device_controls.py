"""EndDeviceControls over a real RabbitMQ broker: a CreateEndDeviceControls published to the
request exchange is answered by the SOAP door's own method, the disconnect carried out on a
simulated meter; the broker-verified AMQP user must be a cimhes user with the control's role."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes.cim.codec import end_device_controls as codec
from cimhes.cim.end_device_controls import (
    ControlAction,
    EndDeviceControl,
    EndDeviceControlsRequest,
)
from cimhes.cim.message import Header, Verb
from cimhes.cim.meter_readings import DeviceRef
from cimhes.drivers import DeviceAddress
from cimhes.drivers.idis_association import in_association
from cimhes.drivers.limits import SessionLimits
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.users import Role
from cimhes.fixtures.fleet import start_fleet
from cimhes.queue.topology import REQUESTS_EXCHANGE

from .brokers import amqp_vhost, ask  # noqa: F401 (fixture)
from .credentials import add_test_user
from .schemas import assert_controls_valid_everywhere

FIRST_METER = 5345  # 127.0.22.11..: this file's part of the loopback range
NS = {"m": "http://iec.ch/TC57/2011/schema/message"}


@pytest.fixture
def head_end(tmp_path, amqp_vhost):
    fleet = start_fleet(reactor, 1, clock=lambda: datetime.now(timezone.utc),
                        base_index=FIRST_METER, port=0)
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=5.0,
        secret_key_file=str(tmp_path / "secret.key"), amqp_url=amqp_vhost.url),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    head_end.fleet = fleet
    head_end.amqp.start()
    pytest_twisted.blockon(head_end.amqp.connection.connected())
    yield head_end
    pytest_twisted.blockon(head_end.amqp.stop())
    pytest_twisted.blockon(fleet.stop_all())
    head_end.store_runner.stop()
    head_end.store.close()


def _disconnect(mrid: str, message_id: str) -> bytes:
    element = codec.encode_request(codec.CREATE, EndDeviceControlsRequest(
        header=Header(verb=Verb.CREATE, noun="EndDeviceControls", message_id=message_id,
                      source="test-mdm"),
        controls=(EndDeviceControl("3.31.0.23", ControlAction.DISCONNECT,
                                   end_devices=(DeviceRef(mrid=mrid),)),)))
    return etree.tostring(element, xml_declaration=True, encoding="UTF-8")


async def _output_state(device: DeviceAddress) -> bool:
    async def work(conversation):
        return (await conversation.get(70, "0.0.96.3.10.255", 2)).value
    return await in_association(reactor, device, SessionLimits.of(5.0), None, work)


@pytest_twisted.ensureDeferred
async def test_a_disconnect_over_amqp_is_carried_out_for_a_user_with_the_role(head_end,
                                                                            amqp_vhost):
    entry = head_end.fleet.inventory()["meters"][0]
    device = DeviceAddress.from_inventory(entry)
    # The broker's user is not a cimhes user yet: refused, the meter untouched.
    props, body = await deferToThread(ask, amqp_vhost.url, REQUESTS_EXCHANGE,
                                      "EndDeviceControls", _disconnect(entry["mrid"], "a-1"),
                                      user_id=amqp_vhost.user)
    reply = etree.fromstring(body)
    assert reply.findtext("{*}Reply/m:Result", namespaces=NS) == "FAILED"
    assert reply.findtext("{*}Reply/m:Error/m:code", namespaces=NS) == "7.1"
    assert await _output_state(device) is True

    await deferToThread(add_test_user, head_end, amqp_vhost.user, "amqp-user-password",
                        (Role.READINGS_READER,))
    props, body = await deferToThread(ask, amqp_vhost.url, REQUESTS_EXCHANGE,
                                      "EndDeviceControls", _disconnect(entry["mrid"], "a-2"),
                                      user_id=amqp_vhost.user)
    reply = etree.fromstring(body)
    assert reply.findtext("{*}Reply/m:Error/m:code", namespaces=NS) == "7.2"

    await deferToThread(add_test_user, head_end, amqp_vhost.user, "amqp-user-password",
                        (Role.SWITCH_OPERATOR,))
    props, body = await deferToThread(ask, amqp_vhost.url, REQUESTS_EXCHANGE,
                                      "EndDeviceControls", _disconnect(entry["mrid"], "a-3"),
                                      correlation_id="amqp-corr-3", user_id=amqp_vhost.user)
    assert props.correlation_id == "amqp-corr-3"
    reply = etree.fromstring(body)
    assert_controls_valid_everywhere(reply)
    assert reply.findtext("{*}Header/m:CorrelationID", namespaces=NS) == "a-3"
    assert reply.findtext("{*}Reply/m:Result", namespaces=NS) == "OK", body.decode()[:2000]
    assert await _output_state(device) is False
    audit = await deferToThread(head_end.users.audit_entries)
    assert [(a.actor, a.outcome) for a in audit if a.action == "control.disconnect"] == [
        (amqp_vhost.user, "success")]
