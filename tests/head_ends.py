"""An in-process head-end serving HTTP on a loopback port, as most SOAP tests need one: a fresh
SQLite store and secret key under the test's tmp_path, the test user added, and a clean close."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.site import HeadEnd, HeadEndSettings

from .credentials import add_test_user


def devices_of(fleet) -> list[DeviceAddress]:
    return [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]]


def serve_head_end(directory, devices, *, links=None, device_timeout: float = 3.0,
                   **settings) -> HeadEnd:
    """A HeadEnd on `devices` listening on 127.0.0.1 (port 0), with `base_url` and `port` set
    and the test user (every role) added; close it with `close_head_end`."""
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{directory / 'cimhes.sqlite'}", device_timeout=device_timeout,
        secret_key_file=str(directory / "secret.key"), **settings), list(devices), links)
    add_test_user(head_end)
    head_end.port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.base_url = f"http://127.0.0.1:{head_end.port.getHost().port}"
    return head_end


def close_head_end(head_end: HeadEnd) -> None:
    """Stop listening, then stop the store thread and close the store (blocking the test)."""
    pytest_twisted.blockon(head_end.port.stopListening())
    head_end.store_runner.stop()
    head_end.store.close()
