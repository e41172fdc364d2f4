"""What mod_md has staged for an MD, and whether it is sound enough to restart for.

No D-Bus here. `staging/` is written by www-data: every path under the store is opened
relative to a directory fd without following symlinks, only regular files are read, and
every read is capped.

Facts about mod_md this module relies on (read in mod_md's source, v2.6.11):

* Store layout: `<store>/domains/<md>/` (active set), `<store>/staging/<md>/` (renewed set),
  `<store>/archive/<md>.<N>/`. Each set holds `md.json`, and per key type a
  `privkey*.pem` and a `pubcert*.pem` (the leaf first, then the chain).
* File names per key type: the key type's name is "rsa" for RSA (whatever its bit length)
  and for the default type, the curve name for EC. "rsa" (compared without case) gives
  `privkey.pem` / `pubcert.pem`; any other name gives `privkey.<name>.pem` /
  `pubcert.<name>.pem`. The whole file name is lower-cased.
* md.json: `name` (the MD name), `domains` (list of names), `privkey` (absent when not
  configured, which means the default, RSA; else one spec object or a list of them; an empty
  list also means the default). A spec object has `type` ("Default", "RSA" with optional
  `bits`, or "EC" with `curve`; compared without case; a missing or unknown type is read as
  the default).
* job.json (in `staging/<md>/`): `finished` (bool), `notified`, `notified-renewed` (bools),
  `errors` (an integer: the number of errored runs), `last` (the last result: `status`,
  `problem`, `detail`, ...), `log` (`entries`, newest first), `valid-from`, `next-run`.
  mod_md activates a staged set on restart whether or not a job.json exists, and only when
  `staging/<md>/md.json` exists.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import heapq
import ipaddress
import json
import os
import re
import stat
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import crypto

from .chain import TrustAnchors, verify_chain
from .errors import InvalidName, NothingStaged, StagingInvalid
from .privkey import MAX_KEY_PEM_BYTES, MAX_STORE_JSON_BYTES, check_key, passphrase_from_store_json


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


MAX_NAME_LEN = 253
# A job.json untouched for this long belongs to a renewal mod_md is not working on now.
RENEWAL_ACTIVE_SECONDS = 300.0
MAX_LABEL_LEN = 63
# Caps on what www-data can write, checked before anything is parsed, so that one check costs a
# few milliseconds of CPU whatever the files hold (bench/staging_check.py).
# A Let's Encrypt chain with 100 names of 253 characters is about 40 KB of PEM.
MAX_PEM_BYTES = 64 * 1024        # a pubcert*.pem
MAX_JSON_BYTES = 256 * 1024      # md.json, job.json (mod_md keeps a bounded job log)
MAX_CHAIN_CERTS = 10             # certificates in one pubcert*.pem
MAX_SANS = 250                   # subjectAltNames of a leaf: Let's Encrypt issues at most 100
MAX_KEY_SPECS = 8                # key types of one MD
MAX_MD_DOMAINS = 1000            # names of one MD
MAX_CURVE_LEN = 64
# Directories under staging/ with no domains/ entry: mod_md activates none of them (every MD it
# manages has domains/<md>/md.json), but www-data can make any number. Status and CheckAll look
# at the first ones by name only, and say how many they left out.
MAX_UNMANAGED_LISTED = 64

_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# validate_md_name's rules as one pattern, for the up to MAX_MD_DOMAINS names of an md.json
# (a loop over labels per name costs a millisecond per thousand names more). Labels are
# separated by dots, so matching is linear in the name's length.
_DNS_NAME_RE = re.compile(r"(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Only these can be IP addresses; everything else skips ipaddress's slower parse.
_IP_CHARS_RE = re.compile(r"[0-9a-fA-F.:]+")
_CURVE_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CURVE_LEN}}}")
# A block counts only where its BEGIN line starts a line, as for OpenSSL (so mod_md).
_PEM_CERT_RE = re.compile(
    rb"^-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL | re.MULTILINE)
_PEM_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_BEGIN = b"-----BEGIN "

# job.json `last.problem` of a failed notification (MDNotifyCmd: AH10108, MDMessageCmd:
# AH10109). mod_md counts those in `errors` too, but they say nothing about the staged set.
_NOTIFY_PROBLEMS = ("AH10108", "AH10109")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def validate_md_name(name: str) -> None:
    """Refuse anything but a lower-case DNS name, optionally with a leading "*." label.

    The name is used exactly as given (it is a directory name in the store): no case
    folding, no trailing-dot stripping, no Unicode mapping (IDNs come as xn-- labels).
    """
    if not isinstance(name, str):
        raise InvalidName("the MD name must be a string")
    if not name:
        raise InvalidName("the MD name is empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidName(f"the MD name is longer than {MAX_NAME_LEN} characters")
    if not name.isascii():
        raise InvalidName("the MD name must be ASCII (use the xn-- form of a Unicode name)")
    if "\0" in name or "/" in name:
        raise InvalidName("the MD name contains a forbidden character")
    if name != name.lower():
        raise InvalidName("the MD name must be lower case")
    if name.endswith("."):
        raise InvalidName("the MD name must not end with a dot")
    rest = name.removeprefix("*.")
    if "*" in rest:
        raise InvalidName("a wildcard is allowed only as the whole first label ('*.')")
    for label in rest.split("."):
        if not label:
            raise InvalidName("the MD name has an empty label")
        if len(label) > MAX_LABEL_LEN:
            raise InvalidName(f"a label of the MD name is longer than {MAX_LABEL_LEN} characters")
        if not _LABEL_RE.fullmatch(label):
            raise InvalidName(
                "labels of the MD name may hold only a-z, 0-9 and '-', not at their start or end")


def name_covered(name: str, sans: Container[str]) -> bool:
    """Whether a certificate with these DNS subjectAltNames (lower case) covers `name`.

    As TLS does it: an exact match, or a SAN "*.<rest>" for a name of exactly one more,
    non-empty label in front of "<rest>". A wildcard name is covered only by the same
    wildcard SAN.
    """
    name = name.lower()
    if name in sans:
        return True
    first, dot, rest = name.partition(".")
    if not dot or not first or first == "*" or not rest:
        return False
    return ("*." + rest) in sans


class _KeySpec(NamedTuple):
    key_type: str   # "rsa" or the curve name as configured
    pubcert: str    # e.g. "pubcert.pem", "pubcert.secp256r1.pem"
    privkey: str


def _key_spec(key_type: str) -> _KeySpec:
    # mod_md (md_store.c): "<base>.pem" for "rsa" (any case), else "<base>.<name>.pem",
    # the whole name lower-cased.
    if key_type.lower() == "rsa":
        return _KeySpec(key_type, "pubcert.pem", "privkey.pem")
    return _KeySpec(key_type, f"pubcert.{key_type}.pem".lower(), f"privkey.{key_type}.pem".lower())


class _MdJson(NamedTuple):
    names: tuple[str, ...]
    specs: tuple[_KeySpec, ...]


def _epoch(dt: datetime.datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def _fingerprint(sha256s: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(sorted(sha256s)).encode("ascii")).hexdigest()


class _Loaded(NamedTuple):
    info: CertInfo
    ip_sans: frozenset[str]
    dns_sans: frozenset[str]                # lower case, for matching in linear time
    chain: tuple[x509.Certificate, ...]     # the leaf, then the rest of the file
    mtime: float


class _Fds:
    """Directory fds opened during one call, closed together."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def add(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        while self._fds:
            try:
                os.close(self._fds.pop())
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_dir(fds: _Fds, parent: int, name: str, rel: str) -> int | None:
    """fd of the directory `name` under `parent`, None when absent; never follows a symlink."""
    try:
        return fds.add(os.open(name, _DIR_FLAGS, dir_fd=parent))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise StagingInvalid("not-directory", f"{rel} is not a directory") from None
        raise StagingInvalid("unreadable", f"cannot open {rel}: {e.strerror}") from None


