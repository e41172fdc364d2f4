"""What Apache serves right now, and whether it lags behind the store. No D-Bus here.

In a cluster several Apache servers share one MD store. The node that restarts first activates
a staged set (staging/<md> -> domains/<md>); every other node keeps serving the old certificate
until something restarts it, and no hook tells it so. The probe addresses of this node say what
it serves; domains/<md>/ (root-owned, written by mod_md) says what it should serve. A served
certificate for the MD's name that is older than the active one is "served behind the store".

Probing is network I/O: every handshake runs on the event loop with its own timeout, a
semaphore caps handshakes in flight, and one deadline bounds the whole round.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .staging import CertSet, name_covered
from .verify import _describe_error, served_certificate

# One handshake; a probe that does not answer within this is reported as an error.
ATTEMPT_SECONDS = 3.0
# The whole round, however many MDs and probes: a check must come back in bounded time.
ROUND_SECONDS = 20.0
# Handshakes in flight at once (32 probes is the config's limit; MDs multiply that).
MAX_CONCURRENT = 16
# What is remembered about refresh restarts that did not help; the oldest is forgotten first.
MAX_REMEMBERED = 4096


@dataclass(frozen=True)
class Served:
    """What one probe address served for one MD's name (or why it could not be seen)."""

    probe: str
    key_type: str = ""       # "rsa" or the EC curve name, as mod_md names key types
    serial: str = ""         # lower-case hex
    sha256: str = ""         # of the leaf's DER
    not_before: float = 0.0  # epoch seconds
    not_after: float = 0.0
    names: tuple[str, ...] = ()
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probe": self.probe, "error": self.error}
        if not self.error:
            out.update(key_type=self.key_type, serial=self.serial, sha256=self.sha256,
                       not_after_usec=max(0, int(round(self.not_after * 1_000_000))))
        return out


def sni_name(cset: CertSet) -> str | None:
    """The name to send as SNI: the MD's first name that is not a wildcard (None: only wildcards)."""
    return next((n for n in cset.names if not n.startswith("*")), None)


def _key_type(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name
    return type(key).__name__


def describe(probe: str, der: bytes) -> Served:
    """The Served entry for a leaf certificate's DER (an error entry when it does not parse)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(n.lower() for n in sans.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = ()
        return Served(
            probe=probe,
            key_type=_key_type(cert),
            serial=format(cert.serial_number, "x"),
            sha256=hashlib.sha256(der).hexdigest(),
            not_before=_epoch(cert, "not_valid_before"),
            not_after=_epoch(cert, "not_valid_after"),
            names=names,
        )
    except ValueError as e:
        return Served(probe=probe, error=f"unparsable certificate: {e}")


def _epoch(cert: x509.Certificate, attr: str) -> float:
    # cryptography 38 (Debian 12) has only the naive UTC accessors; newer ones deprecate them.
    when = getattr(cert, attr + "_utc", None) or getattr(cert, attr).replace(tzinfo=datetime.UTC)
    return float(when.timestamp())


async def probe_one(probe: str, server_name: str, timeout: float = ATTEMPT_SECONDS) -> Served:
    try:
        der = await served_certificate(probe, server_name, timeout)
    except (OSError, ValueError, EOFError) as e:
        return Served(probe=probe, error=_describe_error(e))
    return describe(probe, der)


async def probe_all(probes: Sequence[str], names: Mapping[str, str],
                    attempt: float = ATTEMPT_SECONDS, total: float = ROUND_SECONDS) -> dict[str, list[Served]]:
    """md -> what each probe serves for `names[md]` (the SNI name), in `probes` order.

    Never raises for network trouble: an address that fails, or that the round's deadline
    cuts off, gets an entry with its error.
    """
    results: dict[tuple[str, str], Served] = {}
    gate = asyncio.Semaphore(MAX_CONCURRENT)

    async def one(md: str, probe: str) -> None:
        async with gate:
            results[(md, probe)] = await probe_one(probe, names[md], attempt)

    tasks = [asyncio.ensure_future(one(md, probe)) for md in names for probe in probes]
    if tasks:
        _done, late = await asyncio.wait(tasks, timeout=total)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
    return {md: [results.get((md, p)) or Served(probe=p, error="no answer in time") for p in probes]
            for md in names}


def behind(served: Sequence[Served], active: CertSet, server_name: str) -> list[Served]:
    """The entries that serve an older certificate for `server_name` than the active set.

    Older means: not one of the active leaves, and issued before the active leaf of the same
    key type (or before every active leaf when its key type is not active at all). A probe
    that serves a certificate for other names (another vhost, another server) says nothing
    about this MD; a newer one (an admin's manual certificate) is not ours to replace.
    """
    active_sha = {c.sha256 for c in active.certs}
    lagging = []
    for entry in served:
        if entry.error or entry.sha256 in active_sha or not name_covered(server_name, entry.names):
            continue
        same_type = [c.not_before for c in active.certs if c.key_type == entry.key_type]
        newest = max(same_type) if same_type else min(c.not_before for c in active.certs)
        if entry.not_before < newest:
            lagging.append(entry)
    return lagging


class RefreshMemory:
    """Refresh restarts (for an MD served behind the store) that did not fix what was served.

    md -> the active set's fingerprint at the time. A restart that did not make this node serve
    that set will not make it next time either (the probe address may be another server, or
    Apache may not use the store): one try per active set, until it changes or root asks.
    """

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}

    def failed_before(self, md: str, fingerprint: str) -> bool:
        return self.failed.get(md) == fingerprint

    def remember(self, md: str, fingerprint: str) -> None:
        self.failed.pop(md, None)  # re-inserted at the end, so the oldest go first
        self.failed[md] = fingerprint
        while len(self.failed) > MAX_REMEMBERED:
            del self.failed[next(iter(self.failed))]

    def forget(self, md: str) -> bool:
        return self.failed.pop(md, None) is not None

    def to_dict(self) -> dict[str, str]:
        return dict(self.failed)

    @classmethod
    def from_dict(cls, data: object) -> RefreshMemory:
        """ValueError on anything but a bounded map of non-empty strings."""
        if not isinstance(data, dict) or len(data) > MAX_REMEMBERED or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in data.items()):
            raise ValueError("refresh_failed is not a bounded map of names to fingerprints")
        memory = cls()
        memory.failed.update(data)
        return memory
