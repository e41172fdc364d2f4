"""Fake mod_md stores with real certificates, for tests of every tier.

The layout and file formats follow mod_md (see broker/staging.py for the facts):

    <store>/md_store.json                {"store": {"version": 3}, "key": "<base64url>"}
    <store>/domains/<md>/                md.json, pubcert*.pem, privkey*.pem (keys plain PKCS#8)
    <store>/staging/<md>/                md.json, job.json, pubcert*.pem, privkey*.pem
                                         (keys encrypted PKCS#8, passphrase = decoded store key)
    <store>/archive/<md>.<N>/            earlier active sets

Key types are "rsa" or an EC curve name ("secp256r1", "secp384r1", ...). Key generation is
cached per process (one key per key type), so making certificates is fast.

Typical use:

    store = make_store(tmp_path)
    old = add_active(store, "example.org", ["example.org", "www.example.org"])
    new = add_staged(store, "example.org", ["example.org", "www.example.org"])
    Store(str(store)).check_staged("example.org").fingerprint == new.fingerprint
    activate(store, "example.org")     # what mod_md does on a graceful restart
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RSA_BITS = 2048
CA_URL = "https://localhost:14000/dir"

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "prime256v1": ec.SECP256R1,
    "p-256": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "p-384": ec.SECP384R1,
    "secp521r1": ec.SECP521R1,
    "p-521": ec.SECP521R1,
}

DEFAULT_JOB: dict[str, Any] = {"finished": True, "notified-renewed": False}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _utc(t: datetime.datetime | float | None, default: datetime.datetime) -> datetime.datetime:
    if t is None:
        return default
    if isinstance(t, int | float):
        return datetime.datetime.fromtimestamp(t, datetime.UTC)
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def is_rsa(key_type: str) -> bool:
    return key_type.lower() == "rsa"


def pubcert_name(key_type: str) -> str:
    """mod_md's file name for a key type's certificate chain."""
    return "pubcert.pem" if is_rsa(key_type) else f"pubcert.{key_type}.pem".lower()


def privkey_name(key_type: str) -> str:
    """mod_md's file name for a key type's private key."""
    return "privkey.pem" if is_rsa(key_type) else f"privkey.{key_type}.pem".lower()


@functools.cache
def leaf_key(key_type: str) -> PrivateKey:
    """The process-wide key of a key type (RSA generation is slow: one per process)."""
    if is_rsa(key_type):
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return new_key(key_type)  # type: ignore[return-value]


def new_key(key_type: str) -> PrivateKey:
    """A fresh key (cheap for EC; RSA takes about 0.1 s)."""
    if is_rsa(key_type):
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    try:
        curve = _CURVES[key_type.lower()]
    except KeyError:
        raise ValueError(f"storefactory knows no curve {key_type!r}") from None
    return ec.generate_private_key(curve())


def key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted when a passphrase is given (as mod_md writes staged keys)."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@dataclass(frozen=True)
class CA:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "storefactory test CA", *,
            not_before: datetime.datetime | float | None = None,
            not_after: datetime.datetime | float | None = None,
            issuer: CA | None = None, is_ca: bool = True) -> CA:
    """A CA with an EC P-256 key, valid from a year ago (or `not_before`) for ten years (or until `not_after`):
    self-signed, or an intermediate signed by `issuer`; `is_ca=False` makes a certificate that
    claims no CA rights (basicConstraints CA:FALSE) but signs anyway."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before, now - datetime.timedelta(days=365)))
        .not_valid_after(_utc(not_after, now + datetime.timedelta(days=3650)))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return CA(common_name, key, cert)


@functools.cache
def default_ca() -> CA:
    return make_ca()


def ca_file(directory: Path | str, *cas: CA) -> Path:
    """A PEM file of `cas` (default: the default CA) for the broker's `trust_anchors`."""
    path = Path(directory) / "trust-anchors.pem"
    _write(path, b"".join(ca.pem for ca in (cas or (default_ca(),))), 0o644)
    return path


def anchors(*cas: CA) -> Any:
    """broker.chain.TrustAnchors of `cas` (default: the default CA), for a Store in tests."""
    from broker.chain import TrustAnchors
    return TrustAnchors.from_pem(b"".join(ca.pem for ca in (cas or (default_ca(),))))


