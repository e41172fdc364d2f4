"""What mod_md has staged for an MD, and whether it is sound enough to restart for.

No D-Bus here. `staging/` is written by www-data: every path under the store is opened
relative to a directory fd without following symlinks, only regular files are read, and
every read is capped.

(Interface fixed by the design; the implementation is being written.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CertInfo:
    key_type: str            # "rsa" or the EC curve name, e.g. "secp256r1"
    file: str                # file name inside the set, e.g. "pubcert.pem"
    serial: str              # leaf serial, lower-case hex without leading zeros
    sha256: str              # lower-case hex SHA-256 of the leaf's DER
    not_before: float        # epoch seconds
    not_after: float         # epoch seconds
    issuer: str              # RFC 4514 string of the leaf's issuer
    names: tuple[str, ...]   # the leaf's DNS subjectAltNames


@dataclass(frozen=True)
class CertSet:
    md: str
    names: tuple[str, ...]        # the MD's names (root-owned domains/<md>/md.json wins)
    certs: tuple[CertInfo, ...]   # one per configured key type, in md.json order
    fingerprint: str              # identity of the set: sha256 over the sorted leaf sha256s
    since: float                  # mtime of the newest pubcert*.pem (when it was staged/activated)
