"""Calling an MDM's CIM service with zeep: one message element, one operation of one of the
project's own WSDLs (ReplyMeterReadings, ReceiveMeterReadings ...), to an address of the MDM's.

cimhes encodes its messages with its own codec (``cim/codec``), so zeep is given the element as it
is: :class:`CimPoster` wraps it in a SOAP 1.1 envelope, posts it with zeep's transport and the
operation's SOAP action from the WSDL, and has zeep's binding parse the answer (a Fault becomes
``zeep.exceptions.Fault``). This is the one named place where cimhes steps around zeep's
object builder: building a 196,000-value reply as zeep objects would cost many times what the
codec does, for the same bytes.

Every call is blocking (requests); :meth:`CimPoster.post` runs it on the reactor's thread pool.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import requests
import zeep
from lxml import etree
from twisted.internet.threads import deferToThreadPool
from zeep.transports import Transport

from cimhes import xsd

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


class CimPoster:
    """Posts message elements through ``operation`` of the WSDL ``wsdl_file`` (from ``xsd/``)."""

    def __init__(self, reactor, wsdl_file: str, operation: str,
                 session_factory: Callable[[], requests.Session]):
        self._reactor = reactor
        self._wsdl_file = wsdl_file
        self._operation_name = operation
        self._session_factory = session_factory
        self._client: zeep.Client | None = None
        self._lock = threading.Lock()

    def _zeep(self) -> zeep.Client:
        with self._lock:  # built once, on first use, on a worker thread (it parses the WSDL)
            if self._client is None:
                self._client = zeep.Client(
                    str(xsd.path(self._wsdl_file)),
                    transport=Transport(session=self._session_factory()))
            return self._client

    def post_blocking(self, address: str, element: etree._Element):
        """Post ``element`` to ``address``; zeep's parsed answer (raises on faults and HTTP errors)."""
        client = self._zeep()
        binding = client.service._binding  # noqa: SLF001 (zeep's public face has no raw-body call)
        operation = binding.get(self._operation_name)
        envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soapenv": SOAP_ENV})
        etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body").append(copy.deepcopy(element))
        response = client.transport.post_xml(address, envelope, {
            "SOAPAction": f'"{operation.soapaction}"', "Content-Type": "text/xml; charset=utf-8"})
        return binding.process_reply(client, operation, response)

    def post(self, address: str, element: etree._Element):
        """Deferred of :meth:`post_blocking`, run off the reactor thread."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                 self.post_blocking, address, element)
