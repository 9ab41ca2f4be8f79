"""Who sent an AMQP request, and may they: the door check of `RequestConsumer`.

The caller is the AMQP ``user_id`` property, which RabbitMQ validates against the user of the
connection that published it (a message naming another user is refused by the broker with
PRECONDITION_FAILED, unless that user has the ``impersonator`` tag: grant it to no integrator).
It names the cimhes user of the same name (`UserStore.broker_principal`, engine/users.py),
whose roles apply as over SOAP: each Noun needs a role (``roles``: a Role, or a function of the
request element for nouns whose role depends on the request, as a control's does); a Noun
without one is refused to everybody. A refusal is a 61968-100 Error 7.1 (no ``user_id``,
unknown or disabled user) or 7.2 (the role is missing), answered FAILED or dead-lettered by the
consumer like any bad request; every decision is one audit row (action ``authenticate`` with
subject ``amqp <Noun>``, then the Noun's action when refused; source ``amqp``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from lxml import etree
from twisted.internet.defer import inlineCallbacks

from cimhes.cim.message import Error, ErrorCode
from cimhes.engine.users import AuditTrail, AuthenticationFailed, Principal, Role

SOURCE = "amqp"
RoleRule = Role | Callable[[etree._Element], Role]


def handler_checks_roles(_root) -> None:
    """The role rule of a Noun whose handler checks the roles itself (EndDeviceControls: a
    request needs the role of each control type it carries); the door only authenticates."""
    return None


class BrokerRefused(Exception):
    def __init__(self, error: Error):
        super().__init__(error.reason)
        self.error = error


class AmqpDoorkeeper:
    def __init__(self, runner, users, audit: AuditTrail, roles: Mapping[str, RoleRule]):
        self._runner = runner
        self._users = users
        self._audit = audit
        self._roles = dict(roles)

    @inlineCallbacks
    def admit(self, user_id: str | None, noun: str, root: etree._Element,
              correlation_id: str | None):
        """Deferred[Principal]; fails with BrokerRefused carrying the 7.x Error."""
        subject = f"amqp {noun}"[:128]
        if not user_id:
            self._audit.record("authenticate", "failure", actor=None, source=SOURCE,
                               correlation_id=correlation_id, subject=subject,
                               detail="no AMQP user_id property")
            raise BrokerRefused(Error(
                ErrorCode.NOT_AUTHENTICATED,
                reason="set the AMQP user_id property to the connection's user (RabbitMQ "
                       "checks it): it names the cimhes user the request comes from"))
        try:
            principal: Principal = yield self._runner.call(self._users.broker_principal, user_id)
        except AuthenticationFailed as exc:
            self._audit.record("authenticate", "failure", actor=user_id[:64], source=SOURCE,
                               correlation_id=correlation_id, subject=subject, detail=str(exc))
            raise BrokerRefused(Error(ErrorCode.NOT_AUTHENTICATED,
                                      reason=f"AMQP user {user_id[:64]!r} is not accepted by "
                                             "this head-end")) from None
        self._audit.record("authenticate", "success", actor=principal.name, source=SOURCE,
                           correlation_id=correlation_id, subject=subject, detail="amqp user_id")
        rule = self._roles.get(noun)
        role = None if rule is None else (rule if isinstance(rule, Role) else rule(root))
        if rule is not None and role is None:
            return principal  # the Noun's handler checks the roles itself (handler_checks_roles)
        if role is None or not principal.may(role):
            needs = f"needs role {role.value}" if role else "no role allows it over AMQP"
            self._audit.record(subject, "refused", actor=principal.name, source=SOURCE,
                               correlation_id=correlation_id, detail=needs)
            raise BrokerRefused(Error(
                ErrorCode.NOT_AUTHORIZED,
                reason=(f"user {principal.name} may not send {noun} requests: it needs the "
                        f"role {role.value} ({role.meaning})") if role else
                       f"no role allows {noun} requests over AMQP"))
        return principal
