"""A test user and clients that present its credentials (HTTP Basic or a WS-Security
UsernameToken), for tests that call the head-end's services."""
from __future__ import annotations

import requests
import zeep
from zeep.transports import Transport
from zeep.wsse.username import UsernameToken

from cimhes.endpoints.tls import callback_session
from cimhes.engine.users import Role

TEST_USER = "mdm-test"
TEST_PASSWORD = "mdm-test-password"


def add_test_user(head_end, name: str = TEST_USER, password: str = TEST_PASSWORD,
                  roles=tuple(Role), digest: bool = True):
    """Add a user straight into a HeadEnd's store (before its reactor work starts)."""
    return head_end.users.add_user(name, password, roles, digest=digest, actor="test",
                                   replace=True)


def _session(ca_bundle) -> requests.Session:
    return callback_session(ca_bundle)  # the head-end's own session factory: verifies TLS


def basic_session(name: str = TEST_USER, password: str = TEST_PASSWORD,
                  ca_bundle=None) -> requests.Session:
    session = _session(ca_bundle)
    session.auth = (name, password)
    return session


def zeep_client(wsdl_url: str, *, name: str = TEST_USER, password: str = TEST_PASSWORD,
                how: str = "basic", plugins=(), ca_bundle=None) -> zeep.Client:
    """A zeep client that authenticates with HTTP Basic (``how="basic"``), a UsernameToken with
    PasswordText (``"text"``) or PasswordDigest (``"digest"``), or not at all (``"none"``);
    HTTPS servers are verified against ``ca_bundle`` (else the system's CAs)."""
    if how == "basic":
        transport = Transport(session=basic_session(name, password, ca_bundle))
        return zeep.Client(wsdl_url, transport=transport, plugins=list(plugins))
    session = _session(ca_bundle)
    wsse = None
    if how in ("text", "digest"):
        wsse = UsernameToken(name, password, use_digest=how == "digest")
    return zeep.Client(wsdl_url, transport=Transport(session=session), wsse=wsse,
                       plugins=list(plugins))
