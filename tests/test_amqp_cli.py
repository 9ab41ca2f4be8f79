"""`cimhes demo --amqp-url`: the ready line names the broker (no password), a GetMeterReadings
over AMQP is answered, and the password appears in no log line; without it AMQP is off."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pika

from cimhes.queue.topology import REQUESTS_EXCHANGE

from .brokers import amqp_vhost, ask  # noqa: F401 (fixture)
from .test_amqp_requests import _request
from .test_cli import _admin, _start, _stop


def test_demo_with_amqp_answers_over_the_queue_and_never_logs_the_password(tmp_path, amqp_vhost):
    url, password = amqp_vhost.user_url()
    # The AMQP user is a cimhes user of the same name, allowed to read (docs/amqp.md).
    _admin("user", "add", amqp_vhost.extra_user, "--role", "readings-reader",
           "--password-stdin", "--db", str(tmp_path / "demo.sqlite"), stdin="not-used-over-amqp\n")
    process, ready = _start("demo", "--port", "0", "--meters", "2", "--meter-port", "0",
                            "--db", str(tmp_path / "demo.sqlite"), "--amqp-url", url)
    try:
        assert password not in json.dumps(ready)
        assert ready["amqp"] == url.replace(password, "***")
        # The ready line does not wait for the broker: the topology comes once it is connected.
        for _ in range(100):
            try:
                props, body = ask(url, REQUESTS_EXCHANGE, "MeterReadings",
                                  _request(ready["meters"]), correlation_id="cli-1")
                break
            except pika.exceptions.ChannelClosedByBroker:
                time.sleep(0.1)
        assert props.correlation_id == "cli-1"
        assert b"<msg:Result>OK</msg:Result>" in body
        # /health shows the broker connected, its URL without the password.
        try:  # 503 if something else is failing (a busy machine's reactor lag): same body
            answer = urllib.request.urlopen(f"{ready['base_url']}/health", timeout=10).read()
        except urllib.error.HTTPError as failing:
            answer = failing.read()
        health = json.loads(answer)
        broker = health["checks"]["broker"]
        assert (broker["configured"], broker["ok"], broker["state"]) == (True, True, "connected")
        assert password not in json.dumps(health)
    finally:
        code = _stop(process)
    stderr = process.stderr.read()
    assert code == 0, stderr
    assert "connected" in stderr and "***" in stderr
    assert password not in stderr


def test_demo_without_amqp_says_it_is_off(tmp_path):
    process, ready = _start("demo", "--port", "0", "--meters", "1", "--meter-port", "0",
                            "--db", str(tmp_path / "demo.sqlite"))
    # Served first: a Ctrl-C before the reactor runs is not what this test is about.
    urllib.request.urlopen(f"{ready['base_url']}/cim/GetMeterReadings?wsdl", timeout=10).read()
    code = _stop(process)
    assert ready["amqp"] == "off"
    assert "AMQP is off" in process.stderr.read()
    assert code == 0
