"""TLS for the Redis that `cluster up` starts: a certificate authority of the cluster's own, made
once on the machine that runs `up` (``state_dir/tls``), and a certificate for the Redis host
that it signs. Redis listens on TLS only; every agent, worker and coordinator verifies the
server's certificate against the cluster's CA and its name (the Redis host's address), so a
machine in the middle can neither read the traffic nor pose as Redis.

Files, in ``state_dir/tls`` (keys mode 0600)::

    ca.pem ca.key        the cluster's CA (10 years)
    redis.pem redis.key  the Redis host's certificate (its address as subject alternative
                         name), made again when that address changes

On the hosts, ``install_dir/tls/ca.pem``; on the Redis host also ``redis/tls/``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .credentials import read_private, write_private

CA_DAYS = 3650
SERVER_DAYS = 3650


@dataclass(frozen=True)
class ServerTls:
    """What the Redis host needs, as PEM text."""

    ca: str
    cert: str
    key: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_name(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def make_ca(cluster: str) -> tuple[str, str]:
    """A new CA: (certificate, key), PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(f"cluster {cluster} CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)


def server_certificate(ca_pem: str, ca_key_pem: str, address: str) -> tuple[str, str]:
    """A certificate for Redis at ``address`` (IP or DNS name), signed by the CA."""
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(address)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName([_alt_name(address)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)


def names_of(cert_pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in names]


def ensure(directory: Path, cluster: str, address: str) -> ServerTls:
    """The cluster's CA (made once) and a certificate for Redis at ``address`` (made again
    only when the address changed), kept in ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_file, ca_key_file = directory / "ca.pem", directory / "ca.key"
    if not ca_file.exists() or not ca_key_file.exists():
        ca, ca_key = make_ca(cluster)
        write_private(ca_key_file, ca_key)
        write_private(ca_file, ca)
    ca, ca_key = ca_file.read_text(), read_private(ca_key_file)
    cert_file, key_file = directory / "redis.pem", directory / "redis.key"
    if not cert_file.exists() or not key_file.exists() or \
            names_of(cert_file.read_text()) != [str(_alt_name(address).value)]:
        cert, key = server_certificate(ca, ca_key, address)
        write_private(key_file, key)
        write_private(cert_file, cert)
    return ServerTls(ca, cert_file.read_text(), read_private(key_file))
