"""A throwaway certificate authority for TLS and mutual-TLS broker tests."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.brokers import Broker, free_port, start_mosquitto

_DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)


class TestCA:
    """A CA that issues a broker certificate and client certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name("aftershock-test-ca"))
            .issuer_name(_name("aftershock-test-ca"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / "ca.crt"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, server: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if server
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
        )
        if server:
            alt_names = x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            )
            builder = builder.add_extension(alt_names, False)
        cert = builder.sign(self._key, hashes.SHA256())

        issued = Issued(
            cert=self.directory / f"{common_name}.crt",
            key=self.directory / f"{common_name}.key",
        )
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        return issued


@contextmanager
def deployed_mosquitto(workdir: Path, ca: TestCA) -> Iterator[Broker]:
    """Mosquitto running deploy/mosquitto/mosquitto.conf and its ACL as they
    are, with only the listener port and file paths rewritten for a test."""
    port = free_port()
    server = ca.issue("broker", server=True)
    acl = workdir / "acl"
    acl.write_text((_DEPLOY / "acl").read_text())

    config = (_DEPLOY / "mosquitto.conf").read_text()
    config = re.sub(
        r"^listener 8883$", f"listener {port} 127.0.0.1", config, flags=re.M
    )
    for example, real in [
        ("/etc/mosquitto/certs/ca.crt", ca.cert),
        ("/etc/mosquitto/certs/broker.crt", server.cert),
        ("/etc/mosquitto/certs/broker.key", server.key),
        ("/etc/mosquitto/acl", acl),
    ]:
        config = config.replace(example, str(real))
    if str(port) not in config or str(acl) not in config:
        msg = "deploy/mosquitto/mosquitto.conf no longer has the lines this rewrites"
        raise RuntimeError(msg)
    # Started as root, Mosquitto would switch to its own user, which cannot
    # read pytest's private temporary directory.
    config += "user root\n"

    broker = start_mosquitto(workdir, port=port, raw_config=config)
    try:
        yield broker
    finally:
        broker.stop()
