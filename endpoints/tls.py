"""TLS for the head-end: the HTTPS listener's context, a self-signed pair for the demo, and the one
HTTP session factory for outgoing calls (callbacks to MDM endpoints), which verifies the server's
certificate against a configured CA bundle.

The listener uses Twisted's CertificateOptions (pyOpenSSL), TLS 1.2 at least; the self-signed pair
is made with `cryptography`. Outgoing calls go through `requests` (which zeep's transport uses),
so one `callback_session` serves a zeep publisher and plain HTTP posts alike.
"""
from __future__ import annotations

import ipaddress
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import CertificateOptions, TLSVersion

SELF_SIGNED_DAYS = 30
CALLBACK_TIMEOUT = 30.0  # seconds for connect and for each read of an outgoing call


def server_options(cert_file: str | Path, key_file: str | Path) -> CertificateOptions:
    """The context of an HTTPS listener serving the PEM certificate chain and key given (the
    first certificate of the file is the server's, any others its chain)."""
    try:
        certificates = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot serve TLS with certificate {cert_file} and key {key_file}: "
                         f"{exc}") from None
    if certificates[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"the key {key_file} is not the key of the certificate {cert_file}")
    # pyOpenSSL takes cryptography's objects directly (its own X509/PKey are deprecated).
    return CertificateOptions(privateKey=key, certificate=certificates[0],
                              extraCertChain=certificates[1:] or None,
                              raiseMinimumTo=TLSVersion.TLSv1_2)


def make_self_signed(cert_file: str | Path, key_file: str | Path,
                     hosts: list[str]) -> None:
    """Write a self-signed certificate for ``hosts`` (names or IP addresses) and its key (mode
    0600), valid for SELF_SIGNED_DAYS. Clients trust it by using the certificate file as their
    CA bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else
                                            "localhost"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cimhes demo")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256()))
    Path(cert_file).parent.mkdir(parents=True, exist_ok=True)
    Path(cert_file).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


class VerifyingSession(requests.Session):
    """A requests session that verifies servers against its own ``verify`` setting and has a
    default timeout on every call.

    Works around requests (2.x): a REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE in the environment
    overrides a session's ``verify``, so a session told to trust one CA bundle would silently
    trust the system's instead (and refuse the MDM's private CA). Passing ``verify`` on each
    call makes the session's own setting win. requests also has no default timeout.
    """

    def __init__(self, verify: bool | str, timeout: float):
        super().__init__()
        self.verify = verify
        self._timeout = timeout

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        kwargs.setdefault("verify", self.verify)
        return super().request(method, url, **kwargs)


def callback_session(ca_bundle: str | Path | None = None,
                     timeout: float = CALLBACK_TIMEOUT) -> requests.Session:
    """The HTTP session of every outgoing call (MDM callbacks; zeep's Transport(session=...)).

    The server's certificate is always verified: against ``ca_bundle`` (a PEM file of the CAs
    the head-end trusts for its MDM endpoints) when given, else against the system's CAs.
    """
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise ValueError(f"CA bundle {ca_bundle} is not a file")
    return VerifyingSession(True if ca_bundle is None else str(ca_bundle), timeout)
