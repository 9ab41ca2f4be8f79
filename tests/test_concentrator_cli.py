"""`cimhes simulate --concentrators` and `cimhes serve` as an operator runs them: the inventory
says how each meter is reached, and a SOAP read gets direct and concentrator meters alike."""
from __future__ import annotations

import json
import signal

from cimhes.engine.inventory import Inventory

from .test_cli import _admin, _read_registers, _start, _stop


def test_simulated_concentrators_are_in_the_inventory_and_served(tmp_path):
    inventory = tmp_path / "inventory.json"
    fleet, ready = _start("simulate", "--meters", "1", "--port", "0", "--concentrators", "2",
                          "--meters-per-concentrator", "2", "--plc-latency", "0.01",
                          "--segment-sessions", "3", "--security", "mixed",
                          "--inventory", str(inventory))
    try:
        assert ready["meters"] == 1 and ready["meters_behind_concentrators"] == 4
        document = json.loads(inventory.read_text())
        routes = {r["name"]: r for r in document["routes"]}
        assert [f"{r['host']}:{r['port']}" for r in routes.values()] == ready["concentrators"]
        assert {r["kind"] for r in routes.values()} == {"concentrator"}
        assert {r["max_sessions"] for r in routes.values()} == {3}
        direct, *behind = document["meters"]
        assert "route" not in direct and "physical_address" not in direct
        assert [m["route"] for m in behind] == ["DC-0001", "DC-0001", "DC-0002", "DC-0002"]
        assert len({m["physical_address"] for m in behind}) == 4
        loaded = Inventory.from_json(document)
        assert {d.address.host for d in loaded.devices[1:]} == {r["host"] for r in routes.values()}

        db = str(tmp_path / "serve.sqlite")
        _admin("user", "add", "mdm", "--role", "readings-reader", "--password-stdin",
               "--db", db, stdin="mdm-password-1\n")
        server, served = _start("serve", "--push-port", "0",
                                "--inventory", str(inventory), "--port", "0",
                                "--db", db)
        try:
            assert served["meters"] == [m["mrid"] for m in document["meters"]]
            reply = _read_registers(served["base_url"], served["meters"], "mdm",
                                    "mdm-password-1")
            assert reply.Reply.Result == "OK"
            assert {mr.Meter.mRID for mr in reply.Payload.MeterReadings.MeterReading} == \
                set(served["meters"])
        finally:
            assert _stop(server, signal.SIGTERM) == 0
    finally:
        assert _stop(fleet, signal.SIGTERM) == 0
