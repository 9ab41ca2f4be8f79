"""Who is calling, and may they: authentication and authorisation at the head-end's web doors.

SOAP requests carry credentials either as HTTP Basic or as a WS-Security UsernameToken (OASIS Web
Services Security UsernameToken Profile 1.0) in the SOAP Header, with PasswordText or
PasswordDigest. Web pages use HTTP Basic. Clear-text passwords (Basic, PasswordText) are taken over
plain HTTP only from a loopback peer (the embedded demo); from anywhere else they need TLS.

A refusal is a 61968-100 Reply FAILED with a 7.x Error (7.1 not authenticated, 7.2 not authorised,
7.3 clear text refused) in the service's own fault message, and every attempt, allowed or not, is
one row of the audit trail (who, when, from where, CorrelationID). The caller learns only that its
credentials were not accepted; the audit row says why (unknown user, wrong password, disabled ...).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree
from twisted.internet.defer import inlineCallbacks

from cimhes.cim.message import Error, ErrorCode, Reply, ReplyResult
from cimhes.endpoints.soap_resource import CimFault
from cimhes.engine.users import (
    AuditTrail,
    AuthenticationFailed,
    Authenticator,
    Principal,
    Role,
)

log = logging.getLogger(__name__)

WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
_PROFILE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
PASSWORD_TEXT = f"{_PROFILE}#PasswordText"
PASSWORD_DIGEST = f"{_PROFILE}#PasswordDigest"
MAX_CREDENTIAL_LENGTH = 1024  # a user name, password or digest longer than this is refused


@dataclass(frozen=True)
class Login:
    """Credentials as presented: ``kind`` is basic, text (PasswordText) or digest."""

    kind: str
    name: str
    secret: str
    nonce: str | None = None
    created: str | None = None

    def __repr__(self) -> str:
        return f"Login(kind={self.kind!r}, name={self.name!r})"

    @property
    def cleartext(self) -> bool:
        return self.kind in ("basic", "text")


class Refused(Exception):
    """A request turned away at the door, with the 61968-100 Error that says why."""

    def __init__(self, error: Error):
        super().__init__(error.reason)
        self.error = error


class MalformedCredentials(ValueError):
    pass


def basic_login(request) -> Login | None:
    """The HTTP Basic credentials of a twisted.web request, or None when it has none."""
    header = request.getHeader("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise MalformedCredentials("the Authorization header is not base64 of UTF-8") from None
    name, colon, password = decoded.partition(":")
    if not colon:
        raise MalformedCredentials("the Basic credentials have no ':'")
    return _checked(Login("basic", name, password))


def username_token(envelope: etree._Element) -> Login | None:
    """The UsernameToken of a SOAP envelope's wsse:Security header, or None when it has none."""
    token = envelope.find(f"{{*}}Header/{{{WSSE_NS}}}Security/{{{WSSE_NS}}}UsernameToken")
    if token is None:
        return None
    name = token.findtext(f"{{{WSSE_NS}}}Username")
    password = token.find(f"{{{WSSE_NS}}}Password")
    if name is None or password is None:
        raise MalformedCredentials("the UsernameToken needs a Username and a Password")
    kind = password.get("Type", PASSWORD_TEXT)
    if kind == PASSWORD_TEXT:
        return _checked(Login("text", name.strip(), password.text or ""))
    if kind == PASSWORD_DIGEST:
        nonce = token.findtext(f"{{{WSSE_NS}}}Nonce")
        created = token.findtext(f"{{{WSU_NS}}}Created")
        if not nonce or not created:
            raise MalformedCredentials("a PasswordDigest needs a Nonce and a wsu:Created")
        return _checked(Login("digest", name.strip(), (password.text or "").strip(),
                              nonce.strip(), created.strip()))
    raise MalformedCredentials(f"the Password Type {kind!r} is not one this head-end knows")


def _checked(login: Login) -> Login:
    if any(len(v or "") > MAX_CREDENTIAL_LENGTH for v in
           (login.name, login.secret, login.nonce, login.created)):
        raise MalformedCredentials(f"a credential is longer than {MAX_CREDENTIAL_LENGTH} "
                                   "characters")
    return login


