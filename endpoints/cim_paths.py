"""The /cim/ folder of the site: each service at /cim/<WSDL name>, and the address clients see.

- An unknown name under /cim/ is answered with a SOAP 1.1 Fault naming the services that exist
  (a SOAP client gets something it can parse, never an HTML 404 page).
- :func:`public_service_url` is the URL written into a served WSDL's soap:address: the operator's
  configured public base URL if there is one, else the request as the client sent it, including
  behind a reverse proxy (RFC 7239 ``Forwarded``, else ``X-Forwarded-Proto``/``X-Forwarded-Host``/
  ``X-Forwarded-Prefix``). These headers only change what this client is told; a client that
  forges them misleads only itself.
"""
from __future__ import annotations

import re
from urllib.parse import quote

from lxml import etree
from twisted.web.resource import Resource

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"

# host[:port], IPv6 literals in brackets; nothing that could break out of a URL.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:[0-9]{1,5})?")
_PREFIX = re.compile(r"(/[A-Za-z0-9._~\-]+)*")


def soap_fault_document(faultcode: str, faultstring: str) -> bytes:
    """A SOAP 1.1 Envelope holding one Fault (``faultcode`` in the soapenv namespace)."""
    envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soapenv": SOAP_ENV})
    fault = etree.SubElement(etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body"),
                             f"{{{SOAP_ENV}}}Fault")
    etree.SubElement(fault, "faultcode").text = f"soapenv:{faultcode}"
    etree.SubElement(fault, "faultstring").text = faultstring
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def _forwarded(header: str) -> dict[str, str]:
    """The first hop's parameters of an RFC 7239 Forwarded header (proto, host, ...)."""
    first = header.split(",", 1)[0]
    params = {}
    for pair in first.split(";"):
        name, _, value = pair.strip().partition("=")
        if value:
            params[name.strip().lower()] = value.strip().strip('"')
    return params


def public_base_url(request, configured: str | None = None) -> str:
    """scheme://host[:port][/prefix] by which the client reached this site."""
    if configured:
        return configured.rstrip("/")
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader("host") or "").strip()
    if not _HOST.fullmatch(host):
        address = request.getHost()
        host = f"{address.host}:{address.port}"
    prefix = ""
    forwarded = request.getHeader("forwarded")
    if forwarded:
        params = _forwarded(forwarded)
        scheme = params.get("proto", scheme)
        host = params.get("host", host)
    else:
        scheme = (request.getHeader("x-forwarded-proto") or scheme).split(",")[0].strip()
        host = (request.getHeader("x-forwarded-host") or host).split(",")[0].strip()
        prefix = (request.getHeader("x-forwarded-prefix") or "").split(",")[0].strip().rstrip("/")
    if scheme not in ("http", "https") or not _HOST.fullmatch(host) or not _PREFIX.fullmatch(prefix):
        # A header we cannot trust to form a URL: fall back on what the socket says.
        address = request.getHost()
        scheme, host, prefix = ("https" if request.isSecure() else "http",
                                f"{address.host}:{address.port}", "")
    return f"{scheme}://{host}{prefix}"


def public_service_url(request, configured: str | None = None) -> str:
    """The service's URL as the client should call it: public base + the request's path."""
    path = request.path.decode("utf-8", "replace").split("?", 1)[0]
    return public_base_url(request, configured) + quote(path, safe="/")


class _UnknownService(Resource):
    isLeaf = True

    def __init__(self, name: str, services: list[str]):
        super().__init__()
        self._name = name
        self._services = services

    def _fault(self, request, status: int) -> bytes:
        request.setResponseCode(status)
        request.setHeader("content-type", "text/xml; charset=utf-8")
        known = ", ".join(f"/cim/{s}" for s in self._services) or "none"
        return soap_fault_document(
            "Client", f"no service named {self._name!r} under /cim/; the services are: {known}")

    def render_GET(self, request):
        return self._fault(request, 404)

    def render_POST(self, request):
        return self._fault(request, 500)  # SOAP 1.1: a Fault travels with 500

    def render_HEAD(self, request):
        return self._fault(request, 404)


class CimFolder(Resource):
    """/cim/: the services put into it by name; any other name gets a SOAP Fault listing them."""

    def services(self) -> list[str]:
        return sorted(name.decode() for name in self.children)

    def getChild(self, path: bytes, request):
        return _UnknownService(path.decode("utf-8", "replace")[:100], self.services())

    def render_GET(self, request):
        return _UnknownService("", self.services()).render_GET(request)

    def render_POST(self, request):
        return _UnknownService("", self.services()).render_POST(request)