def _read_file(dir_fd: int, name: str, rel: str, cap: int) -> tuple[bytes, os.stat_result] | None:
    """Contents and stat of the regular file `name` under `dir_fd`, None when absent.

    Never follows a symlink, never blocks on a FIFO, never reads more than `cap` bytes.
    """
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):
            raise StagingInvalid("not-regular-file", f"{rel} is not a regular file") from None
        raise StagingInvalid("unreadable", f"cannot open {rel}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StagingInvalid("not-regular-file", f"{rel} is not a regular file")
        if st.st_size > cap:
            raise StagingInvalid("too-large", f"{rel} is larger than {cap} bytes")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(65536, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise StagingInvalid("too-large", f"{rel} is larger than {cap} bytes")
        return b"".join(chunks), st
    except OSError as e:
        raise StagingInvalid("unreadable", f"cannot read {rel}: {e.strerror}") from None
    finally:
        os.close(fd)


def _parse_json(data: bytes, rel: str, check: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise StagingInvalid(check, f"{rel} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise StagingInvalid(check, f"{rel} is not a JSON object")
    return obj


def _parse_md_json(data: bytes, md: str, rel: str) -> _MdJson:
    obj = _parse_json(data, rel, "md-json")
    name = obj.get("name")
    if name is not None and name != md:
        raise StagingInvalid("md-json", f"{rel} describes another MD")
    domains = obj.get("domains")
    if not isinstance(domains, list) or not domains:
        raise StagingInvalid("md-json", f"{rel} has no list of domains")
    if len(domains) > MAX_MD_DOMAINS:
        raise StagingInvalid("md-json", f"{rel} lists more than {MAX_MD_DOMAINS} domains")
    for i, d in enumerate(domains, 1):
        if not isinstance(d, str) or not _valid_domain(d):
            # Not echoed: it may hold anything, control characters included.
            raise StagingInvalid("domain-name", f"{rel}: domain {i} is not a DNS name, wildcard or IP address")
    pk = obj.get("privkey")
    if pk is None:
        raw_specs: list[Any] = []
    elif isinstance(pk, dict):
        raw_specs = [pk]
    elif isinstance(pk, list):
        raw_specs = pk
    else:
        raise StagingInvalid("md-json", f"{rel}: privkey is neither an object nor a list")
    if len(raw_specs) > MAX_KEY_SPECS:
        raise StagingInvalid("md-json", f"{rel} lists more than {MAX_KEY_SPECS} key types")
    specs: list[_KeySpec] = []
    for raw in raw_specs:
        if not isinstance(raw, dict):
            raise StagingInvalid("md-json", f"{rel}: a privkey entry is not an object")
        ktype = raw.get("type")
        if ktype is not None and not isinstance(ktype, str):
            raise StagingInvalid("md-json", f"{rel}: a privkey type is not a string")
        if isinstance(ktype, str) and ktype.lower() == "ec":
            curve = raw.get("curve")
            if not isinstance(curve, str) or not _CURVE_RE.fullmatch(curve):
                raise StagingInvalid("md-json", f"{rel}: an EC key type has no valid curve")
            specs.append(_key_spec(curve))
        else:
            # "Default", "RSA" and, as mod_md reads them, a missing or unknown type.
            specs.append(_key_spec("rsa"))
    if not specs:
        specs.append(_key_spec("rsa"))
    files = [s.pubcert for s in specs]
    if len(set(files)) != len(files):
        raise StagingInvalid("md-json", f"{rel} lists a key type twice")
    return _MdJson(tuple(domains), tuple(specs))


def _valid_domain(name: str) -> bool:
    """A DNS name (any case), a "*." wildcard or an IP address, as mod_md takes them."""
    if not name.isascii() or not name.isprintable() or "%" in name:
        return False
    if len(name) <= MAX_NAME_LEN and _DNS_NAME_RE.fullmatch(name.lower()):
        return True
    return _ip_address(name) is not None


def _ip_address(name: str) -> str | None:
    """`name`'s IP address in ipaddress's normal form, None when it is none."""
    if not _IP_CHARS_RE.fullmatch(name):
        return None
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


def _load_cert(data: bytes, st: os.stat_result, spec: _KeySpec, rel: str) -> _Loaded:
    """The leaf of a pubcert*.pem; every certificate of the chain must parse."""
    count = data.count(_PEM_BEGIN_CERT)
    if count > MAX_CHAIN_CERTS:
        raise StagingInvalid("chain-too-long", f"{rel} holds more than {MAX_CHAIN_CERTS} certificates")
    blocks = _PEM_CERT_RE.findall(data)
    # mod_md reads the leaf with OpenSSL, which also takes "X509 CERTIFICATE" blocks and skips a
    # BEGIN that does not start a line: any such block would make it activate another leaf than
    # the one verified here. mod_md itself writes nothing but CERTIFICATE blocks.
    if not blocks or len(blocks) != count or data.count(_PEM_BEGIN) != count:
        raise StagingInvalid("cert-parse", f"{rel} does not hold well-formed PEM certificates")
    try:
        certs = [x509.load_pem_x509_certificate(b) for b in blocks]
        leaf = certs[0]
        sha256 = leaf.fingerprint(hashes.SHA256()).hex()
        nb = getattr(leaf, "not_valid_before_utc", None) or leaf.not_valid_before
        na = getattr(leaf, "not_valid_after_utc", None) or leaf.not_valid_after
        issuer = leaf.issuer.rfc4514_string()
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
        if san is not None and len(san) > MAX_SANS:
            raise StagingInvalid("too-many-names", f"{rel}: the leaf has more than {MAX_SANS} subjectAltNames")
        dns = tuple(san.get_values_for_type(x509.DNSName)) if san is not None else ()
        ips = frozenset(str(ip) for ip in san.get_values_for_type(x509.IPAddress)) if san is not None else frozenset()
        info = CertInfo(
            key_type=spec.key_type,
            file=spec.pubcert,
            serial=format(leaf.serial_number, "x"),
            sha256=sha256,
            not_before=_epoch(nb),
            not_after=_epoch(na),
            issuer=issuer,
            names=dns,
        )
    except StagingInvalid:
        raise
    except Exception:
        raise StagingInvalid("cert-parse", f"{rel} holds a certificate that does not parse") from None
    return _Loaded(info, ips, frozenset(n.lower() for n in dns), tuple(certs), st.st_mtime)


def _covers(name: str, loaded: _Loaded) -> bool:
    ip = _ip_address(name)
    if ip is None:
        return name_covered(name, loaded.dns_sans)
    return ip in loaded.ip_sans


class Store:
    """Read-only view of mod_md's store at `root` (MDStoreDir)."""

    def __init__(self, root: str, clock: Callable[[], float] = time.time,
                 anchors: TrustAnchors | None = None):
        self.root = root
        self.clock = clock
        # None: no staged set can verify (fail closed); the broker loads them from its config.
        self.anchors = anchors

    # -- helpers -------------------------------------------------------------------------

    def _open_root(self, fds: _Fds) -> int | None:
        """fd of the store's root (the configured path may itself contain symlinks)."""
        try:
            return fds.add(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StagingInvalid("unreadable", f"cannot open the MD store: {e.strerror}") from None

    def _open_staging(self, fds: _Fds, md: str) -> tuple[int, int] | None:
        """(fd of the store's root, fd of staging/<md>), None when either is absent."""
        root = self._open_root(fds)
        if root is None:
            return None
        sfd = self._md_dir(fds, root, "staging", md)
        return None if sfd is None else (root, sfd)

    def _md_dir(self, fds: _Fds, root: int, group: str, md: str) -> int | None:
        gfd = _open_dir(fds, root, group, group)
        if gfd is None:
            return None
        return _open_dir(fds, gfd, md, f"{group}/{md}")

    def _md_json(self, dfd: int | None, group: str, md: str) -> _MdJson | None:
        if dfd is None:
            return None
        rel = f"{group}/{md}/md.json"
        got = _read_file(dfd, "md.json", rel, MAX_JSON_BYTES)
        if got is None:
            return None
        return _parse_md_json(got[0], md, rel)

    @staticmethod
    def _read_pubcert(dfd: int, group: str, md: str, spec: _KeySpec) -> _Loaded | None:
        rel = f"{group}/{md}/{spec.pubcert}"
        got = _read_file(dfd, spec.pubcert, rel, MAX_PEM_BYTES)
        if got is None:
            return None
        return _load_cert(got[0], got[1], spec, rel)

    @staticmethod
    def _make_set(md: str, mdj: _MdJson, loaded: list[_Loaded]) -> CertSet:
        return CertSet(
            md=md,
            names=mdj.names,
            certs=tuple(item.info for item in loaded),
            fingerprint=_fingerprint([item.info.sha256 for item in loaded]),
            since=max(item.mtime for item in loaded),
        )

    @classmethod
    def _active_leaf_sha256(cls, domains_fd: int | None, md: str, spec: _KeySpec) -> str | None:
        """The active leaf's sha256 for a key type; None when there is none or it is unreadable."""
        if domains_fd is None:
            return None
        try:
            loaded = cls._read_pubcert(domains_fd, "domains", md, spec)
        except StagingInvalid:
            return None
        return loaded.info.sha256 if loaded else None

    # -- public API ----------------------------------------------------------------------

    def _managed_md_json(self, fds: _Fds, root: int, md: str) -> _MdJson | None:
        """domains/<md>/md.json when mod_md manages `md`, else None.

        Apache's parent (root) writes it at every start for each configured MD, even before the
        first certificate; mod_md never activates a staged set without it. So it, not the
        staged copy www-data can write, says whether the MD exists and what its names and key
        types are. Anything but a root-owned regular file there counts as "not managed".
        """
        rel = f"domains/{md}/md.json"
        try:
            dfd = self._md_dir(fds, root, "domains", md)
            got = None if dfd is None else _read_file(dfd, "md.json", rel, MAX_JSON_BYTES)
        except StagingInvalid as e:
            if e.check in ("not-directory", "not-regular-file"):
                return None
            raise
        if got is None or got[1].st_uid != 0:
            return None
        return _parse_md_json(got[0], md, rel)

    @staticmethod
    def _passphrase(root: int) -> bytes:
        """The staged keys' passphrase, from the root-owned md_store.json."""
        try:
            got = _read_file(root, "md_store.json", "md_store.json", MAX_STORE_JSON_BYTES)
        except StagingInvalid as e:
            raise StagingInvalid("store-key", e.message.partition(": ")[2]) from None
        if got is None:
            raise StagingInvalid("store-key", "md_store.json is missing")
        if got[1].st_uid != 0:
            raise StagingInvalid("store-key", "md_store.json is not owned by root")
        return passphrase_from_store_json(got[0])

    def check_staged(self, md: str) -> CertSet:
        """The staged set of `md`, verified; raises InvalidName, NothingStaged, StagingInvalid.

        Cheap checks come first; the chain is verified before a key is decrypted, and both only
        after every size and count is known to be within its cap.
        """
        validate_md_name(md)
        nothing = NothingStaged(f"no certificate set is staged for {md}")
        with _Fds() as fds:
            opened = self._open_staging(fds, md)
            if opened is None:
                raise nothing
            root, sfd = opened
            # mod_md activates nothing without staging/<md>/md.json; its content is never used.
            if _read_file(sfd, "md.json", f"staging/{md}/md.json", MAX_JSON_BYTES) is None:
                raise nothing
            mdj = self._managed_md_json(fds, root, md)
            if mdj is None:
                raise StagingInvalid("not-managed", f"{md} is not an MD that mod_md manages here "
                                     f"(domains/{md}/md.json is not a root-owned file)")
            domains_fd = self._md_dir(fds, root, "domains", md)

            # Complete: every configured key type has its pubcert file.
            loaded: list[_Loaded | None] = []
            for spec in mdj.specs:
                rel = f"staging/{md}/{spec.pubcert}"
                got = _read_file(sfd, spec.pubcert, rel, MAX_PEM_BYTES)
                loaded.append(None if got is None else _load_cert(got[0], got[1], spec, rel))
            if all(item is None for item in loaded):
                raise nothing
            for spec, item in zip(mdj.specs, loaded):
                if item is None:
                    raise StagingInvalid(
                        "incomplete", f"staging/{md}/{spec.pubcert} is missing (key type {spec.key_type})")
            certs: list[_Loaded] = [item for item in loaded if item is not None]

            self._check_job(sfd, md)

            keys = [self._read_privkey(sfd, md, spec) for spec in mdj.specs]

            now = self.clock()
            for item in certs:
                rel = f"staging/{md}/{item.info.file}"
                if now < item.info.not_before:
                    raise StagingInvalid("not-yet-valid", f"{rel} is not valid yet")
                if now > item.info.not_after:
                    raise StagingInvalid("expired", f"{rel} has expired")

            for item in certs:
                for name in mdj.names:
                    if not _covers(name, item):
                        raise StagingInvalid(
                            "names", f"staging/{md}/{item.info.file} does not cover {name}")

            for spec, item in zip(mdj.specs, certs):
                if self._active_leaf_sha256(domains_fd, md, spec) == item.info.sha256:
                    raise StagingInvalid(
                        "same-as-active", f"staging/{md}/{spec.pubcert} is the active certificate")

            for item in certs:
                verify_chain(self.anchors, item.chain, now, f"staging/{md}/{item.info.file}")

            passphrase = self._passphrase(root)
            for spec, item, key in zip(mdj.specs, certs, keys):
                check_key(key, passphrase, crypto.X509.from_cryptography(item.chain[0]),
                          f"staging/{md}/{spec.privkey}")

            return self._make_set(md, mdj, certs)

    @staticmethod
    def _check_job(sfd: int, md: str) -> None:
        """job.json, when present, must show a finished renewal whose last run did not fail.

        A missing job.json is accepted: mod_md writes it beside the set but activates a staged
        set on restart without it, and www-data could remove it anyway, so it cannot be a
        safeguard. The set itself is verified on its own.
        `errors` counts errored runs. mod_md zeroes it when a renewal finishes and counts on
        afterwards for failed notifications (a failed hook), which is exactly when the hook is
        asked again; so a non-zero count is a failure only when the last result failed for
        another reason than a notification.
        """
        rel = f"staging/{md}/job.json"
        got = _read_file(sfd, "job.json", rel, MAX_JSON_BYTES)
        if got is None:
            return
        job = _parse_json(got[0], rel, "job-json")
        name = job.get("name")
        if name is not None and name != md:
            raise StagingInvalid("job-json", f"{rel} describes another MD")
        if job.get("finished") is not True:
            raise StagingInvalid("job-not-finished", f"{rel} does not show a finished renewal")
        errors = job.get("errors", 0)
        if isinstance(errors, bool) or not isinstance(errors, int) or errors < 0:
            raise StagingInvalid("job-json", f"{rel}: errors is not a count")
        if errors == 0:
            return
        last = job.get("last")
        if not isinstance(last, dict):
            return
        status = last.get("status", 0)
        if status == 0 or status is None:
            return
        problem = last.get("problem")
        if isinstance(problem, str) and any(p in problem for p in _NOTIFY_PROBLEMS):
            return
        raise StagingInvalid("job-errors", f"{rel} shows that mod_md's last run for {md} failed")

    @staticmethod
    def _read_privkey(sfd: int, md: str, spec: _KeySpec) -> bytes:
        """The key file's content: a regular file holding a PEM private key (decrypted later)."""
        rel = f"staging/{md}/{spec.privkey}"
        try:
            got = _read_file(sfd, spec.privkey, rel, MAX_KEY_PEM_BYTES)
        except StagingInvalid as e:
            if e.check == "not-regular-file":
                raise StagingInvalid("key-file", e.message.partition(": ")[2]) from None
            raise
        if got is None:
            raise StagingInvalid("key-file", f"{rel} is missing (key type {spec.key_type})")
        data = got[0]
        if b"-----BEGIN " not in data or b"PRIVATE KEY-----" not in data:
            raise StagingInvalid("key-file", f"{rel} does not hold a PEM private key")
        return data

    def staged_fingerprint(self, md: str) -> str | None:
        """Fingerprint of the complete set staged now, None when none is or the MD is not managed
        (no validity checks).

        Raises InvalidName, and StagingInvalid for hostile content (symlinks, FIFOs, huge or
        unparsable files).
        """
        validate_md_name(md)
        with _Fds() as fds:
            opened = self._open_staging(fds, md)
            if opened is None:
                return None
            root, sfd = opened
            mdj = self._managed_md_json(fds, root, md)
            if mdj is None or _read_file(sfd, "md.json", f"staging/{md}/md.json", MAX_JSON_BYTES) is None:
                return None
            sha256s = []
            for spec in mdj.specs:
                item = self._read_pubcert(sfd, "staging", md, spec)
                if item is None:
                    return None
                sha256s.append(item.info.sha256)
            return _fingerprint(sha256s)

    def _job(self, md: str) -> tuple[dict[str, Any], float] | None:
        """staging/<md>/job.json and its mtime; None when absent or odd in any way."""
        try:
            validate_md_name(md)
            with _Fds() as fds:
                opened = self._open_staging(fds, md)
                if opened is None:
                    return None
                rel = f"staging/{md}/job.json"
                got = _read_file(opened[1], "job.json", rel, MAX_JSON_BYTES)
                if got is None:
                    return None
                return _parse_json(got[0], rel, "job-json"), got[1].st_mtime
        except Exception:
            return None

    def job_notified(self, md: str) -> bool:
        """staging/<md>/job.json shows "notified-renewed": true. False on anything odd."""
        job = self._job(md)
        return job is not None and job[0].get("notified-renewed") is True

    def renewals_in_progress(self, recent_seconds: float = RENEWAL_ACTIVE_SECONDS) -> list[str]:
        """MDs that mod_md is renewing right now: staging/<md>/ changed recently, and its
        job.json (if any yet) does not say finished.

        mod_md renews MDs one after another. It creates the next MD's staging directory right
        after the previous MD's hook returned, but may write its job.json only once that
        renewal has finished (key generation alone can take seconds), so the directory is the
        earlier sign. This tells the scheduler that more `renewed` messages are likely on their
        way. Only advisory (www-data can fake it): it can delay a restart up to the settle
        time, no more.
        """
        now = self.clock()
        busy = []
        for md in self.list_mds():
            changed = self._staging_mtime(md)
            if changed is None:
                continue
            job = self._job(md)
            if job is not None:
                if job[0].get("finished") is True:
                    continue
                changed = max(changed, job[1])
            if now - changed < recent_seconds:
                busy.append(md)
        return busy

    def _staging_mtime(self, md: str) -> float | None:
        """mtime of the real directory staging/<md>, None when there is none (never raises)."""
        try:
            with _Fds() as fds:
                opened = self._open_staging(fds, md)
                return None if opened is None else os.fstat(opened[1]).st_mtime
        except Exception:
            return None

    def active(self, md: str) -> CertSet | None:
        """The active set in domains/<md>/, None when absent or incomplete.

        Parsed like a staged set, without validity checks. Raises InvalidName, and
        StagingInvalid for unreadable content.
        """
        validate_md_name(md)
        with _Fds() as fds:
            root = self._open_root(fds)
            if root is None:
                return None
            dfd = self._md_dir(fds, root, "domains", md)
            mdj = self._md_json(dfd, "domains", md)
            if dfd is None or mdj is None:
                return None
            loaded: list[_Loaded] = []
            for spec in mdj.specs:
                item = self._read_pubcert(dfd, "domains", md, spec)
                if item is None:
                    return None
                loaded.append(item)
            return self._make_set(md, mdj, loaded)

    def managed_names(self, md: str) -> tuple[str, ...] | None:
        """`md`'s names from the root-owned domains/<md>/md.json; None when it has none, i.e.
        this Apache does not manage the MD (mod_md writes it at every start). The same test
        as check_staged's, so that the self-test and a request agree."""
        validate_md_name(md)
        with _Fds() as fds:
            root = self._open_root(fds)
            if root is None:
                return None
            mdj = self._managed_md_json(fds, root, md)
            return None if mdj is None else tuple(mdj.names)

    def list_mds(self) -> list[str]:
        """Sorted valid MD names: every one under domains/, and the first MAX_UNMANAGED_LISTED
        by name of those only under staging/ (see survey)."""
        return self.survey()[0]

    def survey(self) -> tuple[list[str], int]:
        """(sorted valid MD names, how many staging-only names were left out).

        domains/ is written by root (mod_md's parent process): all of it is listed. A name only
        under staging/ is unmanaged and can only be refused; www-data can make any number of
        them, so the first MAX_UNMANAGED_LISTED by name are kept (in bounded memory) and the
        rest only counted.
        """
        with _Fds() as fds:
            root = self._open_root(fds)
            if root is None:
                return [], 0
            managed = set(self._md_dirs(fds, root, "domains"))
            left_out = 0

            def unmanaged() -> Iterator[str]:
                nonlocal left_out
                for name in self._md_dirs(fds, root, "staging"):
                    if name not in managed:
                        left_out += 1
                        yield name

            listed = heapq.nsmallest(MAX_UNMANAGED_LISTED, unmanaged())
            left_out -= len(listed)
        return sorted(managed.union(listed)), left_out

    @staticmethod
    def _md_dirs(fds: _Fds, root: int, group: str) -> Iterator[str]:
        """Valid MD names that are directories (not symlinks) in `group`, in directory order."""
        try:
            gfd = _open_dir(fds, root, group, group)
        except StagingInvalid:
            return
        if gfd is None:
            return
        try:
            with os.scandir(gfd) as it:
                for entry in it:
                    try:
                        validate_md_name(entry.name)
                    except InvalidName:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        yield entry.name
        except OSError:
            return
