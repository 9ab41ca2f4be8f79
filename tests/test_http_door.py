"""The HTTP door's limits, against the real Twisted site of a head-end: hostile and broken HTTP
clients on loopback (raw sockets, each exchange bounded in time) and the server still serving."""
from __future__ import annotations

import socket
import time

import pytest
import pytest_twisted
import requests
from lxml import etree
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from cimhes.cim import codec
from cimhes.endpoints.http_door import DoorLimits
from cimhes.endpoints.site import HeadEnd, HeadEndSettings

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SERVICE = "/cim/GetMeterReadings"
# Small limits so that each abuse is quick to commit; the defaults are tested for themselves.
LIMITS = DoorLimits(max_body_bytes=64 * 1024, max_connections=8, headers_timeout=1.0,
                    body_timeout=1.0, max_header_bytes=4096, max_headers=20)


@pytest.fixture
def door(tmp_path):
    """A head-end with no meters on the test's limits; yields (host, port, head_end)."""
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}",
        secret_key_file=str(tmp_path / "secret.key"), door_limits=LIMITS), [])
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    yield "127.0.0.1", port.getHost().port, head_end
    pytest_twisted.blockon(port.stopListening())
    head_end.store_runner.stop()
    head_end.store.close()


def _exchange(address, chunks, *, pause=0.0, timeout=5.0):
    """Send `chunks` (pausing between them) and read until the server closes. Returns
    (response bytes, bytes of `chunks` the server let us send, seconds until it closed)."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                sent += len(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass  # the server closed while we were still sending: that is the point
        sock.settimeout(timeout)
        response = b""
        try:
            while data := sock.recv(65536):
                response += data
        except ConnectionResetError:
            pass
    return response, sent, time.monotonic() - started


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _fault(response: bytes) -> tuple[str, str]:
    body = response.split(b"\r\n\r\n", 1)[1]
    fault = etree.fromstring(body).find(f"{{{SOAP_ENV}}}Body/{{{SOAP_ENV}}}Fault")
    return fault.findtext("faultcode"), fault.findtext("faultstring")


def _wsdl_answers(host, port) -> bool:
    with requests.Session() as session:  # closes its connection when done
        return session.get(f"http://{host}:{port}{SERVICE}?wsdl", timeout=5).status_code == 200


def _head(content_length=None, content_type="text/xml; charset=utf-8", extra=b""):
    lines = [f"POST {SERVICE} HTTP/1.1", "Host: x", f"Content-Type: {content_type}",
             'SOAPAction: "http://iec.ch/TC57/2011/GetMeterReadings/GetMeterReadings"']
    if content_length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {content_length}")
    return "\r\n".join(lines).encode() + b"\r\n" + extra + b"\r\n"


def test_the_defaults_are_the_documented_ones():
    limits = DoorLimits()
    assert (limits.max_body_bytes, limits.max_connections, limits.headers_timeout,
            limits.body_timeout, limits.idle_timeout, limits.max_header_bytes,
            limits.max_headers) == (4 * 1024 * 1024, 512, 10.0, 60.0, 60.0, 16 * 1024, 100)
    assert limits.max_body_bytes == codec.MAX_DOCUMENT_BYTES
    with pytest.raises(ValueError, match="max_connections must be positive"):
        DoorLimits(max_connections=0)


@pytest_twisted.inlineCallbacks
def test_a_body_announced_too_large_is_refused_before_it_is_read(door):
    host, port, _ = door
    # 400 MB announced, not one byte of body sent: the answer comes from the headers alone.
    response, _, _ = yield deferToThread(_exchange, (host, port), [_head(400_000_000)])
    assert _status(response) == 413
    code, reason = _fault(response)
    assert code == "soapenv:Client.TooLarge"
    assert "400000000 bytes refused before reading it" in reason and "65536" in reason
    assert (yield deferToThread(_wsdl_answers, host, port))


@pytest_twisted.inlineCallbacks
def test_a_chunked_body_is_cut_at_the_limit(door):
    host, port, head_end = door
    held = []
    original = head_end.site.requestFactory

    class Recording(original):  # notes how much of the body the server kept
        def connectionLost(self, reason):
            held.append(self.content.tell() if not self.content.closed else None)
            super().connectionLost(reason)

    head_end.site.requestFactory = Recording
    chunk = b"%x\r\n%s\r\n" % (8192, b"<" * 8192)
    # Up to 1 MiB offered in 8 KiB chunks; the limit is 64 KiB.
    response, sent, _ = yield deferToThread(
        _exchange, (host, port), [_head(None)] + [chunk] * 128)
    assert _status(response) == 413
    assert "chunked" in _fault(response)[1]
    assert held and held[0] is not None and held[0] <= LIMITS.max_body_bytes
    assert (yield deferToThread(_wsdl_answers, host, port))


@pytest_twisted.inlineCallbacks
def test_headers_trickled_byte_by_byte_time_out(door):
    host, port, _ = door
    head = _head(10)
    # One byte every 50 ms would take 10 s for these headers; the limit is 1 s.
    response, sent, took = yield deferToThread(
        _exchange, (host, port), [head[i:i + 1] for i in range(len(head))], pause=0.05)
    assert _status(response) == 408
    assert "headers did not arrive within 1 s" in _fault(response)[1]
    assert sent < len(head)
    assert (yield deferToThread(_wsdl_answers, host, port))


@pytest_twisted.inlineCallbacks
def test_a_connection_that_sends_nothing_is_closed_at_the_headers_timeout(door):
    host, port, _ = door
    response, _, _ = yield deferToThread(_exchange, (host, port), [])
    assert _status(response) == 408


@pytest_twisted.inlineCallbacks
def test_a_body_trickled_too_slowly_times_out(door):
    host, port, _ = door
    response, _, _ = yield deferToThread(
        _exchange, (host, port), [_head(1000)] + [b"<"] * 40, pause=0.05)
    assert _status(response) == 408
    assert "request body did not arrive within 1 s" in _fault(response)[1]


@pytest_twisted.inlineCallbacks
def test_connections_past_the_cap_are_refused_and_the_cap_frees_up(door):
    host, port, head_end = door

    def flood():
        idle = [socket.create_connection((host, port), timeout=5)
                for _ in range(LIMITS.max_connections)]
        try:
            time.sleep(0.2)  # let the reactor accept them all
            refused, _, _ = _exchange((host, port), [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        return refused, _wsdl_answers(host, port)

    refused, then_served = yield deferToThread(flood)
    assert _status(refused) == 503
    code, reason = _fault(refused)
    assert code == "soapenv:Server.Busy" and "the limit is 8" in reason
    assert then_served
    for _ in range(50):  # every connection closed by now, on our side; the count follows
        if head_end.site.open_connections == 0:
            break
        yield deferLater(reactor, 0.05, lambda: None)
    assert head_end.site.open_connections == 0


@pytest_twisted.inlineCallbacks
def test_an_oversized_header_is_refused(door):
    host, port, _ = door
    response, _, _ = yield deferToThread(
        _exchange, (host, port), [_head(0, extra=b"X-Pad: " + b"a" * 8000 + b"\r\n")])
    assert response == b"" or _status(response) == 400  # twisted.web: 400, or a plain close
    assert (yield deferToThread(_wsdl_answers, host, port))


@pytest_twisted.inlineCallbacks
def test_too_many_header_lines_are_refused(door):
    host, port, _ = door
    extra = b"".join(b"X-%d: 1\r\n" % i for i in range(30))
    response, _, _ = yield deferToThread(_exchange, (host, port), [_head(0, extra=extra)])
    assert _status(response) == 400


@pytest.mark.parametrize("content_type, status, faultcode, says", [
    ("application/json", 415, "Client.ContentType", "sent as text/xml"),
    (None, 415, "Client.ContentType", "missing"),
    ("application/soap+xml; charset=utf-8", 500, "VersionMismatch", "SOAP 1.2"),
])
@pytest_twisted.inlineCallbacks
def test_a_wrong_content_type_gets_a_clear_fault(door, content_type, status, faultcode, says):
    host, port, _ = door
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = yield deferToThread(
        requests.post, f"http://{host}:{port}{SERVICE}", data=b"<x/>", headers=headers,
        timeout=5)
    assert response.status_code == status
    fault = etree.fromstring(response.content).find(f"{{{SOAP_ENV}}}Body/{{{SOAP_ENV}}}Fault")
    assert fault.findtext("faultcode").endswith(faultcode)
    assert says in fault.findtext("faultstring")


@pytest_twisted.inlineCallbacks
def test_a_flood_of_tiny_elements_is_refused_by_count(tmp_path):
    # The default limits: a 4 MB body of a million empty elements fits the size limit.
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}",
        secret_key_file=str(tmp_path / "secret.key")), [])
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    try:
        body = (f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body><r>'.encode() + b"<e/>" * 1_000_000
                + b"</r></s:Body></s:Envelope>")
        assert len(body) < codec.MAX_DOCUMENT_BYTES
        response = yield deferToThread(
            requests.post, f"http://127.0.0.1:{port.getHost().port}{SERVICE}", data=body,
            headers={"Content-Type": "text/xml"}, timeout=10)
        assert response.status_code == 500
        assert f"more than {codec.MAX_ELEMENTS} elements" in response.text
    finally:
        yield port.stopListening()
        head_end.store_runner.stop()
        head_end.store.close()
