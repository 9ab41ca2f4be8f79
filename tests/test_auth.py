"""Who may call the SOAP services: HTTP Basic and WS-Security UsernameToken (PasswordText and
PasswordDigest) under zeep against the real site; refusals are 61968-100 7.x Errors in the
service's fault message, and every attempt is in the append-only audit trail."""
from __future__ import annotations

import base64
import hashlib
import io
from datetime import datetime, timezone

import pytest
import pytest_twisted
import requests
import sqlalchemy
import zeep.exceptions
from lxml import etree
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.threads import deferToThread
from twisted.web.test.requesthelper import DummyRequest

from cimhes.cim.message import ErrorCode
from cimhes.drivers import DeviceAddress
from cimhes.endpoints.auth import Login, Refused
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.users import Role
from cimhes.fixtures.fleet import start_fleet

from .credentials import TEST_PASSWORD, TEST_USER, add_test_user, zeep_client
from .schemas import assert_valid_everywhere

ENVELOPE_NS = "http://iec.ch/TC57/2011/schema/message"
MESSAGE_NS = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"
PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
FIRST_METER = 231


@pytest.fixture
def fleet():
    fleet = start_fleet(reactor, 1, base_index=FIRST_METER, port=0)
    yield fleet
    pytest_twisted.blockon(fleet.stop_all())


@pytest.fixture
def head_end(tmp_path, fleet):
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key")),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    add_test_user(head_end)
    add_test_user(head_end, "events-only", "events-only-password", [Role.EVENTS_READER])
    add_test_user(head_end, "no-digest", "no-digest-password", [Role.READINGS_READER],
                  digest=False)
    port = reactor.listenTCP(0, head_end.site, interface="127.0.0.1")
    head_end.wsdl = f"http://127.0.0.1:{port.getHost().port}/cim/GetMeterReadings?wsdl"
    head_end.mrid = fleet.inventory()["meters"][0]["mrid"]
    yield head_end
    pytest_twisted.blockon(port.stopListening())
    head_end.store_runner.stop()
    head_end.store.close()


def _read(client, mrid: str, correlation_id: str = "auth-1"):
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings", "CorrelationID": correlation_id},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": mrid}],
                                      "ReadingType": [{"mRID": PLUS_A}]}})


def _refusal(head_end, **client_args) -> dict:
    """The 61968-100 Error of the fault a client with these credentials gets."""
    client = zeep_client(head_end.wsdl, **client_args)
    with pytest.raises(zeep.exceptions.Fault) as caught:
        _read(client, head_end.mrid)
    (detail,) = caught.value.detail
    assert detail.tag == f"{{{MESSAGE_NS}}}MeterReadingsFaultMessage"
    assert_valid_everywhere(detail)
    reply = detail.find(f"{{{MESSAGE_NS}}}Reply")
    assert reply.findtext(f"{{{ENVELOPE_NS}}}Result") == "FAILED"
    error = reply.find(f"{{{ENVELOPE_NS}}}Error")
    return {"code": error.findtext(f"{{{ENVELOPE_NS}}}code"),
            "reason": error.findtext(f"{{{ENVELOPE_NS}}}reason"),
            "faultcode": caught.value.code}


def _audit(head_end):
    return head_end.users.audit_entries()


@pytest.mark.parametrize("how", ["basic", "text", "digest"])
@pytest_twisted.inlineCallbacks
def test_each_way_of_presenting_credentials_is_accepted_and_audited(head_end, how):
    client = yield deferToThread(zeep_client, head_end.wsdl, how=how)
    reply = yield deferToThread(_read, client, head_end.mrid)
    assert reply.Reply.Result == "OK"
    yield head_end.store_runner.call(lambda: None)  # the audit write queued before this
    (entry,) = [e for e in _audit(head_end) if e.action == "authenticate"]
    assert (entry.actor, entry.outcome, entry.detail) == (TEST_USER, "success", how)
    assert entry.source == "127.0.0.1"
    assert entry.correlation_id == "auth-1"
    assert entry.subject == "GetMeterReadings"


