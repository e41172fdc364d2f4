"""Certificates as the tests look at them: a throwaway CA, and what a TLS server really serves."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .procs import write_file


@dataclass(frozen=True)
class CertInfo:
    """The facts of one certificate that the tests compare."""

    serial: int
    issuer: str
    subject: str
    sha256: str  # hex of the DER's SHA-256, lower case
    not_before: datetime.datetime
    not_after: datetime.datetime
    dns_names: tuple[str, ...]
    der: bytes

    @property
    def serial_hex(self) -> str:
        """The serial as mod_md's md-status shows it: upper-case hex of whole bytes ("03543C…")."""
        digits = format(self.serial, "X")
        return digits.zfill(len(digits) + len(digits) % 2)

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    @classmethod
    def from_der(cls, der: bytes) -> CertInfo:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = tuple(san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = ()
        return cls(
            serial=cert.serial_number,
            issuer=cert.issuer.rfc4514_string(),
            subject=cert.subject.rfc4514_string(),
            sha256=hashlib.sha256(der).hexdigest(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            dns_names=names,
            der=der,
        )

    @classmethod
    def from_pem_file(cls, path: Path) -> CertInfo:
        """The first certificate of a PEM file (the leaf of a chain file such as pubcert.pem)."""
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
        return cls.from_der(cert.public_bytes(serialization.Encoding.DER))


def served_certificate(host: str, port: int, server_name: str | None, timeout: float = 5.0) -> CertInfo:
    """The leaf certificate a TLS server presents for ``server_name`` (SNI); no verification."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return CertInfo.from_der(der)


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and one server certificate signed by it (PEM files)."""

    ca_cert: Path
    cert: Path
    key: Path


def make_server_tls(directory: Path, hostname: str = "localhost") -> TLSFiles:
    """Create a CA and a certificate for ``hostname`` (and 127.0.0.1), valid for a day.

    EC P-256 keys: generated in microseconds, and both Go (pebble) and OpenSSL (mod_md's curl) take them.
    """
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apache-restart-broker test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    files = TLSFiles(ca_cert=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
    write_file(files.ca_cert, ca_cert.public_bytes(pem))
    write_file(files.cert, cert.public_bytes(pem))
    write_file(
        files.key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        mode=0o600,
    )
    return files