@dataclass(frozen=True)
class Issued:
    key_type: str
    cert: x509.Certificate
    key: PrivateKey
    chain_pem: bytes     # leaf, then the CA: what mod_md writes to pubcert*.pem
    sha256: str          # lower-case hex of the leaf's DER
    serial: str          # lower-case hex, no leading zeros

    @property
    def not_before(self) -> float:
        return _cert_time(self.cert, "not_valid_before")

    @property
    def not_after(self) -> float:
        return _cert_time(self.cert, "not_valid_after")


def _cert_time(cert: x509.Certificate, attr: str) -> float:
    t = getattr(cert, attr + "_utc", None) or getattr(cert, attr).replace(tzinfo=datetime.UTC)
    return t.timestamp()


def issue(
    names: list[str] | tuple[str, ...],
    key_type: str = "rsa",
    *,
    ca: CA | None = None,
    not_before: datetime.datetime | float | None = None,
    not_after: datetime.datetime | float | None = None,
    serial: int | None = None,
    key: PrivateKey | None = None,
    common_name: str | None = None,
    self_signed: bool = False,
) -> Issued:
    """A leaf certificate for `names` (DNS names, or IP addresses) signed by `ca` (or by its own
    key, with `self_signed`).

    Defaults: the default CA, the cached key of `key_type`, valid from an hour ago for 90 days,
    a random serial.
    """
    ca = ca or default_ca()
    key = key or leaf_key(key_type)
    now = _now()
    nb = _utc(not_before, now - datetime.timedelta(hours=1))
    na = _utc(not_after, now + datetime.timedelta(days=90))
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name or (names[0] if names else "no name"))])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key if self_signed else ca.key, hashes.SHA256())
    chain = cert.public_bytes(serialization.Encoding.PEM) + (b"" if self_signed else ca.pem)
    return Issued(
        key_type=key_type,
        cert=cert,
        key=key,
        chain_pem=chain,
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
        serial=format(cert.serial_number, "x"),
    )


def short_names(count: int) -> list[str]:
    """`count` distinct DNS names of one to three characters (base 36): the most
    subjectAltNames per byte, e.g. the 29,000 of the hostile leaf in well under 256 KB of PEM."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    names: list[str] = []
    width = 1
    while len(names) < count:
        for i in range(len(digits) ** width):
            if len(names) == count:
                break
            n, label = i, ""
            for _ in range(width):
                n, r = divmod(n, len(digits))
                label = digits[r] + label
            names.append(label)
        width += 1
    return names


def fingerprint_of(sha256s: list[str] | tuple[str, ...]) -> str:
    """The broker's set fingerprint: sha256 over the sorted leaf sha256 hex strings, "\\n"-joined."""
    return hashlib.sha256("\n".join(sorted(sha256s)).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class SetInfo:
    """What add_active / add_staged wrote, for comparison with broker.staging.CertSet."""

    md: str
    names: tuple[str, ...]
    key_types: tuple[str, ...]
    dir: Path
    certs: dict[str, Issued] = field(default_factory=dict)

    @property
    def sha256s(self) -> tuple[str, ...]:
        return tuple(self.certs[k].sha256 for k in self.key_types)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.sha256s)

    def sha256(self, key_type: str = "rsa") -> str:
        return self.certs[key_type].sha256

    def serial(self, key_type: str = "rsa") -> str:
        return self.certs[key_type].serial


# -- the store ---------------------------------------------------------------------------


def make_store(tmp_path: Path | str, name: str = "md") -> Path:
    """An empty mod_md store under tmp_path: md_store.json and the group directories."""
    store = Path(tmp_path) / name
    store.mkdir(mode=0o755, parents=True)
    key = base64.urlsafe_b64encode(secrets.token_bytes(48)).decode("ascii").rstrip("=")
    _write(store / "md_store.json", json.dumps({"store": {"version": 3}, "key": key}, indent=2), 0o600)
    for group, mode in (("domains", 0o700), ("staging", 0o755), ("archive", 0o700),
                        ("tmp", 0o700), ("challenges", 0o755), ("accounts", 0o755)):
        (store / group).mkdir()
        os.chmod(store / group, mode)
    return store


def store_passphrase(store: Path | str) -> bytes:
    """The passphrase of staged keys: the decoded `key` of md_store.json."""
    meta = json.loads((Path(store) / "md_store.json").read_text())
    key64 = meta["key"]
    return base64.urlsafe_b64decode(key64 + "=" * (-len(key64) % 4))


