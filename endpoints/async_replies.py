"""Asynchronous replies (IEC 61968-100): Header.AsyncReplyFlag, ReplyAddress and CorrelationID.

A request with AsyncReplyFlag true is answered at once with an acknowledgment (Reply.Result OK and
one Error of code 0.3, level INFORM); its outcome, the MeterReadingsResponseMessage a synchronous
call would have returned, is posted later to the ReplyAddress through the ReplyMeterReadings WSDL
(``xsd/ReplyMeterReadings.wsdl``) with zeep, carrying the request's CorrelationID.

A ReplyAddress must match one the operator allowed (:class:`ReplyAddressPolicy`, configuration
``reply_addresses``): same scheme, host and port, and a path under the allowed one. Any other is
refused (7.2 reply-address-not-allowed) and never called: a head-end that posted wherever a
request said would be an open relay into the operator's network.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from cimhes.cim.codec.envelope import NS_MESSAGE
from cimhes.cim.message import Error, ErrorCode
from cimhes.endpoints.cim_client import CimPoster

log = logging.getLogger(__name__)

REPLY_WSDL = "ReplyMeterReadings.wsdl"
REPLY_OPERATION = "ReplyMeterReadings"
DEFAULT_ATTEMPTS = 3
DEFAULT_FIRST_RETRY = 2.0  # seconds; doubled after each failed attempt


def _origin(url: str):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname.lower(), port, parts.path or "/"


@dataclass(frozen=True)
class ReplyAddressPolicy:
    """The ReplyAddresses the operator allows: URLs whose path is a prefix (``http://mdm:8080/cb/``
    allows ``http://mdm:8080/cb/anything``). Empty: asynchronous requests are refused."""

    allowed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for url in self.allowed:
            if _origin(url) is None:
                raise ValueError(f"reply address {url!r} is not an http(s) URL with a host")

    def allows(self, address: str) -> bool:
        asked = _origin(address)
        if asked is None:
            return False
        for url in self.allowed:
            scheme, host, port, path = _origin(url)
            base = path.rstrip("/")
            if asked[:3] == (scheme, host, port) and (
                    asked[3] in (path, base) or asked[3].startswith(base + "/")):
                return True
        return False


def async_refusal(header, replies: ReplySender | None, policy: ReplyAddressPolicy) -> Error | None:
    """The Error refusing an asynchronous request cimhes cannot honour, else None (also None
    for a synchronous request): no ReplyAddress (1.5), no reply sender (5.2), a ReplyAddress the
    operator did not allow (7.2), nothing to correlate the outcome with (1.5)."""
    if not header.async_reply:
        return None
    if not header.reply_address:
        return Error(code=ErrorCode.REPLY_ADDRESS_MISSING,
                     reason="AsyncReplyFlag is true but the Header has no ReplyAddress",
                     xpath=f"{{{NS_MESSAGE}}}ReplyAddress")
    if replies is None:
        return Error(code=ErrorCode.UNSUPPORTED_REQUEST,
                     reason="this head-end sends no asynchronous replies; send the "
                            "request without AsyncReplyFlag",
                     xpath=f"{{{NS_MESSAGE}}}AsyncReplyFlag")
    if not policy.allows(header.reply_address):
        return Error(code=ErrorCode.REPLY_ADDRESS_REFUSED,
                     reason=f"ReplyAddress {header.reply_address[:200]!r} is not one the "
                            "operator allowed; nothing is sent there",
                     xpath=f"{{{NS_MESSAGE}}}ReplyAddress")
    if not (header.correlation_id or header.message_id):
        return Error(code=ErrorCode.HEADER_MISSING,
                     reason="an asynchronous request needs a CorrelationID (or a "
                            "MessageID) for the outcome to be matched to it",
                     xpath=f"{{{NS_MESSAGE}}}CorrelationID")
    return None


class ReplySender:
    """Posts outcomes to ReplyAddresses, retrying a few times with backoff, through one noun's
    Reply WSDL (ReplyMeterReadings unless told another, e.g. ReplyEndDeviceEvents)."""

    def __init__(self, reactor, session_factory, *, attempts: int = DEFAULT_ATTEMPTS,
                 first_retry: float = DEFAULT_FIRST_RETRY, wsdl_file: str = REPLY_WSDL,
                 operation: str = REPLY_OPERATION):
        self._reactor = reactor
        self._poster = CimPoster(reactor, wsdl_file, operation, session_factory)
        self._attempts = attempts
        self._first_retry = first_retry

    @inlineCallbacks
    def send(self, address: str, element, correlation_id: str | None):
        """Deferred[bool]: whether the ReplyAddress took the outcome (failures are logged)."""
        delay = self._first_retry
        for attempt in range(1, self._attempts + 1):
            try:
                answer = yield self._poster.post(address, element)
            except Exception as exc:  # noqa: BLE001 (every failure of a remote call is retried)
                log.warning("reply %s to %s, attempt %d of %d failed: %s", correlation_id,
                            address, attempt, self._attempts, exc)
                if attempt < self._attempts:
                    yield deferLater(self._reactor, delay, lambda: None)
                    delay *= 2
                continue
            result = getattr(getattr(answer, "Reply", None), "Result", None)
            if result not in (None, "OK"):
                log.warning("reply %s: %s answered Result %s", correlation_id, address, result)
            return True
        log.error("reply %s to %s not delivered after %d attempts", correlation_id, address,
                  self._attempts)
        return False
