"""The project's own IEC 61968-9 / 61968-100 contracts (XSDs and WSDLs) and their loader.

The files in this folder are data: the schemas the codec validates against and the WSDLs the SOAP
endpoint serves. This module finds them by name, compiles schemas once (local files only, never the
network) and renders a WSDL or XSD for serving over HTTP, with every relative ``schemaLocation`` turned
into the ``{service_url}?xsd=<name>`` URL the endpoint answers, so a client such as zeep can load the
whole set from ``{service_url}?wsdl``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import quote

from lxml import etree

__all__ = ["DOCUMENTS", "UnknownDocument", "path", "schema", "wsdl_text", "xsd_text", "xsd_url"]

_HERE = Path(__file__).resolve().parent

# Every document this package serves or compiles, by file name. Serving looks names up here, so a
# request for any other name (a path, '../x', a typo) is refused rather than touching the filesystem.
DOCUMENTS: frozenset[str] = frozenset(
    p.name for p in _HERE.iterdir() if p.suffix in (".xsd", ".wsdl") and p.is_file()
)

_XS = "http://www.w3.org/2001/XMLSchema"
_WSDL = "http://schemas.xmlsoap.org/wsdl/"
_SOAP11 = "http://schemas.xmlsoap.org/wsdl/soap/"


class UnknownDocument(KeyError):
    """A name that is not one of this package's XSD or WSDL files."""


def path(name: str) -> Path:
    """The file of the schema or WSDL called ``name`` (a bare file name, e.g. "Message.xsd")."""
    if name not in DOCUMENTS:
        raise UnknownDocument(f"no schema or WSDL named {name!r}; known: {', '.join(sorted(DOCUMENTS))}")
    return _HERE / name


def _parser() -> etree.XMLParser:
    # Our own files, but still parsed the safe way: no DTD, no entities, no network.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, remove_comments=True)


@functools.cache
def schema(name: str) -> etree.XMLSchema:
    """The compiled schema ``name`` (with its imports, resolved from this folder only), compiled once."""
    document = etree.parse(str(path(name)), _parser())
    return etree.XMLSchema(document)


def xsd_url(service_url: str, name: str) -> str:
    """Where the endpoint at ``service_url`` serves the document ``name``."""
    return f"{service_url}?xsd={quote(name)}"


def _point_imports_at(document: etree._ElementTree, service_url: str) -> None:
    for node in document.iter(f"{{{_XS}}}import", f"{{{_XS}}}include", f"{{{_XS}}}redefine"):
        location = node.get("schemaLocation")
        if location and location in DOCUMENTS:
            node.set("schemaLocation", xsd_url(service_url, location))


# Served documents are rendered once per (document, address) and kept: a WSDL fetch is a dict
# lookup, not a parse, even while the reactor is busy. The address comes from the request
# (Host, Forwarded), so the cache is bounded: past SERVED_CACHE entries the oldest goes.
SERVED_CACHE = 128


@functools.lru_cache(maxsize=SERVED_CACHE)
def xsd_text(name: str, service_url: str) -> bytes:
    """The schema ``name`` as served by the endpoint at ``service_url`` (imports point at ``?xsd=``)."""
    document = etree.parse(str(path(name)), _parser())
    _point_imports_at(document, service_url)
    return etree.tostring(document, xml_declaration=True, encoding="utf-8")


@functools.lru_cache(maxsize=SERVED_CACHE)
def wsdl_text(name: str, location_url: str) -> bytes:
    """The WSDL ``name`` as served by the endpoint at ``location_url``.

    Every soap:address names ``location_url`` and every schema import points at
    ``{location_url}?xsd=<name>``, which the endpoint must answer with :func:`xsd_text`.
    """
    if not name.endswith(".wsdl"):
        raise UnknownDocument(f"{name!r} is not a WSDL")
    document = etree.parse(str(path(name)), _parser())
    for address in document.iter(f"{{{_SOAP11}}}address"):
        address.set("location", location_url)
    _point_imports_at(document, location_url)
    return etree.tostring(document, xml_declaration=True, encoding="utf-8")
