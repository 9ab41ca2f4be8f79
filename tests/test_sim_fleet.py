"""A two-meter fleet on real loopback sockets: a clock read over TCP, inventory, stopping a meter."""

import json
import struct
from datetime import datetime, timezone

import pytest
import pytest_twisted
from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
from gurux_dlms.enums import Authentication, InterfaceType
from gurux_dlms.objects import GXDLMSClock
from twisted.internet import defer, error
from twisted.internet.protocol import ClientCreator, Protocol

from cimhes.fixtures.fleet import start_fleet, write_inventory
from cimhes.fixtures.meter_model import meter_identity

UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 7, 30, tzinfo=UTC)


class FrameClient(Protocol):
    """Collects whole TCP-wrapper frames; `request(data)` fires with the next one."""

    def __init__(self):
        self.buffer = b""
        self.waiting = None
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.buffer += data
        if len(self.buffer) >= 8:
            end = 8 + struct.unpack_from(">H", self.buffer, 6)[0]
            if len(self.buffer) >= end and self.waiting:
                frame, self.buffer = self.buffer[:end], self.buffer[end:]
                waiting, self.waiting = self.waiting, None
                waiting.callback(frame)

    def request(self, data):
        self.waiting = defer.Deferred()
        self.transport.write(bytes(data))
        return self.waiting

    def connectionLost(self, reason):
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_two_meters_answer_over_tcp_and_stop_cleanly(tmp_path):
    from twisted.internet import reactor

    fleet = start_fleet(reactor, 2, clock=lambda: NOW, port=0, response_delay=0.01)
    try:
        inventory = fleet.inventory()["meters"]
        assert [(m["name"], m["host"]) for m in inventory] == [("CIMHES000001", "127.0.1.1"),
                                                                ("CIMHES000002", "127.0.1.2")]
        assert inventory[1]["mrid"] == meter_identity(2).mrid and inventory[1]["port"] > 0
        write_inventory(tmp_path / "inventory.json", fleet)
        assert json.loads((tmp_path / "inventory.json").read_text()) == fleet.inventory()

        second = inventory[1]
        connection = yield ClientCreator(reactor, FrameClient).connectTCP(second["host"], second["port"])
        client = GXDLMSClient(True, 1, 1, Authentication.LOW, second["password"], InterfaceType.WRAPPER)
        reply = GXReplyData()
        client.getData(GXByteBuffer((yield connection.request(client.aarqRequest()[0]))), reply)
        client.parseAareResponse(reply.data)
        clock = GXDLMSClock("0.0.1.0.0.255")
        reply = GXReplyData()
        client.getData(GXByteBuffer((yield connection.request(client.read(clock, 2)[0]))), reply)
        client.updateValue(clock, 2, reply.value)
        assert clock.time.value.replace(tzinfo=UTC) == NOW

        yield fleet.stop(2)  # the meter goes silent: connection dropped, no more listening
        yield connection.lost
        with pytest.raises(error.ConnectionRefusedError):
            yield ClientCreator(reactor, FrameClient).connectTCP(second["host"], second["port"])
        assert [m["name"] for m in fleet.inventory()["meters"]] == ["CIMHES000001"]
    finally:
        yield fleet.stop_all()
