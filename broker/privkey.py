"""Whether a staged private key belongs to its certificate, decrypted in memory only.

No D-Bus here. mod_md writes staged keys as encrypted PKCS#8 PEM ("ENCRYPTED PRIVATE KEY",
PBES2 with PBKDF2 and AES-CBC, OpenSSL's defaults) whose passphrase is the base64url-decoded
`key` of `<store>/md_store.json` (48 bytes; md_store_fs.c). On activation mod_md purges a set
whose key does not match, and the old certificate stays: a restart for such a set is wasted,
so it is refused before.

Decryption cost is chosen by whoever wrote the file (the PBKDF2 iteration count): www-data can
write `staging/`, so the parameters are read from the DER first, the count is capped, and any
other scheme (scrypt, PKCS#12 PBE, legacy PEM encryption) is refused.

The decryption is PBES2 (RFC 8018) composed of `cryptography`'s PBKDF2 and AES-CBC, and the
key is then read by OpenSSL (pyOpenSSL, from DER). Neither library's own loader of encrypted
keys fits the broker: pyOpenSSL's passes the passphrase through a cffi callback, which needs
writable and executable memory (MemoryDenyWriteExecute= in the unit forbids it: MemoryError),
and `cryptography` before 39 (Debian 12 has 38) validates RSA keys while loading them, which
costs 70 ms for RSA-2048 and 7 s for RSA-8192, chosen by www-data. The key is never logged or
kept: only its public half is compared.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
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
# PBKDF2's pseudo-random function (RFC 8018; the default is hmacWithSHA1).
_PRFS: dict[bytes, type[hashes.HashAlgorithm]] = {
    bytes.fromhex("2a864886f70d0207"): hashes.SHA1,     # hmacWithSHA1
    bytes.fromhex("2a864886f70d0209"): hashes.SHA256,   # hmacWithSHA256 (OpenSSL's default)
    bytes.fromhex("2a864886f70d020a"): hashes.SHA384,
    bytes.fromhex("2a864886f70d020b"): hashes.SHA512,
}
# AES-CBC: key length in bytes (mod_md asks for AES-256-CBC).
_CIPHERS = {
    bytes.fromhex("608648016503040102"): 16,            # aes128-CBC
    bytes.fromhex("608648016503040116"): 24,            # aes192-CBC
    bytes.fromhex("60864801650304012a"): 32,            # aes256-CBC
}
_SEQUENCE, _INTEGER, _OCTET_STRING, _NULL, _OID = 0x30, 0x02, 0x04, 0x05, 0x06


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
    """A strict reader of definite-length DER, enough for PBES2's parameters."""

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

    def bytes(self, tag: int) -> bytes:
        start, end = self.read(tag)
        return self.data[start:end]

    def integer(self) -> int:
        """A positive INTEGER of at most four bytes."""
        value = self.bytes(_INTEGER)
        if not 0 < len(value) <= 4 or value[0] & 0x80:
            raise ValueError("bad integer")
        return int.from_bytes(value, "big")

    def enter(self, tag: int) -> _Der:
        start, end = self.read(tag)
        return _Der(self.data, start, end)

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < self.end else None

    def done(self) -> None:
        if self.pos != self.end:
            raise ValueError("trailing data")


@dataclass(frozen=True)
class _Pbes2:
    salt: bytes
    iterations: int
    prf: type[hashes.HashAlgorithm]
    key_size: int
    iv: bytes
    ciphertext: bytes


def _parse_pbes2(der: bytes) -> _Pbes2:
    """An EncryptedPrivateKeyInfo with PBES2, PBKDF2 and AES-CBC; ValueError for anything else."""
    outer = _Der(der)
    info = outer.enter(_SEQUENCE)
    outer.done()
    alg = info.enter(_SEQUENCE)
    if alg.bytes(_OID) != _OID_PBES2:
        raise ValueError("not PBES2")
    params = alg.enter(_SEQUENCE)
    alg.done()
    kdf = params.enter(_SEQUENCE)
    if kdf.bytes(_OID) != _OID_PBKDF2:
        raise ValueError("not PBKDF2")
    kdf_params = kdf.enter(_SEQUENCE)
    kdf.done()
    salt = kdf_params.bytes(_OCTET_STRING)
    iterations = kdf_params.integer()
    key_length = kdf_params.integer() if kdf_params.peek() == _INTEGER else None
    prf: type[hashes.HashAlgorithm] = hashes.SHA1
    if kdf_params.peek() is not None:
        prf_alg = kdf_params.enter(_SEQUENCE)
        prf_oid = prf_alg.bytes(_OID)
        if prf_oid not in _PRFS:
            raise ValueError("unknown PBKDF2 function")
        prf = _PRFS[prf_oid]
        if prf_alg.peek() == _NULL:
            prf_alg.bytes(_NULL)
        prf_alg.done()
    kdf_params.done()
    scheme = params.enter(_SEQUENCE)
    params.done()
    key_size = _CIPHERS.get(scheme.bytes(_OID))
    if key_size is None or (key_length is not None and key_length != key_size):
        raise ValueError("not AES-CBC")
    iv = scheme.bytes(_OCTET_STRING)
    scheme.done()
    ciphertext = info.bytes(_OCTET_STRING)
    info.done()
    if len(iv) != 16 or not ciphertext or len(ciphertext) % 16 or not 1 <= len(salt) <= 64:
        raise ValueError("bad parameters")
    return _Pbes2(salt, iterations, prf, key_size, iv, ciphertext)


def _decrypt(params: _Pbes2, passphrase: bytes) -> bytes:
    """The PrivateKeyInfo DER inside; ValueError when the padding shows a wrong passphrase."""
    key = PBKDF2HMAC(algorithm=params.prf(), length=params.key_size, salt=params.salt,
                     iterations=params.iterations).derive(passphrase)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(params.iv)).decryptor()
    padded = decryptor.update(params.ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


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
        params = _parse_pbes2(der)
    except (binascii.Error, ValueError, IndexError):
        raise StagingInvalid(
            "key-file", f"{rel} is not encrypted with PBES2/PBKDF2/AES-CBC as mod_md writes its keys") from None
    if params.iterations > MAX_KDF_ITERATIONS:
        raise StagingInvalid("key-file", f"{rel} asks for more than {MAX_KDF_ITERATIONS} key derivation rounds")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_ASN1, _decrypt(params, passphrase))
        public = crypto.dump_publickey(crypto.FILETYPE_ASN1, key)
    except (crypto.Error, ValueError, TypeError, UnsupportedAlgorithm):
        raise StagingInvalid("key-decrypt", f"{rel} does not decrypt with the store's key") from None
    try:
        expected = crypto.dump_publickey(crypto.FILETYPE_ASN1, leaf.get_pubkey())
    except (crypto.Error, ValueError, TypeError):
        raise StagingInvalid("key-mismatch", f"{rel}: the certificate's public key cannot be read") from None
    if public != expected:
        raise StagingInvalid("key-mismatch", f"{rel} is not the key of the staged certificate")
