"""Certificates as the tests look at them: a throwaway CA, and what a TLS server really serves."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import storefactory
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
    """A CA and a certificate for ``hostname`` and 127.0.0.1 signed by it, valid for a day, made
    by the same builders as the tests' certificate sets (harness/storefactory.py).

    EC P-256 keys: generated in microseconds, and both Go (pebble) and OpenSSL (mod_md's curl) take them.
    """
    ca = storefactory.make_ca("apache-restart-broker test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    leaf = storefactory.issue([hostname, "127.0.0.1"], "secp256r1", ca=ca, key=key,
                              not_before=now - 300, not_after=now + 86400, common_name=hostname)
    pem = serialization.Encoding.PEM
    files = TLSFiles(ca_cert=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
    write_file(files.ca_cert, ca.pem)
    write_file(files.cert, leaf.cert.public_bytes(pem))
    write_file(files.key, storefactory.key_pem(key), mode=0o600)
    return files


class CertificateServer:
    """A TLS server on loopback, in its own thread, that serves one certificate set to every
    client (what a probe address shows, without an Apache): ``with CertificateServer(...) as s``
    or ``start()``; ``address`` is "127.0.0.1:PORT"."""

    def __init__(self, directory: Path, issued: storefactory.Issued, name: str = "served") -> None:
        self.issued = issued
        cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
        write_file(cert, issued.chain_pem)
        write_file(key, storefactory.key_pem(issued.key), mode=0o600)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.address = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()
            except (OSError, ssl.SSLError):
                pass
            writer.close()

        server = self._loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, ssl=self._ctx))
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def start(self) -> CertificateServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS server did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> CertificateServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
