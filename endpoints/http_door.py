"""The HTTP door's limits: what one caller can make the web server hold before any SOAP is parsed.

twisted.web on its own reads a whole request body (into a temporary file when it is large)
before any resource sees it, keeps a connection open while any byte arrives within its idle
timeout, and accepts every connection it is offered. `LimitedSite` is a `Site` whose channel
and request enforce `DoorLimits` instead:

- a body announced larger than `max_body_bytes` by its Content-Length is refused (413 with a
  SOAP Fault) before one byte of it is read; a chunked body is counted as it streams and refused
  at the limit, and nothing beyond the limit is kept (bodies are held in memory, never on disk);
- the request line and headers must arrive within `headers_timeout` of the connection opening
  (or of the request's first byte on a kept-alive connection), the body within `body_timeout`
  after the headers: a client trickling bytes (slowloris) gets 408 and is disconnected;
- at most `max_connections` connections are open at once; one more is answered 503 with a SOAP
  Fault and closed;
- header lines and the whole header block are bounded (`max_header_bytes`, `max_headers`):
  twisted.web answers 400 past them.

Refusals are written straight to the transport (the request never reaches a resource) and the
connection is closed, so the rest of an oversized body is never read. These are the defaults
documented in README.md ("Limits"); `cimhes serve`/`demo` take them from the command line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from io import BytesIO

from lxml import etree
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

log = logging.getLogger(__name__)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


@dataclass(frozen=True)
class DoorLimits:
    """Bounds on what HTTP callers may make the server hold (bytes, seconds, connections)."""

    max_body_bytes: int = 4 * 1024 * 1024   # a request body; the XML codec's document limit
    max_connections: int = 512              # HTTP connections open at once
    headers_timeout: float = 10.0           # request line + headers, from the first byte
    body_timeout: float = 60.0              # the body, after the headers
    idle_timeout: float = 60.0              # a kept-alive connection with no request
    max_header_bytes: int = 16 * 1024       # request line + all header lines
    max_headers: int = 100                  # header lines per request

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"HTTP limit {f.name} must be positive, got "
                                 f"{getattr(self, f.name)!r}")


def soap_fault_bytes(faultcode: str, faultstring: str) -> bytes:
    """A SOAP 1.1 Fault envelope (faultcode in the envelope namespace, e.g. "Client.TooLarge")."""
    envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soapenv": SOAP_ENV})
    body = etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body")
    fault = etree.SubElement(body, f"{{{SOAP_ENV}}}Fault")
    etree.SubElement(fault, "faultcode").text = f"soapenv:{faultcode}"
    etree.SubElement(fault, "faultstring").text = faultstring
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


_REASONS = {408: b"Request Timeout", 413: b"Content Too Large", 503: b"Service Unavailable"}


def refusal_bytes(status: int, faultcode: str, faultstring: str) -> bytes:
    """A whole HTTP/1.1 response carrying a SOAP Fault, closing the connection."""
    body = soap_fault_bytes(faultcode, faultstring)
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/xml; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body)))
    return head + body


class LimitedRequest(Request):
    """A request whose body is held in memory and refused past the site's size limit."""

    _received = 0

    def gotLength(self, length):
        limit = self.channel.site.limits.max_body_bytes
        if length is not None and length > limit:
            self.channel.refuse(413, "Client.TooLarge",
                                f"request body of {length} bytes refused before reading it: "
                                f"the limit is {limit} bytes")
        # Never twisted.web's temporary file: at most `limit` bytes are ever kept.
        self.content = BytesIO()
        # twisted.web parses a POST's Content-Type with the email package (~0.3 ms of the
        # reactor per request) only to find form bodies for request.args; a SOAP text/xml body
        # is never one, so only a form's is looked at (the operator's pages post forms).
        content_type = (self.requestHeaders.getRawHeaders(b"content-type") or [b""])[0]
        if not content_type.lower().lstrip().startswith((b"application/x-www-form-urlencoded",
                                                          b"multipart/form-data")):
            self._parsePOSTFormSubmission = False

    def handleContentChunk(self, data):
        if self.channel is None or self.channel.refusing:
            return
        self._received += len(data)
        limit = self.channel.site.limits.max_body_bytes
        if self._received > limit:
            self.channel.refuse(413, "Client.TooLarge",
                                f"request body refused at {limit} bytes (chunked, no "
                                f"Content-Length): the limit is {limit} bytes")
            return
        self.content.write(data)


class LimitedChannel(HTTPChannel):
    """An HTTP/1.1 channel with deadlines on headers and body, counted against the site's cap."""

    refusing = False
    _deadline = None  # IDelayedCall of the current phase (headers or body), if armed

    def connectionMade(self):
        limits = self.site.limits
        self.maxHeaders = limits.max_headers
        self.totalHeadersSize = limits.max_header_bytes
        self.MAX_LENGTH = limits.max_header_bytes
        super().connectionMade()
        if not self.site.connection_opened(self):
            return
        self._arm(limits.headers_timeout, "headers")

    def dataReceived(self, data):
        if self.refusing:
            return  # the refusal is written; nothing more of this request is looked at
        if self._deadline is None and not self._handlingRequest:
            self._arm(self.site.limits.headers_timeout, "headers")  # a kept-alive connection
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if not self.refusing:
            super().rawDataReceived(data)

    def allHeadersReceived(self):
        self._disarm()
        super().allHeadersReceived()
        if not self.refusing and self.length != 0:
            self._arm(self.site.limits.body_timeout, "body")

    def allContentReceived(self):
        self._disarm()
        if not self.refusing:
            super().allContentReceived()

    def refuse(self, status: int, faultcode: str, faultstring: str) -> None:
        """Answer `status` with a SOAP Fault at once and close, reading nothing more."""
        if self.refusing:
            return
        self.refusing = True
        self._disarm()
        peer = self.transport.getPeer()
        log.warning("HTTP %d to %s:%s: %s", status, getattr(peer, "host", "?"),
                    getattr(peer, "port", "?"), faultstring)
        self.transport.write(refusal_bytes(status, faultcode, faultstring))
        self.loseConnection()

    def connectionLost(self, reason):
        self._disarm()
        self.site.connection_closed(self)
        super().connectionLost(reason)

    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self._deadline = self.callLater(seconds, self._too_slow, seconds, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, seconds: float, phase: str) -> None:
        self._deadline = None
        what = "request line and headers" if phase == "headers" else "request body"
        self.refuse(408, "Client.Timeout", f"the {what} did not arrive within {seconds:g} s")


class LimitedSite(Site):
    """A twisted.web Site that enforces `DoorLimits` (see the module's docstring)."""

    protocol = LimitedChannel
    requestFactory = LimitedRequest

    def __init__(self, resource, limits: DoorLimits | None = None, **kwargs):
        self.limits = limits or DoorLimits()
        super().__init__(resource, timeout=self.limits.idle_timeout, **kwargs)
        self.requestFactory = LimitedRequest
        self.open_connections = 0

    def connection_opened(self, channel: LimitedChannel) -> bool:
        """Count a new connection; refuse it (503) when the cap is reached."""
        channel.counted = self.open_connections < self.limits.max_connections
        if not channel.counted:
            channel.refuse(503, "Server.Busy",
                           f"{self.open_connections} connections are open, the limit is "
                           f"{self.limits.max_connections}; retry later")
            return False
        self.open_connections += 1
        return True

    def connection_closed(self, channel: LimitedChannel) -> None:
        if getattr(channel, "counted", False):
            channel.counted = False
            self.open_connections -= 1
