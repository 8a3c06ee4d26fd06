"""The cluster's own certificate authority (``tls.py``): made once, kept private, and a
certificate for the Redis host's address that it signed, made again when that address
changes. (TLS on the wire is tested on namespace hosts: ``test_hosts``.)"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from cluster import tls


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_ca_is_made_once_and_signs_the_redis_hosts_certificate(tmp_path: Path):
    where = tmp_path / "tls"
    first = tls.ensure(where, "lab", "10.0.0.11")
    assert (where.stat().st_mode & 0o777) == 0o700
    for private in ("ca.key", "redis.key"):
        assert (where / private).stat().st_mode & 0o777 == 0o600
    ca, server = load(where / "ca.pem"), load(where / "redis.pem")
    server.verify_directly_issued_by(ca)
    assert tls.names_of(first.cert) == ["10.0.0.11"]
    again = tls.ensure(where, "lab", "10.0.0.11")
    assert again == first  # nothing made anew
    moved = tls.ensure(where, "lab", "redis.example.org")
    assert moved.ca == first.ca and moved.cert != first.cert
    assert tls.names_of(moved.cert) == ["redis.example.org"]
    load(where / "redis.pem").verify_directly_issued_by(ca)