@pytest_twisted.inlineCallbacks
def test_no_credentials_wrong_password_and_wrong_role_are_refused_with_7x_and_audited(head_end):
    anonymous = yield deferToThread(_refusal, head_end, how="none")
    wrong = yield deferToThread(_refusal, head_end, password="not-the-password")
    wrong_digest = yield deferToThread(_refusal, head_end, how="digest", password="nope-nope")
    unknown = yield deferToThread(_refusal, head_end, name="nobody", password="whatever1")
    no_role = yield deferToThread(_refusal, head_end, name="events-only",
                                  password="events-only-password")

    assert anonymous["code"] == ErrorCode.NOT_AUTHENTICATED.value
    assert wrong["code"] == wrong_digest["code"] == unknown["code"] == \
        ErrorCode.NOT_AUTHENTICATED.value
    # The caller is not told whether the name exists; the audit trail is.
    assert wrong["reason"] == unknown["reason"]
    assert no_role["code"] == ErrorCode.NOT_AUTHORIZED.value
    assert Role.READINGS_READER.value in no_role["reason"]
    assert all(r["faultcode"].endswith("Client.Security")
               for r in (anonymous, wrong, unknown, no_role))

    yield head_end.store_runner.call(lambda: None)
    trail = [(e.actor, e.action, e.outcome, e.detail) for e in _audit(head_end)
             if e.actor != "test"]
    assert (None, "authenticate", "failure", "no credentials") in trail
    assert (TEST_USER, "authenticate", "failure", "basic: wrong password") in trail
    assert (TEST_USER, "authenticate", "failure", "digest: wrong password digest") in trail
    assert ("nobody", "authenticate", "failure", "basic: unknown user") in trail
    assert ("events-only", "authenticate", "success", "basic") in trail
    assert ("events-only", "GetMeterReadings", "refused",
            f"needs role {Role.READINGS_READER.value}") in trail
    assert all(e.correlation_id == "auth-1" for e in _audit(head_end) if e.actor != "test")
    # No password ever reaches the trail.
    assert not any(TEST_PASSWORD in str(e) or "not-the-password" in str(e)
                   for e in _audit(head_end))


@pytest_twisted.inlineCallbacks
def test_disabled_users_and_users_without_a_digest_secret_are_refused(head_end):
    no_digest = yield deferToThread(_refusal, head_end, name="no-digest",
                                    password="no-digest-password", how="digest")
    assert no_digest["code"] == ErrorCode.NOT_AUTHENTICATED.value
    client = yield deferToThread(zeep_client, head_end.wsdl, name="no-digest",
                                 password="no-digest-password", how="text")
    reply = yield deferToThread(_read, client, head_end.mrid)
    assert reply.Reply.Result == "OK"

    yield head_end.store_runner.call(head_end.users.set_disabled, "no-digest", True,
                                     actor="test")
    # Disabling works at once, even for credentials verified (and remembered) a moment ago.
    disabled = yield deferToThread(_refusal, head_end, name="no-digest",
                                   password="no-digest-password", how="text")
    assert disabled["code"] == ErrorCode.NOT_AUTHENTICATED.value
    yield head_end.store_runner.call(lambda: None)
    assert ("no-digest", "failure", "text: user disabled") in [
        (e.actor, e.outcome, e.detail) for e in _audit(head_end)]


