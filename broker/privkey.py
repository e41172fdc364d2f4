"""Whether a staged private key belongs to its certificate, decrypted in memory only.

No D-Bus here. mod_md writes staged keys as encrypted PKCS#8 PEM ("ENCRYPTED PRIVATE KEY",
PBES2 with PBKDF2, OpenSSL's defaults) whose passphrase is the base64url-decoded `key` of
`<store>/md_store.json` (48 bytes; md_store_fs.c). On activation mod_md purges a set whose key
does not match, and the old certificate stays: a restart for such a set is wasted, so it is
refused before.

Decryption cost is chosen by whoever wrote the file (the PBKDF2 iteration count): www-data can
write `staging/`, so the count is read from the DER first and capped, and any other scheme
(scrypt, PKCS#12 PBE, legacy PEM encryption) is refused. The key is never logged or kept: only
its public half is compared.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from OpenSSL import crypto

from .errors import StagingInvalid

MAX_STORE_JSON_BYTES = 4096
STORE_KEY_BYTES = 48                  # mod_md's FS_STORE_KLEN
MAX_KEY_PEM_BYTES = 16 * 1024         # an encrypted RSA-8192 key is about 6.5 KB
# OpenSSL writes 2048 (PKCS5_DEFAULT_ITER); 10,000 PBKDF2-SHA256 rounds cost about 3 ms.
MAX_KDF_ITERATIONS = 10_000

_PEM_RE = re.compile(
    rb"\A\s*-----BEGIN ENCRYPTED PRIVATE KEY-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END ENCRYPTED PRIVATE KEY-----\s*\Z")
_OID_PBES2 = bytes.fromhex("2a864886f70d01050d")     # 1.2.840.113549.1.5.13
_OID_PBKDF2 = bytes.fromhex("2a864886f70d01050c")    # 1.2.840.113549.1.5.12
_SEQUENCE, _INTEGER, _OCTET_STRING, _OID = 0x30, 0x02, 0x04, 0x06


def passphrase_from_store_json(data: bytes) -> bytes:
    """The staged keys' passphrase from md_store.json's content; StagingInvalid("store-key")."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise StagingInvalid("store-key", "md_store.json is not valid JSON") from None
    key64 = obj.get("key") if isinstance(obj, dict) else None
    if not isinstance(key64, str) or not key64.isascii():
        raise StagingInvalid("store-key", "md_store.json has no key")
    try:
        key = base64.urlsafe_b64decode(key64 + "=" * (-len(key64) % 4))
    except (binascii.Error, ValueError):
        raise StagingInvalid("store-key", "md_store.json's key is not base64url") from None
    if len(key) != STORE_KEY_BYTES:
        raise StagingInvalid("store-key", f"md_store.json's key is not {STORE_KEY_BYTES} bytes long")
    return key


class _Der:
    """A strict reader of definite-length DER, enough to reach PBES2's parameters."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None):
        self.data, self.pos, self.end = data, start, len(data) if end is None else end

    def read(self, tag: int) -> tuple[int, int]:
        """(start, end) of the next element's content, which must have `tag`."""
        d, p = self.data, self.pos
        if p + 2 > self.end or d[p] != tag:
            raise ValueError("unexpected element")
        n = d[p + 1]
        p += 2
        if n & 0x80:
            count = n & 0x7F
            if count == 0 or count > 3 or p + count > self.end:
                raise ValueError("bad length")
            n = int.from_bytes(d[p:p + count], "big")
            p += count
        if p + n > self.end:
            raise ValueError("truncated")
        self.pos = p + n
        return p, p + n

    def enter(self, tag: int) -> _Der:
        start, end = self.read(tag)
        return _Der(self.data, start, end)

    def more(self) -> bool:
        return self.pos < self.end


def _kdf_iterations(der: bytes) -> int:
    """PBKDF2's iteration count of an EncryptedPrivateKeyInfo; ValueError for anything else."""
    info = _Der(der).enter(_SEQUENCE)
    alg = info.enter(_SEQUENCE)
    s, e = alg.read(_OID)
    if der[s:e] != _OID_PBES2:
        raise ValueError("not PBES2")
    kdf = alg.enter(_SEQUENCE).enter(_SEQUENCE)
    s, e = kdf.read(_OID)
    if der[s:e] != _OID_PBKDF2:
        raise ValueError("not PBKDF2")
    params = kdf.enter(_SEQUENCE)
    params.read(_OCTET_STRING)
    s, e = params.read(_INTEGER)
    if not 0 < e - s <= 4 or der[s] & 0x80:
        raise ValueError("bad iteration count")
    return int.from_bytes(der[s:e], "big")


def check_key(pem: bytes, passphrase: bytes, leaf: crypto.X509, rel: str) -> None:
    """The key in `pem` decrypts with `passphrase` and is the key of `leaf`.

    StagingInvalid: "key-file" (not an encrypted PKCS#8 key as mod_md writes it), "key-decrypt"
    (does not decrypt), "key-mismatch" (another key than the certificate's).
    """
    if len(pem) > MAX_KEY_PEM_BYTES:
        raise StagingInvalid("key-file", f"{rel} is larger than {MAX_KEY_PEM_BYTES} bytes")
    m = _PEM_RE.match(pem)
    if m is None:
        raise StagingInvalid("key-file", f"{rel} does not hold one encrypted PKCS#8 key as mod_md writes it")
    try:
        der = base64.b64decode(re.sub(rb"\s", b"", m.group(1)), validate=True)
        iterations = _kdf_iterations(der)
    except (binascii.Error, ValueError, IndexError):
        raise StagingInvalid(
            "key-file", f"{rel} is not encrypted with PBES2/PBKDF2 as mod_md writes its keys") from None
    if iterations > MAX_KDF_ITERATIONS:
        raise StagingInvalid("key-file", f"{rel} asks for more than {MAX_KDF_ITERATIONS} key derivation rounds")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, pem, passphrase=passphrase)
        public = crypto.dump_publickey(crypto.FILETYPE_ASN1, key)
    except (crypto.Error, ValueError, TypeError):
        raise StagingInvalid("key-decrypt", f"{rel} does not decrypt with the store's key") from None
    try:
        expected = crypto.dump_publickey(crypto.FILETYPE_ASN1, leaf.get_pubkey())
    except (crypto.Error, ValueError, TypeError):
        raise StagingInvalid("key-mismatch", f"{rel}: the certificate's public key cannot be read") from None
    if public != expected:
        raise StagingInvalid("key-mismatch", f"{rel} is not the key of the staged certificate")
