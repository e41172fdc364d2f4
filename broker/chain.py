"""Whether a staged certificate chain leads to a trust anchor: the certificate is worth a restart.

No D-Bus here. mod_md activates any staged certificate whose key matches, whoever issued it;
www-data can write `staging/`, so without this check a self-made certificate would be served.
The verification itself is OpenSSL's (through pyOpenSSL, as packaged in Debian 12): signatures,
validity at the given time, CA constraints (basicConstraints, keyUsage, path length, name
constraints) up to a certificate of `trust_anchors`.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from .errors import ConfigError, StagingInvalid

# ca-certificates.crt holds about 150 roots (220 KB); a bundle far beyond that is a mistake.
MAX_ANCHOR_FILE_BYTES = 8 * 1024 * 1024
MAX_ANCHORS = 10_000

_PEM_CERT_RE = re.compile(
    rb"^-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class TrustAnchors:
    """The roots a staged chain must verify to, parsed once at start."""

    certs: tuple[crypto.X509, ...]
    files: tuple[str, ...]

    @classmethod
    def load(cls, paths: Sequence[str]) -> TrustAnchors:
        """Every certificate of every PEM file in `paths`; ConfigError naming the file when one
        is missing, unreadable, too large or holds no certificate."""
        certs: list[crypto.X509] = []
        for path in paths:
            what = f"trust_anchors: {path}"
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_ANCHOR_FILE_BYTES + 1)
            except OSError as e:
                raise ConfigError(f"{what}: cannot read it ({e.strerror})") from None
            if len(data) > MAX_ANCHOR_FILE_BYTES:
                raise ConfigError(f"{what}: larger than {MAX_ANCHOR_FILE_BYTES} bytes")
            blocks = _PEM_CERT_RE.findall(data)
            if not blocks:
                raise ConfigError(f"{what}: holds no PEM certificate")
            for i, block in enumerate(blocks, 1):
                try:
                    certs.append(crypto.load_certificate(crypto.FILETYPE_PEM, block))
                except crypto.Error:
                    raise ConfigError(f"{what}: certificate {i} does not parse") from None
            if len(certs) > MAX_ANCHORS:
                raise ConfigError(f"trust_anchors: more than {MAX_ANCHORS} certificates in all")
        if not certs:
            raise ConfigError("trust_anchors: no file given, so no staged certificate could ever verify")
        return cls(tuple(certs), tuple(os.fspath(p) for p in paths))

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustAnchors:
        """Anchors from PEM text (tests and benches)."""
        return cls(tuple(crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in _PEM_CERT_RE.findall(pem)), ())


def _printable(text: str, limit: int = 120) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def verify_chain(anchors: TrustAnchors | None, chain: Sequence[x509.Certificate], at: float, rel: str) -> None:
    """`chain[0]` (the leaf) verifies through `chain[1:]` to an anchor at time `at`, and is a
    TLS server certificate; StagingInvalid("chain") otherwise."""
    if anchors is None or not anchors.certs:
        raise StagingInvalid("chain", f"{rel} cannot be verified: no trust anchors are configured")
    leaf = chain[0]
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise StagingInvalid("chain", f"{rel}: the leaf is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if (ExtendedKeyUsageOID.SERVER_AUTH not in eku
                and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku):
            raise StagingInvalid("chain", f"{rel}: the leaf is not for TLS servers (extendedKeyUsage)")
    except x509.ExtensionNotFound:
        pass
    # A fresh X509Store per check: set_time changes the store, and checks may run in threads.
    store = crypto.X509Store()
    for cert in anchors.certs:
        store.add_cert(cert)
    store.set_time(datetime.datetime.fromtimestamp(at, datetime.UTC).replace(tzinfo=None))
    # An intermediate configured as an anchor is trusted as such (a pinned issuing CA).
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    try:
        ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf),
                                      chain=[crypto.X509.from_cryptography(c) for c in chain[1:]])
        ctx.verify_certificate()
    except crypto.X509StoreContextError as e:
        errors = getattr(e, "errors", None)
        reason = str(errors[2]) if isinstance(errors, list | tuple) and len(errors) > 2 else "verification failed"
        depth = errors[1] if isinstance(errors, list | tuple) and len(errors) > 1 else None
        where = "the leaf" if depth == 0 else (f"chain certificate {depth}" if isinstance(depth, int) else "the chain")
        raise StagingInvalid(
            "chain", f"{rel} does not verify to a trust anchor ({where}: {_printable(reason)})") from None
    except (crypto.Error, ValueError, TypeError):
        raise StagingInvalid("chain", f"{rel} does not verify to a trust anchor") from None