def _digest_envelope(name: str, password: str, nonce: bytes, created: str, mrid: str) -> bytes:
    digest = base64.b64encode(hashlib.sha1(nonce + created.encode() + password.encode())
                              .digest()).decode()
    wsse = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
    wsu = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
    profile = ("http://docs.oasis-open.org/wss/2004/01/"
               "oasis-200401-wss-username-token-profile-1.0")
    return f"""<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">
<soapenv:Header><wsse:Security xmlns:wsse="{wsse}" xmlns:wsu="{wsu}"><wsse:UsernameToken>
<wsse:Username>{name}</wsse:Username>
<wsse:Password Type="{profile}#PasswordDigest">{digest}</wsse:Password>
<wsse:Nonce EncodingType="{profile.replace('username-token-profile', 'soap-message-security')}#Base64Binary">{base64.b64encode(nonce).decode()}</wsse:Nonce>
<wsu:Created>{created}</wsu:Created></wsse:UsernameToken></wsse:Security></soapenv:Header>
<soapenv:Body><m:GetMeterReadings xmlns:m="{MESSAGE_NS}" xmlns:x="{ENVELOPE_NS}">
<m:Header><x:Verb>get</x:Verb><x:Noun>MeterReadings</x:Noun></m:Header>
<m:Request><g:GetMeterReadings xmlns:g="http://iec.ch/TC57/2011/GetMeterReadings#">
<g:EndDevice><g:mRID>{mrid}</g:mRID></g:EndDevice>
<g:ReadingType><g:mRID>{PLUS_A}</g:mRID></g:ReadingType></g:GetMeterReadings></m:Request>
</m:GetMeterReadings></soapenv:Body></soapenv:Envelope>""".encode()


@pytest_twisted.inlineCallbacks
def test_a_replayed_or_stale_password_digest_is_refused(head_end):
    url = head_end.wsdl.removesuffix("?wsdl")
    headers = {"Content-Type": "text/xml; charset=utf-8",
               "SOAPAction": '"http://iec.ch/TC57/2011/GetMeterReadings/GetMeterReadings"'}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    fresh = _digest_envelope(TEST_USER, TEST_PASSWORD, b"nonce-0123456789", now, head_end.mrid)
    first = yield deferToThread(requests.post, url, data=fresh, headers=headers)
    again = yield deferToThread(requests.post, url, data=fresh, headers=headers)
    stale = _digest_envelope(TEST_USER, TEST_PASSWORD, b"nonce-other-1234",
                             "2020-01-01T00:00:00Z", head_end.mrid)
    old = yield deferToThread(requests.post, url, data=stale, headers=headers)

    assert first.status_code == 200, first.text
    assert again.status_code == old.status_code == 500
    codes = {r.status_code: etree.fromstring(r.content).findtext(f".//{{{ENVELOPE_NS}}}code")
             for r in (again, old)}
    assert codes == {500: ErrorCode.NOT_AUTHENTICATED.value}
    yield head_end.store_runner.call(lambda: None)
    details = [e.detail for e in _audit(head_end) if e.outcome == "failure"]
    assert "digest: nonce already used (replay)" in details
    assert any(d.startswith("digest: Created 2020-01-01T00:00:00Z is more than") for d in details)


@pytest_twisted.inlineCallbacks
def test_clear_text_passwords_over_plain_http_are_taken_from_loopback_only(head_end):
    from_afar = DummyRequest([b""])
    from_afar.client = IPv4Address("TCP", "192.0.2.7", 4000)
    from_afar.isSecure = lambda: False
    login = Login("basic", TEST_USER, TEST_PASSWORD)
    with pytest.raises(Refused) as refused:
        yield head_end.doorkeeper.authenticate(from_afar, login, channel="test")
    refused = refused.value
    assert refused.error.code == ErrorCode.CLEARTEXT_PASSWORD_REFUSED.value
    assert "TLS" in refused.error.reason

    from_afar.isSecure = lambda: True  # the same over TLS is taken
    principal = yield head_end.doorkeeper.authenticate(from_afar, login, channel="test")
    assert principal.name == TEST_USER and principal.may(Role.READINGS_READER)


def test_the_audit_trail_is_append_only_and_exports_as_csv(head_end):
    users = head_end.users
    users.append_audit([])
    users.grant("events-only", Role.SWITCH_OPERATOR, actor="admin-x", source="local")
    with head_end.store.engine.begin() as connection:
        for statement in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit"):
            with pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"):
                with connection.begin_nested():
                    connection.execute(sqlalchemy.text(statement))
    out = io.StringIO()
    rows = users.export_audit_csv(out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "at,actor,action,outcome,source,correlation_id,subject,detail"
    assert rows == len(lines) - 1 == 4  # three users added by the fixture, one grant
    assert lines[-1].split(",")[1:] == ["admin-x", "user.grant", "success", "local", "",
                                        "events-only", "role=switch-operator"]
