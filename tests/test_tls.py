"""HTTPS: the head-end serves its services over TLS with a given (here self-signed) pair, zeep
calls them verifying the certificate, and outgoing sessions verify servers against the
configured CA bundle and refuse the rest."""
from __future__ import annotations

import pytest
import pytest_twisted
import requests
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from cimhes.drivers import DeviceAddress
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.endpoints.tls import callback_session, make_self_signed, server_options
from cimhes.fixtures.fleet import start_fleet

from .credentials import add_test_user, zeep_client
from .test_cli import _start, _stop

PLUS_A = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"


@pytest.fixture
def pair(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key, ["127.0.0.1"])
    return cert, key


@pytest.fixture
def https_head_end(tmp_path, pair):
    fleet = start_fleet(reactor, 1, base_index=241, port=0)
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}", device_timeout=3.0,
        secret_key_file=str(tmp_path / "secret.key"), callback_ca_bundle=str(pair[0])),
        [DeviceAddress.from_inventory(m) for m in fleet.inventory()["meters"]])
    add_test_user(head_end)
    port = reactor.listenSSL(0, head_end.site, server_options(*pair), interface="127.0.0.1")
    head_end.base_url = f"https://127.0.0.1:{port.getHost().port}"
    head_end.mrid = fleet.inventory()["meters"][0]["mrid"]
    yield head_end
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(fleet.stop_all())
    head_end.store_runner.stop()
    head_end.store.close()


def _read(client, mrid):
    return client.service.GetMeterReadings(
        Header={"Verb": "get", "Noun": "MeterReadings"},
        Request={"GetMeterReadings": {"EndDevice": [{"mRID": mrid}],
                                      "ReadingType": [{"mRID": PLUS_A}]}})


@pytest_twisted.inlineCallbacks
def test_zeep_reads_over_https_trusting_the_head_ends_certificate(https_head_end, pair):
    wsdl = f"{https_head_end.base_url}/cim/GetMeterReadings?wsdl"
    client = yield deferToThread(zeep_client, wsdl, how="text", ca_bundle=pair[0])
    reply = yield deferToThread(_read, client, https_head_end.mrid)
    assert reply.Reply.Result == "OK"
    # The WSDL served over HTTPS points clients back at the HTTPS address.
    assert client.service._binding_options["address"].startswith("https://127.0.0.1:")

    with pytest.raises(requests.exceptions.SSLError):
        yield deferToThread(zeep_client, wsdl)  # the system's CAs do not know it


@pytest_twisted.inlineCallbacks
def test_outgoing_sessions_verify_against_the_configured_ca_bundle(https_head_end, tmp_path):
    url = f"{https_head_end.base_url}/cim/GetMeterReadings?wsdl"
    trusted = yield deferToThread(https_head_end.callback_session().get, url)
    assert trusted.status_code == 200

    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    make_self_signed(other_cert, other_key, ["127.0.0.1"])
    for session in (callback_session(other_cert), callback_session(None)):
        with pytest.raises(requests.exceptions.SSLError):
            yield deferToThread(session.get, url)
    with pytest.raises(ValueError, match="not a file"):
        callback_session(tmp_path / "missing.pem")


def test_a_bad_certificate_is_a_clear_error(tmp_path, pair):
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot serve TLS with certificate"):
        server_options(tmp_path / "bad.pem", pair[1])
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    make_self_signed(other_cert, other_key, ["127.0.0.1"])
    with pytest.raises(ValueError, match="is not the key of the certificate"):
        server_options(pair[0], other_key)
    assert oct(pair[1].stat().st_mode & 0o777) == "0o600"


def test_the_demo_serves_https_with_a_self_signed_pair(tmp_path):
    process, ready = _start("demo", "--port", "0", "--meters", "1", "--meter-port", "0",
                            "--db", str(tmp_path / "demo.sqlite"), "--tls-self-signed")
    try:
        assert ready["base_url"].startswith("https://127.0.0.1:")
        client = zeep_client(f"{ready['base_url']}/cim/GetMeterReadings?wsdl",
                             name=ready["user"], password=ready["password"], how="digest",
                             ca_bundle=ready["tls_cert"])
        assert _read(client, ready["meters"][0]).Reply.Result == "OK"
    finally:
        assert _stop(process) == 0