def privkey_json(key_types: tuple[str, ...] | list[str], explicit: bool | None = None) -> Any:
    """md.json's `privkey`: None (not written) for the unconfigured default, one object or a list."""
    key_types = tuple(key_types)
    if explicit is None:
        explicit = key_types != ("rsa",)
    if not explicit:
        return None
    specs = [
        {"type": "RSA", "bits": RSA_BITS} if is_rsa(k) else {"type": "EC", "curve": k}
        for k in key_types
    ]
    return specs[0] if len(specs) == 1 else specs


def md_json(
    md: str,
    names: list[str] | tuple[str, ...] | None = None,
    key_types: tuple[str, ...] | list[str] = ("rsa",),
    *,
    explicit_privkey: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """md.json as mod_md's md_to_json writes it (keys with '-' can be passed via overrides)."""
    obj: dict[str, Any] = {
        "name": md,
        "domains": list(names or [md]),
        "contacts": [],
        "transitive": 1,
        "ca": {"proto": "ACME", "url": CA_URL, "urls": [CA_URL]},
    }
    pk = privkey_json(key_types, explicit_privkey)
    if pk is not None:
        obj["privkey"] = pk
    obj.update({
        "state": 2,
        "renew-mode": 1,
        "renew-window": "33%",
        "warn-window": "10%",
        "must-staple": False,
        "proto": {"acme-tls/1": []},
        "stapling": False,
        "profile-mandatory": False,
        "ari-renewals": True,
    })
    obj.update(overrides)
    return obj


def _rfc822(t: datetime.datetime) -> str:
    return t.strftime("%a, %d %b %Y %H:%M:%S GMT")


def job_json(md: str, **fields: Any) -> dict[str, Any]:
    """job.json as mod_md's job_to_json writes it after a finished renewal, updated by `fields`."""
    now = _now()
    obj: dict[str, Any] = {
        "name": md,
        "finished": True,
        "notified": False,
        "notified-renewed": False,
        "last-run": _rfc822(now),
        "errors": 0,
        "last": {"status": 0, "detail": "certificate is valid", "activity": "finished"},
        "log": {"entries": [{"when": _rfc822(now), "type": "finished"}]},
    }
    obj.update(fields)
    return obj


def _write(path: Path, data: bytes | str, mode: int) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    os.chmod(path, mode)


def _write_set(
    set_dir: Path,
    md: str,
    names: tuple[str, ...],
    key_types: tuple[str, ...],
    *,
    cert_names: list[str] | tuple[str, ...] | None,
    valid_from: datetime.datetime | float | None,
    valid_until: datetime.datetime | float | None,
    ca: CA | None,
    passphrase: bytes | None,
    md_json_obj: dict[str, Any] | None,
    dir_mode: int,
    file_mode: int,
    keys: dict[str, PrivateKey] | None,
    skip_files: tuple[str, ...],
    self_signed: bool = False,
) -> SetInfo:
    set_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(set_dir, dir_mode)
    if md_json_obj is not None and "md.json" not in skip_files:
        _write(set_dir / "md.json", json.dumps(md_json_obj, indent=2), file_mode)
    certs: dict[str, Issued] = {}
    for kt in key_types:
        issued = issue(list(cert_names if cert_names is not None else names), kt, ca=ca,
                       not_before=valid_from, not_after=valid_until, key=(keys or {}).get(kt),
                       self_signed=self_signed)
        certs[kt] = issued
        if privkey_name(kt) not in skip_files:
            _write(set_dir / privkey_name(kt), key_pem(issued.key, passphrase), file_mode)
    # pubcert last, as mod_md does: its presence marks a complete set.
    for kt in key_types:
        if pubcert_name(kt) not in skip_files:
            _write(set_dir / pubcert_name(kt), certs[kt].chain_pem, file_mode)
    return SetInfo(md, names, key_types, set_dir, certs)


def add_active(
    store: Path | str,
    md: str,
    names: list[str] | tuple[str, ...] | None = None,
    key_types: tuple[str, ...] | list[str] = ("rsa",),
    *,
    valid_from: datetime.datetime | float | None = None,
    valid_until: datetime.datetime | float | None = None,
    not_before: datetime.datetime | float | None = None,
    not_after: datetime.datetime | float | None = None,
    cert_names: list[str] | tuple[str, ...] | None = None,
    ca: CA | None = None,
    explicit_privkey: bool | None = None,
    md_json_obj: dict[str, Any] | None = None,
    keys: dict[str, PrivateKey] | None = None,
) -> SetInfo:
    """Write the active set domains/<md>/ (root only, keys plain) and return what was written.

    The leaf is valid from `valid_from` (alias `not_before`) to `valid_until` (alias
    `not_after`); default: from an hour ago for 90 days.
    """
    store = Path(store)
    names_t = tuple(names or [md])
    key_types_t = tuple(key_types)
    obj = md_json_obj if md_json_obj is not None else md_json(
        md, names_t, key_types_t, explicit_privkey=explicit_privkey)
    return _write_set(store / "domains" / md, md, names_t, key_types_t, cert_names=cert_names,
                      valid_from=_either(valid_from, not_before),
                      valid_until=_either(valid_until, not_after), ca=ca, passphrase=None,
                      md_json_obj=obj, dir_mode=0o700, file_mode=0o600, keys=keys, skip_files=())


def add_staged(
    store: Path | str,
    md: str,
    names: list[str] | tuple[str, ...] | None = None,
    key_types: tuple[str, ...] | list[str] = ("rsa",),
    *,
    job: dict[str, Any] | None = DEFAULT_JOB,
    valid_from: datetime.datetime | float | None = None,
    valid_until: datetime.datetime | float | None = None,
    not_before: datetime.datetime | float | None = None,
    not_after: datetime.datetime | float | None = None,
    cert_names: list[str] | tuple[str, ...] | None = None,
    ca: CA | None = None,
    explicit_privkey: bool | None = None,
    md_json_obj: dict[str, Any] | None = None,
    write_md_json: bool = True,
    keys: dict[str, PrivateKey] | None = None,
    skip_files: tuple[str, ...] = (),
    self_signed: bool = False,
    managed: bool = True,
) -> SetInfo:
    """Write a staged set staging/<md>/ as mod_md leaves it before the `renewed` message.

    Validity as for add_active. `job` fields are laid over a realistic finished job.json
    (None: no job.json). `cert_names`
    are the certificate's SANs (default: `names`). `skip_files` names files not to write
    (e.g. "pubcert.secp256r1.pem" for an incomplete set). Staged keys are encrypted with the
    store's passphrase, as mod_md does. `managed` (the default) also writes domains/<md>/md.json
    when there is none, as Apache's parent does at every start for each configured MD; without
    it the MD is unknown to mod_md. `self_signed` leaves have no CA (chain = the leaf alone).
    """
    store = Path(store)
    names_t = tuple(names or [md])
    key_types_t = tuple(key_types)
    obj: dict[str, Any] | None = None
    if write_md_json:
        obj = md_json_obj if md_json_obj is not None else md_json(
            md, names_t, key_types_t, explicit_privkey=explicit_privkey)
    info = _write_set(store / "staging" / md, md, names_t, key_types_t, cert_names=cert_names,
                      valid_from=_either(valid_from, not_before),
                      valid_until=_either(valid_until, not_after), ca=ca,
                      passphrase=store_passphrase(store), md_json_obj=obj, dir_mode=0o755,
                      file_mode=0o644, keys=keys, skip_files=skip_files, self_signed=self_signed)
    managed_json = store / "domains" / md / "md.json"
    if managed and not managed_json.exists():
        managed_json.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        managed_obj = md_json_obj if md_json_obj is not None else md_json(
            md, names_t, key_types_t, explicit_privkey=explicit_privkey)
        _write(managed_json, json.dumps(managed_obj, indent=2), 0o600)
    if job is not None:
        write_job(store, md, job)
    return info


def write_job(store: Path | str, md: str, fields: dict[str, Any] | None = None, **more: Any) -> Path:
    """(Re)write staging/<md>/job.json: a finished job updated by `fields` and `more`."""
    path = Path(store) / "staging" / md / "job.json"
    _write(path, json.dumps(job_json(md, **{**(fields or {}), **more}), indent=2), 0o644)
    return path


def _either(a: datetime.datetime | float | None,
            b: datetime.datetime | float | None) -> datetime.datetime | float | None:
    if a is not None and b is not None:
        raise TypeError("give valid_from/valid_until or not_before/not_after, not both")
    return a if a is not None else b


def _load_key(data: bytes, passphrase: bytes | None) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, passphrase, unsafe_skip_rsa_key_validation=True)
    except TypeError:  # older cryptography, or a plain key given a passphrase
        try:
            key = serialization.load_pem_private_key(data, passphrase)
        except TypeError:
            key = serialization.load_pem_private_key(data, None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError("unsupported key type")
    return key


def _spec_key_types(obj: dict[str, Any]) -> list[str]:
    pk = obj.get("privkey")
    specs = [pk] if isinstance(pk, dict) else (pk or [])
    out = []
    for s in specs:
        if isinstance(s.get("type"), str) and s["type"].lower() == "ec":
            out.append(s["curve"])
        else:
            out.append("rsa")
    return out or ["rsa"]


def _read_fingerprint(set_dir: Path) -> str | None:
    if not (set_dir / "md.json").is_file():
        return None
    sha256s = []
    for kt in _spec_key_types(json.loads((set_dir / "md.json").read_text())):
        cp = set_dir / pubcert_name(kt)
        if not cp.is_file():
            return None
        leaf = x509.load_pem_x509_certificate(cp.read_bytes())
        sha256s.append(leaf.fingerprint(hashes.SHA256()).hex())
    return fingerprint_of(sha256s)


def read_active_fingerprint(store: Path | str, md: str) -> str | None:
    """The fingerprint of domains/<md>/ as the test sees it (independent of broker.staging)."""
    return _read_fingerprint(Path(store) / "domains" / md)


def read_staged_fingerprint(store: Path | str, md: str) -> str | None:
    """The fingerprint of staging/<md>/ as the test sees it (independent of broker.staging)."""
    return _read_fingerprint(Path(store) / "staging" / md)


def activate(store: Path | str, md: str) -> str:
    """What mod_md does with staging/<md>/ on a graceful restart (its run_load_staging).

    Returns "nothing-staged" (no staging/<md>/md.json: nothing happens), "missing" (a key type
    of the staged md.json lacks a file: nothing happens, staging stays), "purged" (a key or
    certificate does not load or they do not match: staging is removed, the active set stays),
    or "activated" (domains/<md> moved to archive/<md>.<N>, the staged set, keys decrypted,
    became domains/<md>, staging/<md> removed). Like mod_md it checks neither validity dates
    nor names.
    """
    store = Path(store)
    staged = store / "staging" / md
    if not (staged / "md.json").is_file():
        return "nothing-staged"
    obj = json.loads((staged / "md.json").read_text())
    passphrase = store_passphrase(store)
    files: dict[str, bytes] = {}
    for kt in _spec_key_types(obj):
        kp, cp = staged / privkey_name(kt), staged / pubcert_name(kt)
        if not kp.is_file() or not cp.is_file():
            return "missing"
        try:
            key = _load_key(kp.read_bytes(), passphrase)
            leaf = x509.load_pem_x509_certificate(cp.read_bytes())
            if leaf.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) != key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
                raise ValueError("key does not match the certificate")
        except (ValueError, TypeError):
            shutil.rmtree(staged)
            shutil.rmtree(store / "challenges" / md, ignore_errors=True)
            return "purged"
        files[privkey_name(kt)] = key_pem(key)
        files[pubcert_name(kt)] = cp.read_bytes()
    tmp = store / "tmp" / md
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.chmod(tmp, 0o700)
    _write(tmp / "md.json", json.dumps(obj, indent=2), 0o600)
    for name, data in files.items():
        _write(tmp / name, data, 0o600)
    if (staged / "job.json").is_file():
        _write(tmp / "job.json", (staged / "job.json").read_bytes(), 0o600)
    domains = store / "domains" / md
    if domains.exists():
        archive = store / "archive"
        archive.mkdir(mode=0o700, exist_ok=True)
        n = 1
        while (archive / f"{md}.{n}").exists():
            n += 1
        os.rename(domains, archive / f"{md}.{n}")
    (store / "domains").mkdir(mode=0o700, exist_ok=True)
    os.rename(tmp, domains)
    shutil.rmtree(staged)
    shutil.rmtree(store / "challenges" / md, ignore_errors=True)
    return "activated"