def peer_of(request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return str(host) if host is not None else str(address)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Doorkeeper:
    """Authenticates a login and checks a role, auditing each decision."""

    def __init__(self, authenticator: Authenticator, audit: AuditTrail, metrics=None):
        self._authenticator = authenticator
        self.audit = audit
        self._metrics = metrics

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.authentications.labels(outcome).inc()

    @inlineCallbacks
    def authenticate(self, request, login: Login | None, *, channel: str,
                     correlation_id: str | None = None):
        """Deferred[Principal]; fails with Refused (7.1 or 7.3)."""
        source = peer_of(request)
        if login is None:
            self._count("failure")
            self.audit.record("authenticate", "failure", actor=None, source=source,
                              correlation_id=correlation_id, subject=channel,
                              detail="no credentials")
            raise Refused(Error(ErrorCode.NOT_AUTHENTICATED,
                                reason="credentials are required: HTTP Basic or a WS-Security "
                                       "UsernameToken"))
        if login.cleartext and not request.isSecure() and not _is_loopback(source):
            self._count("failure")
            self.audit.record("authenticate", "failure", actor=login.name, source=source,
                              correlation_id=correlation_id, subject=channel,
                              detail=f"clear-text password ({login.kind}) over plain HTTP")
            raise Refused(Error(ErrorCode.CLEARTEXT_PASSWORD_REFUSED,
                                reason="a clear-text password is taken only over HTTPS; use TLS "
                                       "or a PasswordDigest"))
        try:
            if login.kind == "digest":
                principal = yield self._authenticator.digest(login.name, login.secret,
                                                             login.nonce, login.created)
            else:
                principal = yield self._authenticator.password(login.name, login.secret)
        except AuthenticationFailed as exc:
            self._count("failure")
            self.audit.record("authenticate", "failure", actor=login.name, source=source,
                              correlation_id=correlation_id, subject=channel,
                              detail=f"{login.kind}: {exc}")
            raise Refused(Error(ErrorCode.NOT_AUTHENTICATED,
                                reason="the credentials were not accepted")) from None
        self._count("success")
        self.audit.record("authenticate", "success", actor=principal.name, source=source,
                          correlation_id=correlation_id, subject=channel, detail=login.kind)
        return principal

    def authorise(self, request, principal: Principal, role: Role, *, action: str,
                  correlation_id: str | None = None) -> None:
        """Raise Refused (7.2) unless the principal holds ``role``; a refusal is audited."""
        if principal.may(role):
            return
        self.audit.record(action, "refused", actor=principal.name, source=peer_of(request),
                          correlation_id=correlation_id, detail=f"needs role {role.value}")
        raise Refused(Error(ErrorCode.NOT_AUTHORIZED,
                            reason=f"user {principal.name} may not {action}: it needs the role "
                                   f"{role.value} ({role.meaning})"))


RoleRule = Role | Callable[[etree._Element], Role | tuple[Role, ...]]


class SoapGuard:
    """The door check of one SOAP service: each operation (by its body element's local name)
    needs a role, given as a Role or as a function of the request element returning the role
    or the roles (all needed: a control's roles depend on its types); an operation not in the
    table is refused to everybody."""

    def __init__(self, doorkeeper: Doorkeeper, roles: dict[str, RoleRule],
                 fault: Callable[[Reply], etree._Element]):
        self._doorkeeper = doorkeeper
        self._roles = roles
        self._fault = fault

    @inlineCallbacks
    def admit(self, request, envelope: etree._Element, body: etree._Element):
        """Deferred[Principal]; fails with a CimFault carrying the 7.x Error."""
        operation = etree.QName(body).localname
        correlation_id = correlation_of(body)
        try:
            try:
                login = basic_login(request) or username_token(envelope)
            except MalformedCredentials as exc:
                self._doorkeeper.audit.record(
                    "authenticate", "failure", actor=None, source=peer_of(request),
                    correlation_id=correlation_id, subject=operation, detail=str(exc))
                raise Refused(Error(ErrorCode.NOT_AUTHENTICATED, reason=str(exc))) from None
            principal = yield self._doorkeeper.authenticate(
                request, login, channel=operation, correlation_id=correlation_id)
            rule = self._roles.get(operation)
            if rule is None:
                raise Refused(Error(ErrorCode.NOT_AUTHORIZED,
                                    reason=f"no role allows the operation {operation}"))
            roles = rule if isinstance(rule, Role) else rule(body)
            for role in (roles,) if isinstance(roles, Role) else roles:
                self._doorkeeper.authorise(request, principal, role, action=operation,
                                           correlation_id=correlation_id)
        except Refused as refused:
            raise CimFault("Client.Security", refused.error.reason,
                           self._fault(Reply(ReplyResult.FAILED, errors=(refused.error,))))
        return principal


def correlation_of(body: etree._Element) -> str | None:
    """The CorrelationID (else MessageID) of a CIM message's Header, read without validating."""
    header = body.find("{*}Header")
    if header is None:
        return None
    for name in ("CorrelationID", "MessageID"):
        value = header.findtext(f"{{*}}{name}")
        if value:
            return value.strip()[:128]
    return None
